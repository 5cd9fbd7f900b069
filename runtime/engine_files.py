"""TensorRT engine files in a bundle: their names, their manifest records, and when one is stale.

A serialized engine runs only on the TensorRT release and the GPU architecture that built it,
and only means something while the ONNX graph it came from is unchanged. So every engine is
named by TensorRT version and compute capability (`unet/engine-trt10.13.0-sm90.plan`) and its
manifest record says what it was built from; the runtime refuses anything else and names the
command that rebuilds it. Pure functions: the callers read files and ask TensorRT and CUDA.
"""
from __future__ import annotations

import dataclasses
import enum
import re
import shlex
from pathlib import Path

from sdrun.bundle import ComponentRecord, Manifest
from sdrun.errors import UserError

ENGINE_PREFIX = "engine-"
ENGINE_SUFFIX = ".plan"
LEVELS = ("min", "opt", "max")


def version_tag(tensorrt_version: str) -> str:
    """'10.13.0.35' -> '10.13.0' (major.minor.patch; the build number stays in the record)."""
    parts = re.findall(r"\d+", tensorrt_version)[:3]
    if not parts:
        raise ValueError(f"not a TensorRT version: {tensorrt_version!r}")
    return ".".join(parts + ["0"] * (3 - len(parts)))


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.13.0.35' -> (10, 13, 0, 35), for ordering comparisons."""
    return tuple(int(p) for p in re.findall(r"\d+", version))


def sm_tag(compute_capability: tuple[int, int]) -> str:
    """(9, 0) -> 'sm90', (12, 0) -> 'sm120', (8, 6) -> 'sm86'."""
    major, minor = compute_capability
    return f"sm{major}{minor}"


def capability_text(compute_capability: tuple[int, int]) -> str:
    return f"{compute_capability[0]}.{compute_capability[1]}"


def engine_key(tensorrt_version: str, compute_capability: tuple[int, int]) -> str:
    """The key of an engine in `ComponentRecord.engines`: 'trt10.13.0-sm90'."""
    return f"trt{version_tag(tensorrt_version)}-{sm_tag(compute_capability)}"


def engine_path(component: str, tensorrt_version: str, compute_capability: tuple[int, int]) -> str:
    """Bundle-relative engine file: 'unet/engine-trt10.13.0-sm90.plan'."""
    return f"{component}/{ENGINE_PREFIX}{engine_key(tensorrt_version, compute_capability)}{ENGINE_SUFFIX}"


@dataclasses.dataclass(frozen=True)
class EngineRecord:
    """What one engine was built from and for; stored under its key in the component's `engines`."""

    file: str  # bundle-relative path of the plan
    sha256: str  # of the plan file
    tensorrt_version: str  # full version of the builder, e.g. '10.13.0.35'
    compute_capability: str  # e.g. '9.0'
    profile: dict  # input name -> {"min": [...], "opt": [...], "max": [...]}
    onnx_sha256: dict  # bundle-relative path -> sha256 of every ONNX file the engine came from
    build_seconds: float
    static: bool  # min = opt = max for every input
    # optimization level, workspace, device name, "attention" ("decomposed" | "fused"), "tf32" (bool),
    # "refittable" (bool)
    builder: dict = dataclasses.field(default_factory=dict)

    @property
    def tf32(self) -> bool:
        """Whether fp32 products may round to TF32; records from before the choice was made had
        TensorRT's default, on."""
        return bool(self.builder.get("tf32", True))

    @property
    def refittable(self) -> bool:
        """Whether the engine was built so its weights can be replaced (`build-trt --refittable`)."""
        return bool(self.builder.get("refittable", False))

    @property
    def attention(self) -> str:
        """The attention the parser was fed; records from before the choice fed the bundle's graph."""
        return self.builder.get("attention", "fused")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EngineRecord":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def manifest_with_engine(manifest: Manifest, component: str, record: EngineRecord) -> Manifest:
    """A copy of `manifest` whose `component` lists `record` (replacing one with the same key)."""
    old = manifest.components[component]
    key = engine_key(record.tensorrt_version, _capability_tuple(record.compute_capability))
    updated = dataclasses.replace(old, engines={**old.engines, key: record.to_dict()})
    return dataclasses.replace(manifest, components={**manifest.components, component: updated})


class StaleReason(enum.Enum):
    """Why an engine cannot be used; each value is a phrase for the error message."""

    NOT_BUILT = "no TensorRT engine has been built for it"
    OTHER_TENSORRT = "its engine was built by another TensorRT version"
    OTHER_GPU = "its engine was built for another GPU architecture"
    ONNX_CHANGED = "its engine was built from another ONNX graph than the one in the manifest"
    MALFORMED = "its engine record in the manifest is malformed"
    FILE_MISSING = "its engine file is missing"
    FILE_CHANGED = "its engine file does not match the manifest (tampered or half-written)"


@dataclasses.dataclass(frozen=True)
class EngineVerdict:
    """The engine to use (`record`) or why there is none (`reason`, `detail`)."""

    component: str
    record: EngineRecord | None
    reason: StaleReason | None
    detail: str = ""

    @property
    def usable(self) -> bool:
        return self.reason is None


def engine_verdict(component: ComponentRecord, tensorrt_version: str,
                   compute_capability: tuple[int, int]) -> EngineVerdict:
    """Decide from the manifest alone whether `component` has an engine for this TensorRT and GPU."""
    name, wanted = component.name, engine_key(tensorrt_version, compute_capability)
    here = f"this machine has TensorRT {tensorrt_version} on sm {capability_text(compute_capability)}"
    if not component.engines:
        return EngineVerdict(name, None, StaleReason.NOT_BUILT, here)
    if wanted not in component.engines:
        built = ", ".join(sorted(component.engines))
        same_version = any(k.startswith(f"trt{version_tag(tensorrt_version)}-") for k in component.engines)
        reason = StaleReason.OTHER_GPU if same_version else StaleReason.OTHER_TENSORRT
        return EngineVerdict(name, None, reason, f"built for {built}; {here}")
    try:
        record = EngineRecord.from_dict(component.engines[wanted])
    except (TypeError, AttributeError) as err:
        return EngineVerdict(name, None, StaleReason.MALFORMED, f"{wanted}: {err}")
    if record.tensorrt_version != tensorrt_version:
        return EngineVerdict(name, record, StaleReason.OTHER_TENSORRT,
                             f"built by TensorRT {record.tensorrt_version}; {here}")
    if record.compute_capability != capability_text(compute_capability):
        return EngineVerdict(name, record, StaleReason.OTHER_GPU,
                             f"built for sm {record.compute_capability}; {here}")
    if record.onnx_sha256 != component.files:
        return EngineVerdict(name, record, StaleReason.ONNX_CHANGED,
                             _hash_difference(record.onnx_sha256, component.files))
    return EngineVerdict(name, record, None)


def file_verdict(verdict: EngineVerdict, file_sha256: str | None) -> EngineVerdict:
    """Refine a usable verdict with the plan file's actual hash (`None` when the file is absent)."""
    if not verdict.usable:
        return verdict
    if file_sha256 is None:
        return dataclasses.replace(verdict, reason=StaleReason.FILE_MISSING, detail=verdict.record.file)
    if file_sha256 != verdict.record.sha256:
        return dataclasses.replace(verdict, reason=StaleReason.FILE_CHANGED,
                                   detail=f"{verdict.record.file}: sha256 {file_sha256[:16]}…, "
                                          f"manifest says {verdict.record.sha256[:16]}…")
    return verdict


def rebuild_command(bundle: Path | str, component: str, static: bool = False) -> str:
    command = f"sdcompile build-trt {shlex.quote(str(bundle))} --component {component}"
    return command + " --static" if static else command


def stale_engine_error(bundle: Path | str, verdict: EngineVerdict) -> UserError:
    """The refusal for an unusable verdict: what is wrong and the exact rebuild command."""
    static = bool(verdict.record and verdict.record.static)
    return UserError(f"cannot use TensorRT for component {verdict.component!r}: {verdict.reason.value}.",
                     got=verdict.detail or None,
                     fix=f"rebuild it: {rebuild_command(bundle, verdict.component, static)}")


def check_input_shapes(component: str, shapes: dict[str, tuple[int, ...]], profile: dict, rebuild_hint: str) -> None:
    """Refuse input shapes outside the engine's optimization profile (min <= shape <= max per dim)."""
    for name, shape in shapes.items():
        low, high = profile[name]["min"], profile[name]["max"]
        inside = len(shape) == len(low) and all(lo <= s <= hi for lo, s, hi in zip(low, shape, high))
        if not inside:
            raise UserError(f"input {name!r} of {component} has a shape its TensorRT engine was not built for.",
                            expected=f"between {list(low)} and {list(high)}", got=str(list(shape)),
                            fix=f"rebuild with a profile that covers it: {rebuild_hint} "
                                "--min/--opt/--max batch=B,height=H,width=W (or --static --opt ...)")


def _capability_tuple(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return int(major), int(minor)


def _hash_difference(engine_files: dict, manifest_files: dict) -> str:
    changed = sorted(set(engine_files) ^ set(manifest_files)
                     | {p for p in engine_files if manifest_files.get(p, engine_files[p]) != engine_files[p]})
    return "differs: " + ", ".join(changed)
