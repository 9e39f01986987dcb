"""Numbers in a job spec are numbers: `epochs: true` is not one epoch, `"5"` is not five. YAML's
own integers and floats (what a spec file holds) still read as they always did."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from esper.contracts import JobSpec

BASE: dict[str, Any] = {
    "model": {"kind": "mlp", "hidden": [8]},
    "dataset": {"kind": "moons", "samples": 100},
}


def spec_with(section: str, field: str, value: Any) -> dict[str, Any]:
    return {**BASE, section: {**BASE.get(section, {}), field: value}}


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("training", "epochs", True),
        ("training", "epochs", False),
        ("training", "epochs", "5"),
        ("training", "epochs", 2.0),
        ("training", "batch_size", True),
        ("training", "lr", True),
        ("training", "momentum", False),
        ("training", "lr", "0.1"),
        ("dataset", "samples", True),
        ("dataset", "noise", True),
        ("model", "hidden", [True]),
        ("morphogenesis", "max_seeds", True),
    ],
)
def test_bools_and_strings_are_not_numbers(section: str, field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(spec_with(section, field, value))
    locations = [error["loc"][:2] for error in caught.value.errors()]
    assert any(loc[0] == section for loc in locations), locations


def test_the_same_in_json_and_yaml() -> None:
    with pytest.raises(ValidationError):
        JobSpec.model_validate_json(
            '{"model": {"kind": "mlp"}, "dataset": {"kind": "moons"}, "training": {"epochs": true}}'
        )
    with pytest.raises(ValidationError):
        JobSpec.from_yaml("model: {kind: mlp}\ndataset: {kind: moons}\ntraining: {epochs: yes}\n")


def test_yaml_numbers_still_read() -> None:
    spec = JobSpec.from_yaml(
        "model: {kind: mlp, hidden: [16, 8]}\n"
        "dataset: {kind: moons, samples: 200, noise: 0.2}\n"
        "training: {epochs: 3, lr: 1, momentum: 0.5, batch_size: 32}\n"
    )
    assert spec.training.epochs == 3
    assert spec.training.lr == 1.0  # an integer is a fine float
    assert spec.training.batch_size == 32
    assert spec.dataset.noise == 0.2  # type: ignore[union-attr]
    # What a stored spec reads back as: the server's own dump.
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec
