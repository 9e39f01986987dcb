"""The models a job spec can ask for: the zoo (`mlp`, `cnn`, `resnet`) and declarative layer
lists, built for the shape of the job's data, and the layers morphogenesis puts seeds into.

Every model is a tree of named children, so a layer's dotted `named_modules()` name is what a
spec writes in `morphogenesis.layers`:

- `mlp`: `0, 2, 4, …` are the linear layers (`1, 3, …` the activations); the last is the head.
  Samples of any shape are flattened inside the model's forward, so the names do not depend on
  the data.
- `cnn`: `conv1, act1, pool1, conv2, …, gap, flatten, fc1, fc_act, head` (a `poolN` is left out
  where the feature map is already a single row or column).
- `resnet`: `stem.conv, stem.bn, stem.act, stage1.0.conv1, stage1.0.bn1, …,
  stage2.0.shortcut.conv, …, pool, flatten, head`.
- `layers`: each entry's `name`, or its position (`"0"`, `"1"`, …).

Weights get torch's default initialisation, drawn from torch's global generator: seed it
(`torch.manual_seed`) before building for a reproducible model.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from esper.contracts.jobs import (
    CNNModel,
    LayerDef,
    LayersModel,
    MLPModel,
    ModelSpec,
    MorphogenesisSpec,
    PythonModel,
    ResNetModel,
)
from tolaria import usercode
from tolaria.errors import SpecError

MAX_PARAMETERS = 50_000_000

_MODEL = ["spec", "model"]
_HOSTS: dict[str, type[nn.Module]] = {
    "linear": nn.Linear,
    "conv2d": nn.Conv2d,
    "conv1d": nn.Conv1d,
}
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}

Shape = tuple[int, ...]


def build_model(spec: ModelSpec, input_shape: Shape, classes: int) -> nn.Module:
    """The model `spec` describes, for samples of `input_shape` (`[F]`, `[C, L]` (a layers
    model's conv1d layers) or `[C, H, W]`), giving
    `[B, classes]` logits. Raises SpecError when the spec does not fit the data or the model
    would have more than MAX_PARAMETERS parameters."""
    if not input_shape or any(d < 1 for d in input_shape) or classes < 1:
        raise ValueError(f"invalid data geometry: samples {list(input_shape)}, {classes} classes")
    if isinstance(spec, PythonModel):  # built once, for real: user code has no meta dry run
        return _counted(usercode.python_model(spec, tuple(input_shape), classes), input_shape)
    construct = _constructor(spec, tuple(input_shape), classes)
    # Count on the meta device first: a spec may ask for billions of parameters, which must be
    # refused before they are allocated. fork_rng keeps the probe from moving the caller's seed.
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        probe = construct()
    _counted(probe, input_shape)
    return construct()


def _counted(model: nn.Module, input_shape: Shape) -> nn.Module:
    parameters = sum(p.numel() for p in model.parameters())
    if parameters > MAX_PARAMETERS:
        raise SpecError(
            _MODEL,
            f"the model would have {parameters:,} parameters for samples of shape "
            f"{list(input_shape)}; the limit is {MAX_PARAMETERS:,}",
        )
    return model


def morphable_layers(model: nn.Module, spec: MorphogenesisSpec) -> list[str]:
    """The dotted names `esper.wrap` should wrap: `spec.layers` when given (each must be a
    linear, conv2d or conv1d layer of `model`), otherwise every layer whose kind is in
    `spec.layer_types`, in `named_modules()` order."""
    modules = dict(model.named_modules())
    hosts = [n for n, m in modules.items() if n and isinstance(m, tuple(_HOSTS.values()))]
    if spec.layers is not None:
        if not spec.layers:
            raise SpecError(["spec", "morphogenesis", "layers"], "names no layer")
        for i, name in enumerate(spec.layers):
            where: list[str | int] = ["spec", "morphogenesis", "layers", i]
            if not name or name not in modules:
                shown = ", ".join(hosts[:16]) + (" …" if len(hosts) > 16 else "")
                raise SpecError(where, f"the model has no layer {name!r}; its layers: {shown}")
            if name not in hosts:
                kind = type(modules[name]).__name__
                raise SpecError(
                    where,
                    f"layer {name!r} is a {kind}; seeds go into linear, conv2d and conv1d layers",
                )
            if name in spec.layers[:i]:
                raise SpecError(where, f"layer {name!r} is named twice")
        return list(spec.layers)
    wanted = tuple(_HOSTS[kind] for kind in spec.layer_types)
    names = [n for n in hosts if isinstance(modules[n], wanted)]
    if not names:
        kinds = " or ".join(spec.layer_types)
        raise SpecError(["spec", "morphogenesis", "layer_types"], f"the model has no {kinds} layer")
    return names


# --------------------------------------------------------------------- zoo
class FlatMLP(nn.Sequential):
    """An nn.Sequential that flattens each sample first: the linear layers keep the names
    `0, 2, 4, …` whatever the shape of the data."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = input.flatten(1)
        for module in self:
            out = module(out)
        return out


class GlobalAvgPool2d(nn.Module):
    """`[B, C, H, W]` → `[B, C]`: the mean over the feature map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class GlobalAvgPool1d(nn.Module):
    """`[B, C, L]` → `[B, C]`: the mean over the sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=2)


class BasicBlock(nn.Module):
    """Two 3×3 conv + batch-norm layers around a shortcut: the identity, or a strided 1×1 conv
    where the block changes the width or the resolution."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                    bn=nn.BatchNorm2d(cout),
                )
            )
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        result: torch.Tensor = self.act2(out + self.shortcut(x))
        return result


def _constructor(spec: ModelSpec, shape: Shape, classes: int) -> Callable[[], nn.Module]:
    if isinstance(spec, MLPModel):
        return lambda: _mlp(spec, shape, classes)
    if isinstance(spec, CNNModel):
        _image_shape(shape, "a cnn")
        return lambda: _cnn(spec, shape, classes)
    if isinstance(spec, ResNetModel):
        _image_shape(shape, "a resnet")
        return lambda: _resnet(spec, shape, classes)
    if isinstance(spec, LayersModel):
        return lambda: _declared(spec, shape, classes)
    raise TypeError(f"not a model spec: {type(spec).__name__}")


def _image_shape(shape: Shape, what: str) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise SpecError(
            [*_MODEL, "kind"],
            f"{what} needs image samples [C, H, W]; this data set's samples are {list(shape)}"
            " (use an mlp, or a layers model of linear layers)",
        )
    return shape[0], shape[1], shape[2]


def _mlp(spec: MLPModel, shape: Shape, classes: int) -> nn.Module:
    act = _ACTIVATIONS[spec.activation]
    width = math.prod(shape)
    layers: list[nn.Module] = []
    for hidden in spec.hidden:
        layers += [nn.Linear(width, hidden), act()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return FlatMLP(*layers)


def _cnn(spec: CNNModel, shape: Shape, classes: int) -> nn.Module:
    act = _ACTIVATIONS[spec.activation]
    channels, height, width = _image_shape(shape, "a cnn")
    children: OrderedDict[str, nn.Module] = OrderedDict()
    for i, out in enumerate(spec.channels, start=1):
        children[f"conv{i}"] = nn.Conv2d(channels, out, 3, padding=1)
        children[f"act{i}"] = act()
        if height >= 2 and width >= 2:
            children[f"pool{i}"] = nn.MaxPool2d(2)
            height, width = height // 2, width // 2
        channels = out
    children["gap"] = nn.AdaptiveAvgPool2d(1)
    children["flatten"] = nn.Flatten()
    children["fc1"] = nn.Linear(channels, spec.hidden)
    children["fc_act"] = act()
    children["head"] = nn.Linear(spec.hidden, classes)
    return nn.Sequential(children)


def _resnet(spec: ResNetModel, shape: Shape, classes: int) -> nn.Module:
    """Stage k (from 1) has width `width · 2^(k-1)`; stages after the first start with a
    stride-2 block. As many stages as `blocks` has entries."""
    channels = _image_shape(shape, "a resnet")[0]
    children: OrderedDict[str, nn.Module] = OrderedDict()
    children["stem"] = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(channels, spec.width, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(spec.width),
            act=nn.ReLU(),
        )
    )
    cin = spec.width
    for k, count in enumerate(spec.blocks):
        cout = spec.width * 2**k
        blocks = [
            BasicBlock(cin if b == 0 else cout, cout, 2 if k and b == 0 else 1)
            for b in range(count)
        ]
        children[f"stage{k + 1}"] = nn.Sequential(*blocks)
        cin = cout
    children["pool"] = nn.AdaptiveAvgPool2d(1)
    children["flatten"] = nn.Flatten()
    children["head"] = nn.Linear(cin, classes)
    return nn.Sequential(children)


# ------------------------------------------------------------ declarative
def _declared(spec: LayersModel, shape: Shape, classes: int) -> nn.Module:
    """Each entry's input size is the previous entry's output, starting from the samples'
    shape; `[F]` samples are vectors, `[C, L]` samples sequences (for conv1d layers), `[C, H, W]`
    samples feature maps. A linear layer needs a vector (put `flatten` or `global_avgpool`
    after convolutions); the last output must be `[classes]`."""
    model = nn.Sequential()
    for i, layer in enumerate(spec.layers):
        where: list[str | int] = [*_MODEL, "layers", i]
        module, shape = _layer(layer, shape, classes, where)
        name = layer.name if layer.name is not None else str(i)
        if name in model._modules:
            raise SpecError([*where, "name"], f"another layer is already named {name!r}")
        try:
            model.add_module(name, module)
        except KeyError:  # a name nn.Module itself uses, e.g. "training" or "forward"
            raise SpecError([*where, "name"], f"{name!r} cannot name a layer") from None
    if shape != (classes,):
        raise SpecError(
            [*_MODEL, "layers", len(spec.layers) - 1],
            f"the model ends with samples of shape {list(shape)}, not [{classes}] (one logit "
            "per class): end with a linear layer with `out: classes`",
        )
    return model


def _layer(
    layer: LayerDef, shape: Shape, classes: int, where: list[str | int]
) -> tuple[nn.Module, Shape]:
    kind = layer.type
    if kind in _ACTIVATIONS:
        return _ACTIVATIONS[kind](), shape
    if kind == "dropout":
        return nn.Dropout(layer.p), shape
    if kind == "flatten":
        return nn.Flatten(), (math.prod(shape),)
    if kind == "linear":
        if len(shape) != 1:
            raise SpecError(
                where,
                f"a linear layer needs vector samples but gets feature maps {list(shape)}: "
                "put a flatten or global_avgpool layer before it",
            )
        out = _out(layer, classes, where)
        return nn.Linear(shape[0], out), (out,)
    if kind == "groupnorm":
        channels = shape[0]
        if channels % layer.groups:
            raise SpecError(
                [*where, "groups"], f"{channels} channels do not split into {layer.groups} groups"
            )
        return nn.GroupNorm(layer.groups, channels), shape
    if len(shape) == 2 or kind == "conv1d":
        return _layer1d(layer, shape, classes, where)
    channels, height, width = _maps(shape, kind, where)
    if kind == "batchnorm2d":
        return nn.BatchNorm2d(channels), shape
    if kind == "global_avgpool":
        return GlobalAvgPool2d(), (channels,)
    if kind == "conv2d":
        out = _out(layer, classes, where)
        k, s = layer.kernel_size, layer.stride
        if layer.padding == "same" and s == 1:
            # Odd kernels pad evenly; torch's "same" pads even kernels on one side.
            padding: int | str = k // 2 if k % 2 else "same"
            size = (height, width)
        else:
            padding = k // 2 if layer.padding == "same" else layer.padding
            size = _shrink(height, width, k, s, padding, where)
        return nn.Conv2d(channels, out, k, stride=s, padding=padding), (out, *size)
    k, s, pad = _pool_window(layer, where)
    size = _shrink(height, width, k, s, pad, where)
    pool = nn.MaxPool2d(k, s, pad) if kind == "maxpool2d" else nn.AvgPool2d(k, s, pad)
    return pool, (channels, *size)


def _layer1d(
    layer: LayerDef, shape: Shape, classes: int, where: list[str | int]
) -> tuple[nn.Module, Shape]:
    """An entry on `[C, L]` sequences: conv1d, global_avgpool over L, and the pools as 1-D
    windows along L (a k-wide window where a feature map's is k×k)."""
    kind = layer.type
    if len(shape) != 2:
        raise SpecError(
            where, f"{kind} needs sequences [C, L] but gets samples of shape {list(shape)}"
        )
    channels, length = shape
    if kind == "global_avgpool":
        return GlobalAvgPool1d(), (channels,)
    if kind == "conv1d":
        out = _out(layer, classes, where)
        k, s = layer.kernel_size, layer.stride
        if layer.padding == "same" and s == 1:
            padding: int | str = k // 2 if k % 2 else "same"  # as conv2d's: see _layer
            size = length
        else:
            padding = k // 2 if layer.padding == "same" else layer.padding
            size = _shrink1d(length, k, s, padding, where)
        return nn.Conv1d(channels, out, k, stride=s, padding=padding), (out, size)
    if kind not in ("maxpool2d", "avgpool2d"):
        raise SpecError(where, f"{kind} needs feature maps [C, H, W], not sequences [C, L]")
    k, s, pad = _pool_window(layer, where)
    size = _shrink1d(length, k, s, pad, where)
    pool = nn.MaxPool1d(k, s, pad) if kind == "maxpool2d" else nn.AvgPool1d(k, s, pad)
    return pool, (channels, size)


def _pool_window(layer: LayerDef, where: list[str | int]) -> tuple[int, int, int]:
    """A pool's window, stride and padding. Pooling keeps torch's defaults unless the spec sets
    them: a window of 2, stride = window, no padding. LayerDef's defaults (3, 1, "same") are a
    convolution's."""
    given = layer.model_fields_set
    k = layer.kernel_size if "kernel_size" in given else 2
    s = layer.stride if "stride" in given else k
    pad = 0 if "padding" not in given else k // 2 if layer.padding == "same" else layer.padding
    assert isinstance(pad, int)
    if pad > k // 2:
        raise SpecError([*where, "padding"], f"padding {pad} is over half the window ({k})")
    return k, s, pad


def _out(layer: LayerDef, classes: int, where: list[str | int]) -> int:
    if layer.out is None:
        raise SpecError([*where, "out"], f"a {layer.type} layer needs `out`")
    return classes if layer.out == "classes" else layer.out


def _maps(shape: Shape, kind: str, where: list[str | int]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise SpecError(
            where, f"{kind} needs feature maps [C, H, W] but gets vector samples {list(shape)}"
        )
    return shape[0], shape[1], shape[2]


def _shrink(
    height: int, width: int, k: int, s: int, pad: int, where: list[str | int]
) -> tuple[int, int]:
    size = ((height + 2 * pad - k) // s + 1, (width + 2 * pad - k) // s + 1)
    if min(size) < 1:
        raise SpecError(
            where,
            f"a {k}×{k} window (stride {s}, padding {pad}) does not fit the {height}×{width} "
            "feature map: the output would be empty",
        )
    return size


def _shrink1d(length: int, k: int, s: int, pad: int, where: list[str | int]) -> int:
    size = (length + 2 * pad - k) // s + 1
    if size < 1:
        raise SpecError(
            where,
            f"a {k}-wide window (stride {s}, padding {pad}) does not fit the sequence of length "
            f"{length}: the output would be empty",
        )
    return size
