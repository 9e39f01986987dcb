"""Generate `proto/` — the JSON Schema of every bus message, the envelope and the API bodies —
from the pydantic models, so that a service written in another language (or a reviewer) can read
the wire format without reading Python.

    python -m esper.contracts.proto            # write proto/ (what `make proto` runs)
    python -m esper.contracts.proto --check    # exit 1, listing drifted, missing and extra files

Output is deterministic (sorted keys, 2-space indent, trailing newline) so that a diff of proto/
is a diff of the contracts. The generator owns `envelope.json`, `index.json`, `messages/*.json`
and `api/*.json`; anything else under proto/ (its README, OpenAPI documents) is left alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from esper.contracts import (
    API_BODIES,
    MESSAGES,
    SCHEMA_VERSION,
    TOPICS,
    Envelope,
    Message,
    Page,
    examples,
)

DIALECT = "https://json-schema.org/draft/2020-12/schema"
OWNED_DIRS = ("messages", "api")
OWNED_FILES = ("envelope.json", "index.json")


def message_path(model: type[Message]) -> str:
    return f"messages/{model.TYPE}.v{model.VERSION}.json"


def api_path(model: type[BaseModel]) -> str:
    return f"api/{model.__name__}.json"


def dump(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _schema(model: type[BaseModel], **extra: Any) -> dict[str, Any]:
    return {"$schema": DIALECT, **model.model_json_schema(mode="validation"), **extra}


def render(
    messages: Iterable[type[Message]] = MESSAGES,
    api: Iterable[type[BaseModel]] = API_BODIES,
) -> dict[str, str]:
    """Every generated file, as {path relative to proto/: text}."""
    files: dict[str, str] = {}
    index: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "topics": list(TOPICS),
        "envelope": "envelope.json",
        "messages": [],
        "api": {},
    }
    files["envelope.json"] = dump(_schema(Envelope, **{"x-esper-schema-version": SCHEMA_VERSION}))
    samples = examples()
    for model in sorted(messages, key=lambda m: (m.TYPE, m.VERSION)):
        path = message_path(model)
        if path in files:
            raise ValueError(f"two contracts for {model.TYPE} v{model.VERSION}")
        meta = {"type": model.TYPE, "version": model.VERSION, "topic": model.TOPIC}
        shown = [m.model_dump(mode="json") for m in samples.get(model, [])]
        files[path] = dump(_schema(model, **{"x-esper": meta, "examples": shown}))
        index["messages"].append({**meta, "schema": path, "model": model.__name__})
    for body in api:
        path = api_path(body)
        # A generic body (Page) is published with items of any shape; each service's OpenAPI
        # document names the concrete item type.
        concrete: type[BaseModel] = Page[Any] if body is Page else body
        files[path] = dump(_schema(concrete))
        index["api"][body.__name__] = path
    files["index.json"] = dump(index)
    return files


def on_disk(root: Path) -> dict[str, str]:
    """The generator-owned files currently under `root`."""
    found: dict[str, str] = {}
    for name in OWNED_FILES:
        if (root / name).is_file():
            found[name] = (root / name).read_text(encoding="utf-8")
    for folder in OWNED_DIRS:
        if (root / folder).is_dir():
            for path in sorted((root / folder).glob("*.json")):
                found[f"{folder}/{path.name}"] = path.read_text(encoding="utf-8")
    return found


def check(root: Path, expected: dict[str, str] | None = None) -> list[str]:
    """One line per problem: `drifted: <path>`, `missing: <path>`, `extra: <path>`."""
    expected = render() if expected is None else expected
    actual = on_disk(root)
    problems = [f"missing: {p}" for p in sorted(expected.keys() - actual.keys())]
    problems += [f"extra: {p}" for p in sorted(actual.keys() - expected.keys())]
    problems += [
        f"drifted: {p}" for p in sorted(expected.keys() & actual.keys()) if expected[p] != actual[p]
    ]
    return problems


def write(root: Path, expected: dict[str, str] | None = None) -> list[str]:
    """Make `root` match the models: write what changed, delete stale owned files."""
    expected = render() if expected is None else expected
    changed = check(root, expected)
    actual = on_disk(root)
    for rel in sorted(actual.keys() - expected.keys()):
        (root / rel).unlink()
    for rel, text in expected.items():
        if actual.get(rel) != text:
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
    return changed


def default_root(start: Path | None = None) -> Path:
    """`proto/` of the repository that contains `start` (the working directory by default)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "libs" / "esper-core").is_dir():
            return folder / "proto"
    return here / "proto"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esper.contracts.proto", description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="the proto/ directory")
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on drift")
    args = parser.parse_args(argv)
    root: Path = args.out if args.out is not None else default_root()
    if args.check:
        problems = check(root)
        for line in problems:
            print(line)
        if problems:
            print(f"{root} is out of date: run `make proto`", file=sys.stderr)
            return 1
        print(f"{root}: up to date")
        return 0
    changed = write(root)
    verbs = {"drifted": "updated", "missing": "created", "extra": "removed"}
    for line in changed:
        kind, _, path = line.partition(": ")
        print(f"{verbs[kind]}: {path}")
    print(f"{root}: {len(render())} files, {len(changed)} changed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
