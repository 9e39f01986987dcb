"""Reading a YAML job spec within bounds: a spec is a few dozen nodes, so a document with
thousands of nodes, deep nesting or aliases that expand into more than that is refused before
it is built into Python objects. Tolaria's API, `JobSpec.from_yaml` and the CLI all read specs
through here, so a bomb is refused the same way wherever it is read.

The pure-Python YAML loader takes seconds per megabyte while holding the GIL, which stalls every
other request of an API process; libyaml (PyYAML's C loader) is used when it is there, and a
first pass over the parser's events counts what the document would build, aliases expanded, so
the load itself is bounded in time and memory.
"""

from __future__ import annotations

from typing import Any

import yaml

from esper.exceptions import ConfigError

MAX_NODES = 10_000
"""Scalars and collections in one document, each alias counted as the nodes it repeats."""
MAX_DEPTH = 32

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlLimitError(ConfigError):
    """A YAML document over MAX_NODES or MAX_DEPTH (a ValueError, like every ConfigError)."""


def load_spec_yaml(
    text: bytes | str, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH
) -> Any:
    """The document as Python data; raises YamlLimitError over the bounds, yaml.YAMLError when
    the text is not YAML."""
    _check_size(text, max_nodes, max_depth)
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only


def _check_size(text: bytes | str, max_nodes: int, max_depth: int) -> None:
    nodes = 0
    anchors: dict[str, int] = {}  # anchor → the nodes its value holds, for the aliases to it
    open_collections: list[tuple[str | None, int]] = []  # (anchor, nodes before it)
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.ScalarEvent):
            nodes += 1
            if event.anchor is not None:
                anchors[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            open_collections.append((event.anchor, nodes))
            nodes += 1
            if len(open_collections) > max_depth:
                raise YamlLimitError(f"the document nests deeper than {max_depth} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, before = open_collections.pop()
            if anchor is not None:
                anchors[anchor] = nodes - before
        elif isinstance(event, yaml.AliasEvent):
            nodes += anchors.get(event.anchor, 1)
        if nodes > max_nodes:
            raise YamlLimitError(
                f"the document has more than {max_nodes:,} nodes (aliases expanded); "
                "a job spec needs far fewer"
            )
