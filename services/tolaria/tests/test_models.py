"""Building models from job specs: the zoo, declarative layer lists, which layers get seeds, and
wrapping the result with esper.wrap."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import esper
from esper.contracts.jobs import (
    CNNModel,
    LayerDef,
    LayersModel,
    MLPModel,
    MorphogenesisSpec,
    ResNetModel,
)
from esper.exceptions import ConfigError
from tolaria.errors import SpecError
from tolaria.models import MAX_PARAMETERS, build_model, morphable_layers

CLASSES = 5


def layers(*entries: dict[str, Any]) -> LayersModel:
    return LayersModel(layers=[LayerDef(**e) for e in entries])


def linear(model: nn.Module, name: str) -> nn.Linear:
    layer = model.get_submodule(name)
    assert isinstance(layer, nn.Linear)
    return layer


def spec_error(call: Any, *args: Any) -> SpecError:
    with pytest.raises(SpecError) as info:
        call(*args)
    return info.value


ZOO = [
    pytest.param(MLPModel(), (2,), id="mlp-vectors"),
    pytest.param(MLPModel(hidden=[16, 8, 4], activation="tanh"), (1, 8, 8), id="mlp-images"),
    pytest.param(CNNModel(), (3, 16, 16), id="cnn"),
    pytest.param(CNNModel(channels=[4, 4, 4], activation="gelu"), (1, 1, 5), id="cnn-one-row"),
    pytest.param(ResNetModel(width=8), (3, 32, 32), id="resnet"),
    pytest.param(ResNetModel(width=4, blocks=[1, 2, 1, 1]), (1, 7, 9), id="resnet-4-stages"),
    pytest.param(
        layers(
            {"type": "conv2d", "out": 8, "name": "conv"},
            {"type": "batchnorm2d"},
            {"type": "relu"},
            {"type": "maxpool2d"},
            {"type": "conv2d", "out": 8, "stride": 2},
            {"type": "groupnorm", "groups": 4},
            {"type": "global_avgpool"},
            {"type": "dropout", "p": 0.5},
            {"type": "linear", "out": "classes", "name": "head"},
        ),
        (3, 12, 12),
        id="layers",
    ),
]


# ----------------------------------------------------------------- zoo
@pytest.mark.parametrize(("spec", "shape"), ZOO)
def test_each_model_gives_one_logit_per_class(spec: Any, shape: tuple[int, ...]) -> None:
    model = build_model(spec, shape, CLASSES)
    model.eval()
    assert model(torch.randn(3, *shape)).shape == (3, CLASSES)


@pytest.mark.parametrize(("spec", "shape"), ZOO)
def test_the_same_seed_builds_the_same_weights(spec: Any, shape: tuple[int, ...]) -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_model(spec, shape, CLASSES).state_dict()

    first, again, other = weights(7), weights(7), weights(8)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def test_the_size_check_does_not_use_up_random_numbers() -> None:
    torch.manual_seed(0)
    model = build_model(MLPModel(hidden=[64]), (2,), CLASSES)
    torch.manual_seed(0)
    assert torch.equal(linear(model, "0").weight, nn.Linear(2, 64).weight)


def test_mlp_names_its_linear_layers_by_position_whatever_the_sample_shape() -> None:
    for shape in [(10,), (2, 4, 4)]:
        model = build_model(MLPModel(hidden=[32, 16]), shape, CLASSES)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        assert names == ["0", "2", "4"]
        assert linear(model, "0").in_features == (10 if shape == (10,) else 4 * 4 * 2)


def test_cnn_layers_are_named_and_pools_stop_at_a_single_row() -> None:
    model = build_model(CNNModel(channels=[4, 8, 8]), (1, 4, 4), CLASSES)
    names = [n for n, _ in model.named_children()]
    # 4×4 → 2×2 → 1×1: the third block has nothing left to pool.
    assert names == [
        *("conv1", "act1", "pool1", "conv2", "act2", "pool2", "conv3", "act3"),
        *("gap", "flatten", "fc1", "fc_act", "head"),
    ]


def test_resnet_stages_double_the_width_and_halve_the_resolution() -> None:
    model = build_model(ResNetModel(width=4, blocks=[2, 1, 1]), (3, 32, 32), CLASSES)
    modules = dict(model.named_modules())
    assert {"stem.conv", "stage1.1.conv2", "stage2.0.shortcut.conv", "head"} <= set(modules)
    assert isinstance(modules["stage1.0.shortcut"], nn.Identity)
    widths = [modules[f"stage{k}.0.conv2"].out_channels for k in (1, 2, 3)]
    assert widths == [4, 8, 16]
    maps: dict[int, int] = {}
    hooks = [
        modules[f"stage{k}"].register_forward_hook(
            lambda _m, _i, out, k=k: maps.__setitem__(k, out.shape[-1])
        )
        for k in (1, 2, 3)
    ]
    model.eval()(torch.randn(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert maps == {1: 32, 2: 16, 3: 8}


@pytest.mark.parametrize("spec", [CNNModel(), ResNetModel()])
def test_image_models_refuse_vector_samples(spec: Any) -> None:
    err = spec_error(build_model, spec, (20,), CLASSES)
    assert err.location == ["spec", "model", "kind"]
    assert "[C, H, W]" in err.message


def test_a_model_over_the_parameter_limit_is_refused_before_it_is_allocated() -> None:
    # 4096 × 65536 × 2 weights alone are over 500M parameters: counted on the meta device.
    err = spec_error(build_model, MLPModel(hidden=[65536]), (4096,), CLASSES)
    assert err.location == ["spec", "model"]
    assert f"{MAX_PARAMETERS:,}" in err.message


# ---------------------------------------------------------- declarative
def test_layer_sizes_are_inferred_through_flatten() -> None:
    spec = layers(
        {"type": "conv2d", "out": 6, "kernel_size": 5, "padding": 0},  # 3×10×10 → 6×6×6
        {"type": "maxpool2d"},  # → 6×3×3
        {"type": "flatten"},
        {"type": "linear", "out": 32, "name": "hidden"},
        {"type": "tanh"},
        {"type": "linear", "out": "classes"},
    )
    model = build_model(spec, (3, 10, 10), CLASSES)
    assert [n for n, _ in model.named_children()] == ["0", "1", "2", "hidden", "4", "5"]
    assert linear(model, "hidden").in_features == 6 * 3 * 3
    assert model(torch.randn(2, 3, 10, 10)).shape == (2, CLASSES)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
def test_conv_padding_same_and_strides() -> None:
    spec = layers(
        {"type": "conv2d", "out": 4, "kernel_size": 4},  # "same", even kernel: stays 7×7
        {"type": "conv2d", "out": 4, "stride": 2},  # "same", stride 2: ⌈7/2⌉ = 4
        {"type": "avgpool2d", "kernel_size": 2, "stride": 1},  # → 3
        {"type": "flatten"},
        {"type": "linear", "out": "classes"},
    )
    model = build_model(spec, (1, 7, 7), CLASSES)
    assert linear(model, "4").in_features == 4 * 3 * 3
    assert model(torch.randn(2, 1, 7, 7)).shape == (2, CLASSES)


def test_a_fully_convolutional_head() -> None:
    spec = layers({"type": "conv2d", "out": "classes"}, {"type": "global_avgpool"})
    model = build_model(spec, (2, 5, 5), CLASSES)
    assert model(torch.randn(4, 2, 5, 5)).shape == (4, CLASSES)


def test_a_linear_layer_on_feature_maps_is_refused() -> None:
    spec = layers({"type": "conv2d", "out": 4}, {"type": "linear", "out": "classes"})
    err = spec_error(build_model, spec, (1, 8, 8), CLASSES)
    assert err.location == ["spec", "model", "layers", 1]
    assert "flatten" in err.message and "global_avgpool" in err.message


def test_the_last_layer_must_give_one_logit_per_class() -> None:
    spec = layers({"type": "linear", "out": 16}, {"type": "relu"})
    err = spec_error(build_model, spec, (4,), CLASSES)
    assert err.location == ["spec", "model", "layers", 1]
    assert f"[{CLASSES}]" in err.message
    image_out = layers({"type": "conv2d", "out": CLASSES})
    assert spec_error(build_model, image_out, (1, 4, 4), CLASSES).location[-1] == 0


def test_linear_and_conv_need_out() -> None:
    with pytest.raises(ValidationError, match="needs `out`"):
        LayerDef(type="linear")
    with pytest.raises(ValidationError, match="needs `out`"):
        LayerDef(type="conv2d")


@pytest.mark.parametrize(
    ("entries", "location", "words"),
    [
        ([{"type": "conv2d", "out": 4}], ["spec", "model", "layers", 0], "feature maps"),
        ([{"type": "global_avgpool"}], ["spec", "model", "layers", 0], "feature maps"),
        ([{"type": "batchnorm2d"}], ["spec", "model", "layers", 0], "feature maps"),
        (
            [{"type": "linear", "out": 6}, {"type": "groupnorm", "groups": 4}],
            ["spec", "model", "layers", 1, "groups"],
            "6 channels",
        ),
        (
            [{"type": "linear", "out": "classes", "name": "a"}, {"type": "relu", "name": "a"}],
            ["spec", "model", "layers", 1, "name"],
            "already named",
        ),
        (
            [{"type": "linear", "out": "classes", "name": "training"}],
            ["spec", "model", "layers", 0, "name"],
            "cannot name",
        ),
    ],
)
def test_declarations_that_do_not_fit_vector_samples(
    entries: list[dict[str, Any]], location: list[str | int], words: str
) -> None:
    err = spec_error(build_model, layers(*entries), (8,), CLASSES)
    assert err.location == location
    assert words in err.message


def test_a_window_larger_than_the_feature_map_is_refused() -> None:
    spec = layers(
        {"type": "maxpool2d"},  # 3×3 → 1×1
        {"type": "conv2d", "out": 2, "kernel_size": 3, "padding": 0},  # 1×1 → nothing
        {"type": "flatten"},
        {"type": "linear", "out": "classes"},
    )
    err = spec_error(build_model, spec, (1, 3, 3), CLASSES)
    assert err.location == ["spec", "model", "layers", 1]
    assert "1×1" in err.message


def test_pool_padding_over_half_the_window_is_refused() -> None:
    spec = layers({"type": "maxpool2d", "kernel_size": 2, "padding": 2})
    err = spec_error(build_model, spec, (1, 8, 8), CLASSES)
    assert err.location == ["spec", "model", "layers", 0, "padding"]


# ----------------------------------------------------------- morphogenesis
def test_named_layers_are_checked_in_order() -> None:
    model = build_model(CNNModel(), (3, 8, 8), CLASSES)
    assert morphable_layers(model, MorphogenesisSpec(layers=["conv2", "head"])) == [
        "conv2",
        "head",
    ]
    unknown = spec_error(morphable_layers, model, MorphogenesisSpec(layers=["conv1", "conv9"]))
    assert unknown.location == ["spec", "morphogenesis", "layers", 1]
    assert "'conv9'" in unknown.message and "conv1, conv2, fc1, head" in unknown.message
    activation = spec_error(morphable_layers, model, MorphogenesisSpec(layers=["act1"]))
    assert activation.location == ["spec", "morphogenesis", "layers", 0]
    assert "ReLU" in activation.message
    twice = spec_error(morphable_layers, model, MorphogenesisSpec(layers=["head", "fc1", "head"]))
    assert twice.location == ["spec", "morphogenesis", "layers", 2]
    empty = spec_error(morphable_layers, model, MorphogenesisSpec(layers=[]))
    assert empty.location == ["spec", "morphogenesis", "layers"]


def test_a_parameter_is_not_a_layer() -> None:
    model = build_model(MLPModel(), (4,), CLASSES)
    err = spec_error(morphable_layers, model, MorphogenesisSpec(layers=["0", "2.weight"]))
    assert err.location == ["spec", "morphogenesis", "layers", 1]


def test_layers_by_type() -> None:
    model = build_model(ResNetModel(width=4, blocks=[1, 1]), (3, 8, 8), CLASSES)
    convs = morphable_layers(model, MorphogenesisSpec(layer_types=["conv2d"]))
    assert convs[:2] == ["stem.conv", "stage1.0.conv1"]
    assert "stage2.0.shortcut.conv" in convs and "head" not in convs
    assert morphable_layers(model, MorphogenesisSpec(layer_types=["linear"])) == ["head"]
    assert morphable_layers(model, MorphogenesisSpec()) == [*convs, "head"]
    mlp = build_model(MLPModel(), (4,), CLASSES)
    err = spec_error(morphable_layers, mlp, MorphogenesisSpec(layer_types=["conv2d"]))
    assert err.location == ["spec", "morphogenesis", "layer_types"]


@pytest.mark.parametrize(("spec", "shape"), ZOO)
def test_wrapping_keeps_what_the_model_computes(spec: Any, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(spec, shape, CLASSES).eval()
    x = torch.randn(4, *shape)
    with torch.no_grad():
        before = model(x)
    names = morphable_layers(model, MorphogenesisSpec())
    wrapped = esper.wrap(model, 2, layers=names).eval()
    assert wrapped.layer_names() == names
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), before, rtol=0, atol=0)


# ------------------------------------------------------------------ errors
def test_spec_errors_name_their_field_and_survive_pickling() -> None:
    err = SpecError(["spec", "morphogenesis", "layers", 1], "no layer 'x'")
    assert str(err) == "spec.morphogenesis.layers[1]: no layer 'x'"
    assert isinstance(err, ConfigError) and isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.location, copy.message, str(copy)) == (err.location, err.message, str(err))


def test_building_on_the_meta_device_allocates_no_weights() -> None:
    # How a spec is checked before it is queued: sizes and names only.
    with torch.device("meta"):
        model = build_model(ResNetModel(width=64, blocks=[4, 4, 4]), (3, 32, 32), CLASSES)
    assert all(p.is_meta for p in model.parameters())
    assert "stage3.3.conv2" in morphable_layers(model, MorphogenesisSpec())
