"""`sdcompile triton-repo`: a bundle as a standard Triton Inference Server model repository.

One model per component txt2img runs, and a `pipeline` Python-backend model (our tokenizer,
sampler loop and decoding, `sdrun.serve.triton_models`) that calls them through BLS:

    REPO/<component>/config.pbtxt        platform onnxruntime_onnx | tensorrt_plan, or backend python
    REPO/<component>/1/model.onnx[.data] | model.plan | model.py + bundle/ + sdrun/
    REPO/pipeline/config.pbtxt           the `sdrun serve` txt2img contract (`sdrun.serve.contract`)
    REPO/pipeline/1/model.py + bundle/ (manifest and tokenizer) + sdrun/

Every model takes explicit shapes (`max_batch_size: 0`); dims are -1 where the graph's axis is
symbolic (onnxruntime, python) or where the engine's profile range is not one value (tensorrt).
Python-backend models carry their own copy of the `sdrun` package; their interpreter needs numpy
(and onnxruntime for `--components python`).
"""
from __future__ import annotations

import enum
import shutil
from collections.abc import Sequence
from pathlib import Path

from sdrun.bundle import MANIFEST_NAME, Bundle, ComponentRecord, TensorSpec, open_bundle
from sdrun.errors import UserError
from sdrun.pipeline import needed_components
from sdrun.serve import contract
from sdrun.serve.contract import config_data_type

PIPELINE = "pipeline"
VERSION = "1"
MODEL_PY = '''"""Triton Python-backend entry point: the {kind} model of sdrun, from the `sdrun` package beside this file."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from sdrun.serve.triton_models import {cls} as TritonPythonModel  # noqa: E402,F401
'''


class ComponentKind(enum.Enum):
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    PYTHON = "python"


def write_repository(bundle_path: Path, out: Path, kind: ComponentKind, instances: int = 1) -> list[str]:
    """The repository for the bundle at `bundle_path` in `out` (which must not exist); returns its models."""
    bundle = open_bundle(bundle_path, lambda manifest: needed_components(manifest, None, img2img=False))
    components = needed_components(bundle.manifest, None, img2img=False)
    if out.exists():
        raise UserError(f"{out} already exists.", fix="choose a new --out, or remove it")
    records = {name: bundle.component(name) for name in components}
    if kind is ComponentKind.TENSORRT:
        engines = {name: _single_engine(bundle, record) for name, record in records.items()}
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for name, record in records.items():
        version = staging / name / VERSION
        version.mkdir(parents=True)
        if kind is ComponentKind.TENSORRT:
            shutil.copyfile(bundle.root / engines[name]["file"], version / "model.plan")
            config = component_config(name, record, kind, instances, engines[name]["profile"])
        else:
            if kind is ComponentKind.PYTHON:
                _python_model(version, "component", "ComponentModel")
                _copy_bundle(bundle, version / "bundle", [name])
            else:
                for file in record.files:
                    if file.endswith((".onnx", ".onnx.data")):
                        shutil.copyfile(bundle.root / file, version / Path(file).name)
            config = component_config(name, record, kind, instances)
        (staging / name / "config.pbtxt").write_text(config)
    version = staging / PIPELINE / VERSION
    version.mkdir(parents=True)
    _python_model(version, "pipeline", "PipelineModel")
    _copy_bundle(bundle, version / "bundle", [])
    backend = "tensorrt" if kind is ComponentKind.TENSORRT else "onnxruntime"
    (staging / PIPELINE / "config.pbtxt").write_text(pipeline_config(components, backend, instances))
    staging.rename(out)
    return [*components, PIPELINE]


def component_config(name: str, record: ComponentRecord, kind: ComponentKind, instances: int,
                     engine_profile: dict | None = None) -> str:
    """config.pbtxt of one component model; dims from the graph's specs, or from the engine's profile."""
    header = {ComponentKind.ONNXRUNTIME: ['platform: "onnxruntime_onnx"'],
              ComponentKind.TENSORRT: ['platform: "tensorrt_plan"'],
              ComponentKind.PYTHON: ['backend: "python"']}[kind]
    device = "KIND_CPU" if kind is ComponentKind.PYTHON else "KIND_GPU"
    inputs = [(spec.name, config_data_type(spec.dtype), _dims(spec, engine_profile)) for spec in record.inputs]
    outputs = [(spec.name, config_data_type(spec.dtype), _dims(spec, None)) for spec in record.outputs]
    return _config(name, header, inputs, outputs, instances, device)


def pipeline_config(components: Sequence[str], backend: str, instances: int) -> str:
    """config.pbtxt of the `pipeline` model: the serve contract's txt2img tensors; the `components` it calls
    and the `backend` they run on (for the PNG parameters)."""
    inputs = [(spec.name, config_data_type(spec.dtype), list(spec.shape), spec.optional)
              for spec in contract.REQUEST_INPUTS]
    outputs = [(spec.name, config_data_type(spec.dtype), list(spec.shape)) for spec in contract.OUTPUTS]
    parameters = [line for key, value in (("components", ",".join(components)), ("backend", backend))
                  for line in ("parameters: {", f'  key: "{key}"', f'  value: {{ string_value: "{value}" }}', "}")]
    return _config(PIPELINE, ['backend: "python"'], inputs, outputs, instances, "KIND_CPU", parameters)


def _config(name: str, header: list[str], inputs: list, outputs: list, instances: int, device: str,
            extra: Sequence[str] = ()) -> str:
    lines = [f'name: "{name}"', *header, "max_batch_size: 0"]
    for field, tensors in (("input", inputs), ("output", outputs)):
        for tensor_name, data_type, dims, *optional in tensors:
            entry = [f'  name: "{tensor_name}"', f"  data_type: {data_type}", f"  dims: [ {', '.join(map(str, dims))} ]"]
            if optional and optional[0]:
                entry.append("  optional: true")
            lines += [f"{field} {{", *entry, "}"]
    lines += ["instance_group [", f"  {{ count: {instances}, kind: {device} }}", "]", *extra]
    return "\n".join(lines) + "\n"


def _dims(spec: TensorSpec, engine_profile: dict | None) -> list[int]:
    """-1 per symbolic axis; with an engine profile (inputs), -1 where min != max, else the profile's value."""
    if engine_profile is None or spec.name not in engine_profile:
        return [d if isinstance(d, int) else -1 for d in spec.dims]
    ranges = engine_profile[spec.name]
    return [low if low == high else -1 for low, high in zip(ranges["min"], ranges["max"])]


def _single_engine(bundle: Bundle, record: ComponentRecord) -> dict:
    if len(record.engines) != 1:
        found = ", ".join(record.engines) or "none"
        raise UserError(f"the {record.name} component of {bundle.root} needs one TensorRT engine for the "
                        f"repository, and it has {len(record.engines)} ({found}).",
                        fix=f"sdcompile build-trt {bundle.root} (one engine per component), or use "
                            "--components onnxruntime")
    return record.engines[next(iter(record.engines))]


def _python_model(version: Path, kind: str, cls: str) -> None:
    import sdrun

    (version / "model.py").write_text(MODEL_PY.format(kind=kind, cls=cls))
    shutil.copytree(Path(sdrun.__file__).parent, version / "sdrun", ignore=shutil.ignore_patterns("__pycache__"))


def _copy_bundle(bundle: Bundle, target: Path, components: Sequence[str]) -> None:
    """A bundle holding only `components` (and the tokenizer), with the source's manifest."""
    files = [bundle.manifest.tokenizer["vocab"], *(f for name in components for f in bundle.component(name).files)]
    for file in files:
        (target / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle.root / file, target / file)
    shutil.copyfile(bundle.root / MANIFEST_NAME, target / MANIFEST_NAME)

