"""The job specs users copy (examples/jobs/*.yaml, the README's) are valid and runnable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from esper.contracts import JobSpec
from tolaria.validation import check_spec

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "examples" / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_job_specs_validate_and_build(path: Path, tmp_path: Path) -> None:
    spec = JobSpec.from_yaml(path.read_text())
    if spec.dataset.kind in ("spirals", "moons", "circles", "blobs", "checkerboard"):
        check_spec(spec, tmp_path)


def test_the_readme_job_spec_validates(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(name: circles-growth.*?)```", readme, re.S)
    assert block is not None, "the README's job spec block is gone"
    text = "\n".join(line for line in block.group(1).splitlines() if not line.startswith("#"))
    check_spec(JobSpec.from_yaml(text), tmp_path)


def test_there_are_examples() -> None:
    assert EXAMPLES
