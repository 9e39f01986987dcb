"""Training jobs: what a user submits to Tolaria (`JobSpec`, JSON or YAML) and what Tolaria
reports back about a job (`JobView`).

A spec says *what* to train — a model from the built-in zoo or a declarative layer list, a data
set (synthetic, or files under Tolaria's data directory), training settings, morphogenesis
settings. Sizes that depend on the data (input width, number of classes) are inferred from the
data set, so a spec never repeats them. Tolaria builds the model and opens the data when a job is
submitted, so a spec that names a layer the model lacks or a file that does not fit is refused
with 422 before anything is queued.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    model_validator,
)

from esper.contracts.envelope import Message, register
from esper.contracts.vocabulary import (
    Blend,
    BlueprintName,
    Count,
    Identifier,
    JobStatus,
    KernelFormat,
    KernelId,
    LayerName,
    SeedIndex,
    SeedStateName,
    Text,
    Timestamp,
    Unit,
)
from esper.specyaml import load_spec_yaml


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


HostKind = Literal["linear", "conv2d", "conv1d"]
HOST_KINDS: tuple[HostKind, ...] = ("linear", "conv2d", "conv1d")
Activation = Literal["relu", "tanh", "gelu", "silu"]
Width = Annotated[StrictInt, Field(ge=1, le=65536)]


# ------------------------------------------------------------------ models
class MLPModel(_Spec):
    """Linear layers of the given hidden widths, then one to the classes. Layers are named
    `0, 2, 4, …` (the `nn.Sequential` indices), the last one is the classifier."""

    kind: Literal["mlp"] = "mlp"
    hidden: list[Width] = Field(default_factory=lambda: [64, 64], max_length=32)
    activation: Activation = "relu"


class CNNModel(_Spec):
    """Conv blocks (3×3 conv, activation, 2×2 max-pool) of the given channels, global average
    pooling, then a classifier. For image data ([C, H, W] samples)."""

    kind: Literal["cnn"] = "cnn"
    channels: list[Width] = Field(default_factory=lambda: [16, 32], min_length=1, max_length=8)
    hidden: Width = 64
    activation: Activation = "relu"


class ResNetModel(_Spec):
    """A small ResNet for 32×32 images: a stem, three stages of basic blocks (widths ×1, ×2,
    ×4, stride 2 between stages), global average pooling, a classifier."""

    kind: Literal["resnet"] = "resnet"
    width: Width = 16
    blocks: list[Annotated[StrictInt, Field(ge=1, le=8)]] = Field(
        default_factory=lambda: [1, 1, 1], min_length=1, max_length=4
    )


class LayerDef(_Spec):
    """One entry of a declarative model. Sizes of the input side are inferred."""

    type: Literal[
        "linear",
        "conv2d",
        "conv1d",
        "relu",
        "tanh",
        "gelu",
        "silu",
        "flatten",
        "maxpool2d",
        "avgpool2d",
        "global_avgpool",
        "batchnorm2d",
        "groupnorm",
        "dropout",
    ]
    name: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    out: Width | Literal["classes"] | None = Field(
        default=None,
        description="output width (linear) or channels (conv2d, conv1d); 'classes' for the head",
    )
    kernel_size: Annotated[StrictInt, Field(ge=1, le=15)] = 3
    stride: Annotated[StrictInt, Field(ge=1, le=8)] = 1
    padding: Annotated[StrictInt, Field(ge=0, le=8)] | Literal["same"] = "same"
    groups: Annotated[StrictInt, Field(ge=1, le=64)] = 8
    p: Annotated[StrictFloat, Field(ge=0.0, lt=1.0)] = 0.1

    @model_validator(mode="after")
    def _sizes(self) -> LayerDef:
        if self.type in ("linear", "conv2d", "conv1d") and self.out is None:
            raise ValueError(f"a {self.type} layer needs `out`")
        return self


class LayersModel(_Spec):
    """A declarative model: layers in order, named by `name` or by position."""

    kind: Literal["layers"] = "layers"
    layers: list[LayerDef] = Field(min_length=1, max_length=128)


class ExternalModel(_Spec):
    """A model trained in the user's own process (`esper.session(..., controller="stack")`):
    Tolaria registers the run and relays its reports, decisions and stop requests; it builds and
    trains nothing. Goes with an `external` dataset."""

    kind: Literal["external"] = "external"
    description: Text | None = None


MAX_ARGS_BYTES = 16 << 10
"""An entrypoint's `args`, as JSON, are at most this long: settings, not data."""

Entrypoint = Annotated[
    str,
    Field(
        max_length=256,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$",
        description="`package.module:function`, imported from the job's code (`JobSpec.code`)",
    ),
]


def _bounded_args(args: dict[str, Any]) -> dict[str, Any]:
    if len(json.dumps(args)) > MAX_ARGS_BYTES:
        raise ValueError(f"args are over {MAX_ARGS_BYTES} bytes of JSON")
    return args


EntrypointArgs = Annotated[
    dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")], Any],
    Field(max_length=64, description="keyword arguments of the entrypoint (JSON values)"),
    AfterValidator(_bounded_args),
]


class PythonModel(_Spec):
    """The user's own model: `entrypoint(input_shape: tuple[int, ...], classes: int, **args)`
    returns an `nn.Module` that maps `[N, *input_shape]` to `[N, classes]` logits. Run from the
    job's `code` (Tolaria's `allow_user_code` setting must be on)."""

    kind: Literal["python"] = "python"
    entrypoint: Entrypoint
    args: EntrypointArgs = Field(default_factory=dict)

    @model_validator(mode="after")
    def _own_arguments(self) -> PythonModel:
        taken = sorted({"input_shape", "classes"} & set(self.args))
        if taken:
            raise ValueError(f"args must not set {', '.join(taken)}: Tolaria passes them")
        return self


ModelSpec = Annotated[
    MLPModel | CNNModel | ResNetModel | LayersModel | ExternalModel | PythonModel,
    Field(discriminator="kind"),
]


# ---------------------------------------------------------------- datasets
class Split(_Spec):
    """Held-out fractions: validation (what seeds are judged on) and test (reported at the end,
    never used for a decision) are disjoint."""

    validation: Annotated[StrictFloat, Field(gt=0.0, lt=0.9)] = 0.2
    test: Annotated[StrictFloat, Field(ge=0.0, lt=0.9)] = 0.1
    seed: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] = 0

    @model_validator(mode="after")
    def _leaves_training_data(self) -> Split:
        if self.validation + self.test >= 0.95:
            raise ValueError("validation + test must leave at least 5% for training")
        return self


class SyntheticData(_Spec):
    """Generated 2-D classification sets (blobs may have more features and classes)."""

    kind: Literal["spirals", "moons", "circles", "blobs", "checkerboard"]
    samples: Annotated[StrictInt, Field(ge=20, le=2_000_000)] = 2000
    noise: Annotated[StrictFloat, Field(ge=0.0, le=5.0)] = 0.1
    seed: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] = 0
    classes: Annotated[StrictInt, Field(ge=2, le=100)] = 2
    features: Annotated[StrictInt, Field(ge=2, le=4096)] = 2
    cells: Annotated[StrictInt, Field(ge=2, le=64)] = Field(
        default=4, description="checkerboard only: cells along each side of the board"
    )
    split: Split = Field(default_factory=Split)

    @model_validator(mode="after")
    def _shape(self) -> SyntheticData:
        if self.kind != "blobs" and self.features != 2:
            raise ValueError(f"{self.kind} is 2-D: only blobs take `features`")
        if self.kind != "checkerboard" and self.cells != 4:
            raise ValueError(f"{self.kind} has no cells: only checkerboard takes `cells`")
        if self.kind in ("moons", "circles") and self.classes != 2:
            raise ValueError(f"{self.kind} has 2 classes")
        return self


def _inside(path: str) -> str:
    if any(part == ".." for part in path.split("/")):
        raise ValueError("must stay inside the data directory: no `..` segments")
    return path


RelativePath = Annotated[
    str,
    Field(
        min_length=1,
        max_length=512,
        pattern=r"^[A-Za-z0-9_.\-][A-Za-z0-9_.\-/]*$",
        description="relative to Tolaria's data directory; no `..`",
    ),
    AfterValidator(_inside),
]


class FileData(_Spec):
    """Files under the data directory.

    - `npz`: arrays `x` (samples first) and `y` (integer labels) — names configurable;
    - `csv`: numeric columns, the label in `label_column` (default: the last), optional header;
    - `mnist`: a directory holding the IDX files (`train-images-idx3-ubyte`,
      `train-labels-idx1-ubyte`, optionally gzipped);
    - `cifar10`: a directory holding the python batches (`data_batch_1` … and `batches.meta`).
    """

    kind: Literal["npz", "csv", "mnist", "cifar10"]
    path: RelativePath
    x_key: str = "x"
    y_key: str = "y"
    label_column: StrictInt = -1
    limit: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None, description="use only the first N samples"
    )
    sequences: bool = Field(
        default=False,
        description="npz only: a 3-D `x` holds [N, C, L] sequences (channels, length), for "
        "conv1d layers, instead of [N, H, W] grayscale images",
    )
    split: Split = Field(default_factory=Split)

    @model_validator(mode="after")
    def _sequences_in_npz(self) -> FileData:
        if self.sequences and self.kind != "npz":
            raise ValueError(f"`sequences` is for npz arrays; {self.kind} files hold no sequences")
        return self


class ExternalData(_Spec):
    """The data of an `external` model's run: the user's process has it."""

    kind: Literal["external"] = "external"
    description: Text | None = None


class PythonData(_Spec):
    """The user's own data: `entrypoint(**args)` returns `(x, y)` — features (samples first,
    any real dtype, made float32) and integer labels ≥ 0 — as tensors or numpy arrays, or a
    `torch.utils.data.Dataset` of `(x, y)` pairs. Tolaria splits and standardises it like any
    other data set."""

    kind: Literal["python"] = "python"
    entrypoint: Entrypoint
    args: EntrypointArgs = Field(default_factory=dict)
    split: Split = Field(default_factory=Split)


DatasetSpec = Annotated[
    SyntheticData | FileData | ExternalData | PythonData, Field(discriminator="kind")
]


class CodeSource(_Spec):
    """Where a job's Python code comes from: a directory under the data directory (`path`), or
    a zip uploaded with the job (`digest`, which Tolaria sets from the upload; a spec may name
    one uploaded before). The directory is put first on the job's `sys.path`."""

    path: RelativePath | None = None
    digest: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _one_source(self) -> CodeSource:
        if (self.path is None) == (self.digest is None):
            raise ValueError("code has either `path` (under the data directory) or `digest`")
        return self


# ---------------------------------------------------------------- training
class TrainingSpec(_Spec):
    epochs: Annotated[StrictInt, Field(ge=1, le=100_000)] = 20
    batch_size: Annotated[StrictInt, Field(ge=1, le=65536)] = 64
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: Annotated[StrictFloat, Field(gt=0.0, le=10.0)] = 1e-3
    weight_decay: Annotated[StrictFloat, Field(ge=0.0, le=1.0)] = 0.0
    momentum: Annotated[StrictFloat, Field(ge=0.0, lt=1.0)] = 0.9
    schedule: Literal["constant", "cosine", "step"] = "constant"
    step_size: Annotated[StrictInt, Field(ge=1)] = 10
    gamma: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] = 0.5
    seed: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    telemetry_every_steps: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None, description="also report every K steps (null: once per epoch only)"
    )
    max_restarts: Annotated[StrictInt, Field(ge=0, le=10)] = Field(
        default=2,
        description=(
            "how often a job whose process crashed (killed, out of memory) is started again "
            "from its checkpoint before it ends FAILED; an error the training code raises ends "
            "it at once"
        ),
    )
    keep_best: bool = Field(
        default=True,
        description=(
            "keep the weights of the epoch with the best validation accuracy (and its seeds) and "
            "measure the test split with them too; the job reports both the best and the last"
        ),
    )


class ScheduledGrowth(_Spec):
    """One germination of a fixed schedule (`morphogenesis.controller: schedule`): executed at
    the decision point that ends `epoch` (0-based), with no controller asked."""

    epoch: Annotated[StrictInt, Field(ge=0, le=100_000)]
    layer: LayerName
    blueprint: BlueprintName
    seed: SeedIndex | None = Field(default=None, description="null: any free slot")


class MorphogenesisSpec(_Spec):
    enabled: bool = True
    seeds_per_layer: Annotated[StrictInt, Field(ge=1, le=16)] = 2
    layers: list[LayerName] | None = Field(
        default=None, max_length=256, description="wrap these layers (null: by `layer_types`)"
    )
    layer_types: list[HostKind] = Field(default_factory=lambda: list(HOST_KINDS), min_length=1)
    blend: Blend | None = Field(default=None, description="null: each kernel's default blend")
    ramp_steps: Annotated[StrictInt, Field(ge=0, le=1_000_000)] = 200
    grad_isolation: bool = False
    seed_lr: Annotated[StrictFloat, Field(gt=0.0, le=10.0)] | None = Field(
        default=None, description="null: the training lr"
    )
    max_seeds: Annotated[StrictInt, Field(ge=0, le=4096)] = 4
    kernel_format: KernelFormat = "export"
    kernel_retry_s: Annotated[StrictFloat, Field(ge=0.0, le=300.0)] = Field(
        default=30.0,
        description=(
            "how long a germination keeps retrying, with backoff, to compile or fetch its kernel "
            "while Urza cannot be reached (training waits meanwhile); past it the decision is "
            "refused as `kernel_unreachable`. 0: one try"
        ),
    )
    publish_kernels: bool = Field(
        default=False, description="at the end, upload each trained ACTIVE seed to Urza"
    )
    decide_every_steps: Annotated[StrictInt, Field(ge=1, le=10_000_000)] | None = Field(
        default=None,
        description=(
            "decision points every this many training steps, besides the end of every epoch "
            "(null: at the end of every epoch only). At a decision point the job reports, waits "
            "for the controller's answer to that report and applies it before its next step, so "
            "the same spec, data and seed decide the same things at the same steps"
        ),
    )
    controller: Literal["tamiyo", "schedule"] = Field(
        default="tamiyo",
        description=(
            "who decides at the decision points: Tamiyo, asked over the bus, or `schedule`, "
            "germinations at fixed epochs with no controller (a control arm for benchmarks)"
        ),
    )
    schedule: list[ScheduledGrowth] = Field(default_factory=list, max_length=256)
    decision_timeout_s: Annotated[StrictFloat, Field(gt=0.0, le=600.0)] = Field(
        default=30.0,
        description=(
            "how long a decision point waits for the controller's answer; past it the job goes "
            "on without decisions there and says so (event.decision_point_missed). With no "
            "controller alive (no heartbeat on the health topic) it does not wait at all"
        ),
    )


class DistributedSpec(_Spec):
    """Data-parallel training over `workers` processes (Tolaria's `ray` executor: a Ray Train
    run). Each worker trains on its shard of every epoch with `training.batch_size` samples a
    step (the global batch is `workers` times that); gradients are averaged every step, and
    every decision is applied on every worker at the same step."""

    workers: Annotated[StrictInt, Field(ge=1, le=256)] = 1
    cpus_per_worker: Annotated[StrictFloat | StrictInt, Field(gt=0, le=256)] = 1
    gpus_per_worker: Annotated[StrictFloat | StrictInt, Field(ge=0, le=16)] = 0


class JobSpec(_Spec):
    name: str | None = Field(default=None, max_length=128)
    submission_id: Identifier | None = Field(
        default=None, description="submitting the same id again returns the same job"
    )
    model: ModelSpec
    dataset: DatasetSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    morphogenesis: MorphogenesisSpec = Field(default_factory=MorphogenesisSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    code: CodeSource | None = Field(
        default=None, description="the code a `python` model or dataset is imported from"
    )

    @model_validator(mode="after")
    def _code_for_python(self) -> JobSpec:
        python = [p for p in ("model", "dataset") if getattr(self, p).kind == "python"]
        if python and self.code is None:
            raise ValueError(
                f"a python {' and '.join(python)} needs `code`: upload a zip with the job, or "
                "name a directory under the data directory (`code: {path: ...}`)"
            )
        if self.code is not None and not python:
            raise ValueError("`code` goes with a model or dataset of kind `python`")
        return self

    @model_validator(mode="after")
    def _external_together(self) -> JobSpec:
        if (self.model.kind == "external") != (self.dataset.kind == "external"):
            raise ValueError(
                "an external run has both model and dataset of kind `external` (the user's "
                "process trains it); a Tolaria job has neither"
            )
        return self

    @property
    def external(self) -> bool:
        """Trained in the user's own process (`esper.session`), not by a Tolaria worker."""
        return self.model.kind == "external"

    @classmethod
    def from_yaml(cls, text: str) -> JobSpec:
        """A spec from YAML (or JSON, which is YAML), read within esper.specyaml's bounds: an
        alias bomb or deep nesting raises YamlLimitError (a ConfigError, so a ValueError), text
        that is not YAML yaml.YAMLError. Validation errors are pydantic's."""
        data: Any = load_spec_yaml(text)
        return cls.model_validate(data)


# -------------------------------------------------------------------- views
class JobProgress(_Spec):
    epoch: Count = 0
    epochs: Count = 0
    step: Count = 0
    fraction: Unit = 0.0


class JobMetrics(_Spec):
    """The latest measured values; null until measured (never 0 for unmeasured). `test_*` are
    measured once, at the end, with the last weights; `best_*` describe the epoch with the best
    validation accuracy, whose weights the job keeps (`training.keep_best`)."""

    train_loss: float | None = None
    val_loss: float | None = None
    val_accuracy: Unit | None = None
    test_loss: float | None = None
    test_accuracy: Unit | None = None
    samples_per_s: Annotated[float, Field(ge=0.0)] | None = None
    best_epoch: Count | None = Field(default=None, description="0-based")
    best_val_accuracy: Unit | None = None
    best_test_accuracy: Unit | None = Field(
        default=None, description="the test split measured with the best epoch's weights"
    )
    parameters: Count | None = Field(
        default=None, description="trainable parameters now: the host and its live seeds"
    )
    train_flops: Annotated[float, Field(ge=0.0)] | None = Field(
        default=None,
        description="training compute so far, estimated: 3 × the forward FLOPs of each "
        "training sample, with the model as it was when the sample was seen",
    )


class SeedView(_Spec):
    layer: LayerName
    seed: SeedIndex
    state: SeedStateName
    alpha: Unit
    kernel_id: KernelId | None = None
    blueprint: str | None = None
    contribution: float | None = None
    germinated_epoch: Count | None = None


class JobAttempt(_Spec):
    """One run of a job's process: the one running now has no `ended_at` yet."""

    attempt: Annotated[int, Field(ge=1, le=1000)]
    worker: str | None = Field(default=None, max_length=128)
    pid: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="the job process's id on its worker's machine"
    )
    started_at: Timestamp
    ended_at: Timestamp | None = None
    exit_code: int | None = Field(
        default=None,
        description="0: the process ended the job itself; negative: killed by that signal; "
        "null while it runs, or when its worker was lost with it",
    )
    reason: Text | None = None


class JobView(_Spec):
    """`GET /jobs/{id}`."""

    job_id: Identifier
    submission_id: Identifier | None = None
    name: str | None = None
    status: JobStatus
    attempt: Annotated[int, Field(ge=0, le=1000)] = 0
    worker: str | None = Field(
        default=None, max_length=128, description="the Tolaria instance running the latest attempt"
    )
    created_at: Timestamp
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    progress: JobProgress = Field(default_factory=JobProgress)
    metrics: JobMetrics = Field(default_factory=JobMetrics)
    seeds: list[SeedView] = Field(default_factory=list, max_length=4096)
    error: Text | None = None
    stop_requested: bool = False
    has_checkpoint: bool = False
    attempts: list[JobAttempt] = Field(
        default_factory=list, max_length=100, description="the latest runs of the job's process"
    )
    spec: JobSpec


class JobSubmitted(_Spec):
    """`POST /jobs` → 202."""

    job_id: Identifier
    status: JobStatus
    created: bool = Field(description="false when `submission_id` named an existing job")


# -------------------------------------------------------------------- queue
@register
class JobQueued(Message):
    """A job waiting for a Tolaria worker, on the `jobs` stream that workers consume as a group.
    A worker that dies leaves the entry pending; another claims it and resumes the job from its
    last checkpoint."""

    TYPE: ClassVar[str] = "job.queued"
    VERSION: ClassVar[int] = 1
    TOPIC: ClassVar[str] = "jobs"

    job_id: Identifier
