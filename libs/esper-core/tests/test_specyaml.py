"""A job spec is read within bounds wherever it is read (esper.specyaml): `JobSpec.from_yaml`
and `esper jobs submit` refuse an alias bomb or deep nesting at once with a clear error, and a
spec within the bounds, anchors included, still loads."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esper.cli import app
from esper.contracts import JobSpec
from esper.exceptions import ConfigError
from esper.specyaml import YamlLimitError

# Six lines whose aliases expand to a million nodes (10⁶ scalars once built).
ALIAS_BOMB = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcde", "bcdef", strict=True)
)
DEEP_LIST = "model: " + "[" * 900 + "]" * 900 + "\n"
DEEP_MAP = "model: " + "{a: " * 900 + "1" + "}" * 900 + "\n"
CASES = [(ALIAS_BOMB, "aliases expanded"), (DEEP_LIST, "nests deeper"), (DEEP_MAP, "nests deeper")]
IDS = ["alias_bomb", "deep_list", "deep_map"]


@pytest.mark.parametrize(("text", "words"), CASES, ids=IDS)
def test_from_yaml_refuses_a_bomb_or_deep_nesting_at_once(text: str, words: str) -> None:
    start = time.perf_counter()
    with pytest.raises(YamlLimitError, match=words) as caught:
        JobSpec.from_yaml(text)
    assert time.perf_counter() - start < 0.5
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, ConfigError)


def test_from_yaml_still_reads_anchors_within_the_bounds() -> None:
    spec = JobSpec.from_yaml(
        "name: anchored\nmodel: {kind: mlp, hidden: [&w 16, *w]}\ndataset: {kind: moons}\n"
    )
    assert spec.name == "anchored" and spec.model.model_dump()["hidden"] == [16, 16]


@pytest.mark.parametrize(("text", "words"), CASES, ids=IDS)
def test_jobs_submit_refuses_it_in_one_line_without_sending_it(
    tmp_path: Path, text: str, words: str
) -> None:
    """Tolaria's URL answers nothing: the refusal comes before any request is made."""
    spec = tmp_path / "bomb.yaml"
    spec.write_text(text)
    start = time.perf_counter()
    result = CliRunner().invoke(
        app, ["jobs", "submit", str(spec)], env={"ESPER_TOLARIA_URL": "http://127.0.0.1:9"}
    )
    assert time.perf_counter() - start < 2
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {spec}: ") and words in lines[0], lines[0]
    assert "Traceback" not in result.stderr and isinstance(result.exception, SystemExit)


def test_jobs_submit_reports_broken_yaml_in_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "broken.yaml"
    spec.write_text("model: {kind: mlp\ndataset: [\n")
    result = CliRunner().invoke(
        app, ["jobs", "submit", str(spec)], env={"ESPER_TOLARIA_URL": "http://127.0.0.1:9"}
    )
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not valid YAML" in lines[0], result.stderr
