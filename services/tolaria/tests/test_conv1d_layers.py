"""Declarative `layers` models with conv1d entries, on [C, L] samples: built and run, or refused
with a SpecError naming the entry."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import esper
from esper.contracts.jobs import LayerDef, LayersModel, MorphogenesisSpec
from tolaria.errors import SpecError
from tolaria.models import build_model, morphable_layers

CLASSES = 4


def layers(*entries: dict[str, Any]) -> LayersModel:
    return LayersModel(layers=[LayerDef(**e) for e in entries])


def refused(spec: LayersModel, shape: tuple[int, ...]) -> SpecError:
    with pytest.raises(SpecError) as info:
        build_model(spec, shape, CLASSES)
    return info.value


SEQUENCE_MODEL = layers(
    {"type": "conv1d", "out": 8, "kernel_size": 5, "name": "stem"},
    {"type": "groupnorm", "groups": 4},
    {"type": "relu"},
    {"type": "maxpool2d"},
    {"type": "conv1d", "out": 16, "stride": 2, "padding": 1},
    {"type": "gelu"},
    {"type": "avgpool2d", "kernel_size": 3, "stride": 1},
    {"type": "conv1d", "out": 8, "kernel_size": 4},
    {"type": "global_avgpool"},
    {"type": "linear", "out": "classes", "name": "head"},
)


# The even kernel of layer 7 pads "same" unevenly, which torch warns may copy the input.
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
def test_a_conv1d_model_builds_for_sequences_and_gives_one_logit_per_class() -> None:
    model = build_model(SEQUENCE_MODEL, (3, 40), CLASSES)
    stem = model.get_submodule("stem")
    assert isinstance(stem, nn.Conv1d) and stem.padding == (2,)  # "same" on an odd kernel
    assert isinstance(model.get_submodule("3"), nn.MaxPool1d)
    assert isinstance(model.get_submodule("6"), nn.AvgPool1d)
    for length in (40, 57):
        assert model(torch.randn(6, 3, length)).shape == (6, CLASSES)


def test_the_conv1d_layers_are_morphable_and_wrap() -> None:
    model = build_model(SEQUENCE_MODEL, (3, 40), CLASSES)
    names = morphable_layers(model, MorphogenesisSpec(layer_types=["conv1d"]))
    assert names == ["stem", "4", "7"]
    assert "head" in morphable_layers(model, MorphogenesisSpec())
    morphable = esper.wrap(model, seeds_per_layer=1, layers=names)
    assert morphable(torch.randn(2, 3, 40)).shape == (2, CLASSES)


def test_flatten_after_conv1d_feeds_a_linear_layer() -> None:
    spec = layers(
        {"type": "conv1d", "out": 2, "padding": 0},
        {"type": "flatten"},
        {"type": "linear", "out": "classes"},
    )
    model = build_model(spec, (3, 10), CLASSES)
    last = model.get_submodule("2")
    assert isinstance(last, nn.Linear) and last.in_features == 2 * 8


def test_conv1d_needs_out() -> None:
    with pytest.raises(ValidationError, match="needs `out`"):
        LayerDef(type="conv1d")


@pytest.mark.parametrize(
    ("entries", "shape", "index", "words"),
    [
        (
            [{"type": "conv1d", "out": 4}, {"type": "flatten"}, {"type": "conv1d", "out": 4}],
            (3, 10),
            2,
            "conv1d needs sequences [C, L]",
        ),
        ([{"type": "conv1d", "out": 4}], (12,), 0, "conv1d needs sequences [C, L]"),
        ([{"type": "conv1d", "out": 4}], (3, 8, 8), 0, "conv1d needs sequences [C, L]"),
        ([{"type": "conv2d", "out": 4}], (3, 10), 0, "feature maps [C, H, W]"),
        ([{"type": "batchnorm2d"}], (3, 10), 0, "feature maps [C, H, W]"),
        (
            [{"type": "conv1d", "out": 4, "kernel_size": 9, "padding": 0}],
            (3, 5),
            0,
            "does not fit the sequence of length 5",
        ),
        (
            [{"type": "conv1d", "out": 4}, {"type": "linear", "out": "classes"}],
            (3, 10),
            1,
            "global_avgpool",
        ),
    ],
)
def test_a_conv1d_model_that_does_not_fit_is_refused_naming_the_entry(
    entries: list[dict[str, Any]], shape: tuple[int, ...], index: int, words: str
) -> None:
    err = refused(layers(*entries), shape)
    assert err.location == ["spec", "model", "layers", index]
    assert words in err.message
