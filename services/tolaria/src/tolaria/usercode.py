"""The user's own code in a job (`model`/`dataset` of kind `python`, `JobSpec.code`).

User code runs in two places only: the job's own process (runner.py), and, at submission, a
check child (`python -m tolaria.usercode check`) that the API starts with a time limit and no
service secrets in its environment. Both call `activate` first; the API process never does, so
building a python model or data set there raises instead of running the code.

Uploaded code is a zip, checked before anything is written (`check_zip`: no absolute paths,
`..`, drives, symlinks, encryption; bounded file count and unpacked size), stored under
`work_dir/code/<sha256>.zip` and unpacked by the job into `work_dir/jobs/<id>/code/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import re
import shutil
import stat
import sys
import traceback
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from esper.contracts.jobs import CodeSource, PythonData, PythonModel
from tolaria.errors import Location, SpecError

if TYPE_CHECKING:
    from tolaria.settings import TolariaSettings

MAX_DATA_VALUES = 1 << 28
"""A python data set is held in memory as float32: at most this many numbers (1 GiB)."""
MAX_DATASET_ITEMS = 2_000_000
"""A `torch.utils.data.Dataset` is read item by item: at most this many."""

_MODEL_ENTRY: Location = ["spec", "model", "entrypoint"]
_DATA_ENTRY: Location = ["spec", "dataset", "entrypoint"]
_DRIVE = re.compile(r"^[A-Za-z]:")

_active: Path | None = None
_on_call: Callable[[Location, str], None] | None = None
"""The check child's progress note: which entrypoint is about to run (for a time-out)."""


# ------------------------------------------------------------------- zips
class CodeArchiveError(ValueError):
    """An uploaded zip that is refused; `too_large` tells the API to answer 413, not 422."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class ZipLimits:
    max_files: int
    max_unpacked_bytes: int

    @classmethod
    def of(cls, settings: TolariaSettings) -> ZipLimits:
        return cls(settings.max_code_files, settings.max_code_unpacked_bytes)


def check_zip(data: bytes, limits: ZipLimits) -> list[zipfile.ZipInfo]:
    """The entries of a zip that may be unpacked: raises CodeArchiveError for anything that
    could land outside the target directory or exceed the limits. The declared sizes bind:
    zipfile never inflates an entry past its declared size."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, EOFError) as err:
        raise CodeArchiveError(f"code is not a zip archive: {err}") from None
    entries = archive.infolist()
    if len(entries) > limits.max_files:
        raise CodeArchiveError(
            f"the zip has {len(entries)} entries; the limit is {limits.max_files} "
            "(TOLARIA_MAX_CODE_FILES)",
            too_large=True,
        )
    total = 0
    for entry in entries:
        _check_entry(entry)
        total += entry.file_size
    if total > limits.max_unpacked_bytes:
        raise CodeArchiveError(
            f"the zip unpacks to {total:,} bytes; the limit is {limits.max_unpacked_bytes:,} "
            "(TOLARIA_MAX_CODE_UNPACKED_BYTES)",
            too_large=True,
        )
    return entries


def _check_entry(entry: zipfile.ZipInfo) -> None:
    name = entry.filename
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise CodeArchiveError(f"zip entry {name!r} has an absolute path")
    if "\\" in name or any(part == ".." for part in PurePosixPath(name).parts):
        raise CodeArchiveError(f"zip entry {name!r} leaves its directory (`..` or `\\`)")
    if stat.S_ISLNK(entry.external_attr >> 16):
        raise CodeArchiveError(f"zip entry {name!r} is a symbolic link")
    if entry.flag_bits & 0x1:
        raise CodeArchiveError(f"zip entry {name!r} is encrypted")


def unpack(data: bytes, target: Path, limits: ZipLimits) -> None:
    """Unpack a zip into `target` (made empty first), checking it again on the way: the job
    process trusts no file on disk more than an upload."""
    entries = check_zip(data, limits)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    root = target.resolve()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for entry in entries:
            path = (root / entry.filename).resolve()
            if not path.is_relative_to(root):
                raise CodeArchiveError(f"zip entry {entry.filename!r} leaves its directory")
            if entry.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(entry) as source, path.open("wb") as sink:
                shutil.copyfileobj(source, sink)


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def zip_path(work_dir: Path, digest: str) -> Path:
    """Where an uploaded zip is kept, by content (`sha256:<hex>` → `code/<hex>.zip`)."""
    return work_dir / "code" / f"{digest.removeprefix('sha256:')}.zip"


def job_code_dir(work_dir: Path, job_id: str) -> Path:
    return work_dir / "jobs" / job_id / "code"


def directory_under(data_dir: Path, relative: str) -> Path:
    """`code.path`: a directory inside the data directory, symbolic links resolved."""
    root = data_dir.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise SpecError(["spec", "code", "path"], f"{relative} leaves the data directory")
    if not path.is_dir():
        raise SpecError(["spec", "code", "path"], f"{relative} is not a directory")
    return path


def code_dir_for(
    code: CodeSource, data_dir: Path, work_dir: Path, job_id: str, limits: ZipLimits
) -> Path:
    """In the job process: the directory its code is imported from, unpacked afresh from the
    stored zip on every attempt, so a crashed attempt's leftovers never count."""
    if code.path is not None:
        return directory_under(data_dir, code.path)
    assert code.digest is not None
    stored = zip_path(work_dir, code.digest)
    if not stored.is_file():
        raise SpecError(["spec", "code", "digest"], f"no uploaded code has digest {code.digest}")
    target = job_code_dir(work_dir, job_id)
    unpack(stored.read_bytes(), target, limits)
    return target


# ----------------------------------------------------------- running code
def activate(code_dir: Path) -> None:
    """Allow user code in this process, imported from `code_dir` before anything else."""
    global _active
    _active = code_dir
    sys.path.insert(0, str(code_dir))
    importlib.invalidate_caches()


def _entrypoint(location: Location, entrypoint: str) -> Callable[..., Any]:
    if _active is None:
        raise RuntimeError("user code runs only in a job's process or its submission check")
    if _on_call is not None:
        _on_call(location, entrypoint)
    module_name, _, attribute = entrypoint.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise SpecError(
            location, f"{entrypoint}: cannot import {module_name}: {_brief(err)}"
        ) from err
    found = getattr(module, attribute, None)
    if found is None:
        raise SpecError(location, f"{entrypoint}: module {module_name} has no {attribute}")
    if not callable(found):
        raise SpecError(
            location, f"{entrypoint}: {attribute} is a {type(found).__name__}, not callable"
        )
    return found


def _call(location: Location, entrypoint: str, *args: Any, **kwargs: Any) -> Any:
    function = _entrypoint(location, entrypoint)
    try:
        return function(*args, **kwargs)
    except Exception as err:
        raise SpecError(location, f"{entrypoint} raised {_brief(err)}") from err


def _brief(err: BaseException) -> str:
    """The error and the user's frame it came from: enough to name the line at fault."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {err}{where}"[:1000]


def python_model(spec: PythonModel, input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """The user's model, checked: an nn.Module that maps a batch of `input_shape` samples to
    `[N, classes]` (tried on two zero samples, in eval mode so no statistic moves)."""
    with torch.device("cpu"):  # a real model even where the caller sizes on the meta device
        model = _call(_MODEL_ENTRY, spec.entrypoint, tuple(input_shape), classes, **spec.args)
        if not isinstance(model, nn.Module):
            raise SpecError(
                _MODEL_ENTRY,
                f"{spec.entrypoint} returned a {type(model).__name__}, not a torch.nn.Module",
            )
        _probe(spec.entrypoint, model, input_shape, classes)
    return model


def _probe(entrypoint: str, model: nn.Module, shape: tuple[int, ...], classes: int) -> None:
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *shape)))
    except Exception as err:
        raise SpecError(
            _MODEL_ENTRY,
            f"{entrypoint}: the model fails on a batch of shape {[2, *shape]}: {_brief(err)}",
        ) from err
    finally:
        model.train(training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SpecError(
            _MODEL_ENTRY,
            f"{entrypoint}: the model maps a batch of shape {[2, *shape]} to {got}, "
            f"not [2, {classes}] logits",
        )


def python_data(spec: PythonData) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], str]:
    """The user's data as (features float32 `[N, ...]`, labels int64 `[N]`, a description),
    checked: labels ≥ 0 of at least two classes, finite features of rank 1–3 per sample."""
    result = _call(_DATA_ENTRY, spec.entrypoint, **spec.args)
    name = spec.entrypoint
    if isinstance(result, torch.utils.data.Dataset):
        x, y = _materialise(name, result)
    elif isinstance(result, tuple | list) and len(result) == 2:
        x, y = (_array(name, part, what) for part, what in zip(result, ("x", "y"), strict=True))
    else:
        raise SpecError(
            _DATA_ENTRY,
            f"{name} returned a {type(result).__name__}: return (x, y) tensors or a "
            "torch.utils.data.Dataset of (x, y) pairs",
        )
    return _checked(name, x, y)


def _array(name: str, value: Any, what: str) -> np.ndarray[Any, Any]:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise SpecError(
        _DATA_ENTRY, f"{name}: {what} is a {type(value).__name__}, not a tensor or numpy array"
    )


def _materialise(
    name: str, dataset: torch.utils.data.Dataset[Any]
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise SpecError(_DATA_ENTRY, f"{name}: the Dataset has no len()") from None
    if not 1 <= size <= MAX_DATASET_ITEMS:
        raise SpecError(
            _DATA_ENTRY, f"{name}: the Dataset has {size} items; 1 to {MAX_DATASET_ITEMS} fit"
        )
    xs: list[torch.Tensor] = []
    ys: list[int] = []
    for i in range(size):
        try:
            item = dataset[i]
            x, y = item
            xs.append(torch.as_tensor(x))
            ys.append(int(y))
        except Exception as err:
            raise SpecError(
                _DATA_ENTRY, f"{name}: item {i} of the Dataset is not an (x, y) pair: {_brief(err)}"
            ) from err
        if i == 0 and xs[0].numel() * size > MAX_DATA_VALUES:
            raise SpecError(_DATA_ENTRY, f"{name}: over {MAX_DATA_VALUES:,} feature values")
    try:
        features = torch.stack(xs).numpy()
    except RuntimeError as err:
        raise SpecError(_DATA_ENTRY, f"{name}: the samples differ in shape: {err}") from None
    return features, np.asarray(ys, dtype=np.int64)


def _checked(
    name: str, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], str]:
    def refuse(message: str) -> SpecError:
        return SpecError(_DATA_ENTRY, f"{name}: {message}")

    if not 2 <= x.ndim <= 4:
        raise refuse(f"x has shape {list(x.shape)}: samples first, each of rank 1 to 3")
    if x.size > MAX_DATA_VALUES:
        raise refuse(f"x has {x.size:,} values; the limit is {MAX_DATA_VALUES:,}")
    if x.dtype.kind not in "fiu":
        raise refuse(f"x has dtype {x.dtype}, not a real number type")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise refuse(f"y must be integer labels of shape [N], not {y.dtype} {list(y.shape)}")
    if len(y) != len(x):
        raise refuse(f"x has {len(x)} samples and y {len(y)} labels")
    features = x.astype(np.float32)
    if not np.isfinite(features).all():
        raise refuse("x holds NaN or infinite values")
    if len(y) and int(y.min()) < 0:
        raise refuse(f"labels must be ≥ 0; the smallest is {int(y.min())}")
    classes = int(y.max()) + 1 if len(y) else 0
    if classes < 2:
        raise refuse("every label is 0: a classifier needs 2 classes")
    source = f"python {name}: {len(y)} samples of shape {list(x.shape[1:])}"
    return features, y.astype(np.int64), source


# -------------------------------------------------------------- the check
def run_check(request_path: Path, progress_path: Path) -> int:
    """In the check child: check the spec as validation.check_spec does, with the code active.
    Each line of `progress_path` is JSON: the entrypoint about to run, then the answer."""
    global _on_call
    from esper.contracts import JobSpec
    from tolaria.validation import check_spec

    request = json.loads(request_path.read_text())
    with progress_path.open("a", encoding="utf-8") as progress:

        def note(line: dict[str, Any]) -> None:
            progress.write(json.dumps(line) + "\n")
            progress.flush()

        _on_call = lambda location, entrypoint: note(  # noqa: E731
            {"location": location, "entrypoint": entrypoint}
        )
        activate(Path(request["code_dir"]))
        try:
            check_spec(
                JobSpec.model_validate(request["spec"]),
                Path(request["data_dir"]),
                request["max_memory_bytes"],
            )
        except SpecError as err:
            note({"error": {"location": err.location, "message": err.message}})
            return 0
        except Exception as err:  # a fault outside any entrypoint call: still the user's
            note({"error": {"location": ["spec"], "message": _brief(err)}})
            return 0
        note({"ok": True})
    return 0


def answer_of(
    lines: Sequence[str], limit_s: float, exit_code: int | None, said: Sequence[str] = ()
) -> SpecError | None:
    """The parent's reading of the child's progress: None when the spec passed."""
    notes = []
    for line in lines:
        with contextlib.suppress(ValueError):  # a line cut short where the child was killed
            notes.append(json.loads(line))
    last = notes[-1] if notes else {}
    if last.get("ok"):
        return None
    if "error" in last:
        return SpecError(last["error"]["location"], last["error"]["message"])
    running = next((n for n in reversed(notes) if "entrypoint" in n), None)
    if exit_code is None:  # killed at the limit
        if running is None:
            return SpecError(["spec", "code"], f"checking the code took over {limit_s:g} s")
        return SpecError(
            running["location"],
            f"{running['entrypoint']} did not return within {limit_s:g} s "
            "(TOLARIA_USER_CODE_CHECK_S)",
        )
    where: Location = running["location"] if running else ["spec", "code"]
    what = running["entrypoint"] if running else "the code check"
    last = f": {said[-1][:500]}" if said else ""
    return SpecError(where, f"{what} ended the process (exit status {exit_code}){last}")


def main(argv: Sequence[str]) -> int:
    if len(argv) != 4 or argv[1] != "check":
        print("usage: python -m tolaria.usercode check REQUEST PROGRESS", file=sys.stderr)
        return 2
    return run_check(Path(argv[2]), Path(argv[3]))


if __name__ == "__main__":
    # Through the module the rest of tolaria imports, not this `__main__` copy of it: that one
    # holds the activation that models.py and datasets.py consult.
    from tolaria import usercode

    sys.exit(usercode.main(sys.argv))
