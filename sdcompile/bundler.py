"""`sdcompile export`: models -> verified, optimized ONNX graphs in a bundle directory.

The new bundle is assembled in a staging directory beside the output and swapped in only when
every component has been exported, optimized and verified, so an interrupted export leaves the
previous bundle intact and no half-written files.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from sdcompile.components import component_spec, selected_components
from sdcompile.components.spec import dim_multiples, input_profile, trace_binding, verify_binding
from sdcompile.export import name_io_dims, onnx_from_module, save_model
from sdcompile.fingerprint import models_sha256
from sdcompile.options import ATTENTION_OPSET, DEFAULT_OPSET, AttentionImpl, AttentionTarget, Precision
from sdcompile.passes import default_passes, optimize_model, run_pass
from sdcompile.recipes import Recipe, TokenizerPadding
from sdcompile.verify import verify_graph
from sdcompile.weights import RandomWeights, load_models
from sdrun.bundle import (MANIFEST_NAME, ComponentRecord, Manifest, read_manifest, sha256_file,
                          write_json_atomic)
from sdrun.errors import UserError, stage

TOKENIZER_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
END_OF_TEXT_ID = 49407


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    recipe: Recipe
    source: Path | RandomWeights
    out: Path
    components: tuple[str, ...] = ("all",)
    precision: Precision = Precision.FP32
    opset: int = DEFAULT_OPSET
    attention: AttentionImpl = AttentionImpl.SDPA
    attention_target: AttentionTarget = AttentionTarget.ONNX
    verify: bool = True
    force: bool = False
    seed: int = 0  # seeds the sample inputs used for tracing and verification


def export_bundle(config: ExportConfig, log=print) -> Manifest:
    """Export the selected components of `config.recipe` into the bundle at `config.out`."""
    names = _with_bases(selected_components(config.components), config.recipe)
    check_attention_opset(config.opset, config.attention_target)
    out = Path(config.out)
    previous = _previous_bundle(out, config.force)
    _check_writable(out.parent)
    log(f"loading {config.recipe.name} weights ({_describe_source(config.source)})")
    with stage("loading the weights"):
        models = load_models(config.recipe, config.source, attention=config.attention)
        weights_hash = models_sha256(models)
    source = _source_record(config.source)
    if previous and not config.force:
        _check_same_origin(previous, config.recipe, weights_hash, out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        records = _kept_components(previous, out, staging, names) if previous and not config.force else {}
        for name in names:
            with stage(f"exporting {name}"):
                records[name] = _export_component(name, models, config, staging, records, log)
        manifest = Manifest(recipe=config.recipe, source=source, weights_sha256=weights_hash,
                            tokenizer=_copy_tokenizer(config.recipe, staging), components=records,
                            tools=tool_versions())
        write_json_atomic(staging / MANIFEST_NAME, manifest.to_dict())
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _export_component(name: str, models, config: ExportConfig, staging: Path, records: dict,
                      log) -> ComponentRecord:
    spec = component_spec(name, config.recipe)
    module = spec.wrap(models, config.recipe).eval()
    inputs = spec.sample(config.recipe, trace_binding(config.recipe), torch.Generator().manual_seed(config.seed))
    phases = _PhaseClock(name, log)
    if spec.derived_from:
        model, derivation = run_pass(spec.derived_by, onnx.load(str(staging / spec.derived_from / "model.onnx")))
        name_io_dims(model, spec.inputs, spec.outputs)
        passes = [*records[spec.derived_from].passes, spec.derived_by]
        pass_report = {spec.derived_by: derivation}
        phases.done(f"derived from {spec.derived_from}")
    else:
        model = onnx_from_module(module, inputs, spec.inputs, spec.outputs, dim_multiples(config.recipe),
                                 config.opset)
        phases.done(f"traced (opset {config.opset})")
        passes = default_passes(config.precision)
        model, pass_report = optimize_model(model, passes, attention_target=config.attention_target)
        phases.done(f"passes {', '.join(passes)}")
    directory = staging / name
    directory.mkdir()
    written = save_model(model, directory / "model.onnx")
    del model
    phases.done("saved")
    report = {"export_seconds": phases.total(), "passes": pass_report}
    if config.verify:
        checked = spec.sample(config.recipe, verify_binding(config.recipe), torch.Generator().manual_seed(config.seed + 1))
        report["verification"] = verify_graph(name, module, checked, written[0], config.precision, log)
        phases.done("verified")
    report["phases"] = phases.seconds
    return ComponentRecord(
        name=name, graph=f"{name}/model.onnx",
        files={f"{name}/{p.name}": sha256_file(p) for p in written},
        inputs=spec.inputs, outputs=spec.outputs, profile=input_profile(spec, config.recipe),
        precision=config.precision.value, passes=tuple(passes), report=report)


def check_attention_opset(opset: int, target: AttentionTarget) -> None:
    """The standard Attention operator exists from opset 23; refuse lower before any work."""
    if target is AttentionTarget.ONNX and opset < ATTENTION_OPSET:
        raise UserError(f"opset {opset} is too low for the ONNX Attention target.",
                        expected=f"--opset >= {ATTENTION_OPSET} (the first opset with Attention)", got=str(opset),
                        fix=f"use --opset {ATTENTION_OPSET}, or --attention-target ort-mha for ONNX Runtime's "
                            "com.microsoft.MultiHeadAttention")


class _PhaseClock:
    """Logs each export phase with its wall time and the process's resident memory."""

    def __init__(self, component: str, log):
        self.component, self.log = component, log
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 2)
        self._last = now
        self.log(f"[{self.component}] {phase}: {self.seconds[phase]:.1f} s, {_resident_gib():.1f} GiB resident")

    def total(self) -> float:
        return round(sum(self.seconds.values()), 2)


def _resident_gib() -> float:
    """Current resident set size (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _with_bases(names: list[str], recipe: Recipe) -> list[str]:
    """Derived components need their base exported first (registry order puts it first)."""
    bases = {component_spec(n, recipe).derived_from for n in names} - {None}
    return selected_components([*names, *bases])


def tool_versions() -> dict:
    import onnx
    import onnxruntime

    import sdcompile

    return {"sdcompile": sdcompile.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def _copy_tokenizer(recipe: Recipe, staging: Path) -> dict:
    import open_clip

    source = Path(open_clip.__file__).parent / TOKENIZER_VOCAB
    target = staging / "tokenizer" / TOKENIZER_VOCAB
    target.parent.mkdir()
    shutil.copyfile(source, target)
    pad_id = END_OF_TEXT_ID if recipe.text_encoder.padding is TokenizerPadding.END_TOKEN else 0
    return {"vocab": f"tokenizer/{TOKENIZER_VOCAB}", "sha256": sha256_file(target), "pad_id": pad_id,
            "context_length": recipe.text_encoder.context_length}


def _previous_bundle(out: Path, force: bool) -> Manifest | None:
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory.", fix="choose another --out path")
    if (out / MANIFEST_NAME).is_file():
        try:
            return read_manifest(out)
        except UserError:
            if force:
                return None
            raise
    if any(out.iterdir()) and not force:
        raise UserError(f"output directory {out} is not empty and is not a bundle.",
                        fix="choose an empty or new directory, or pass --force to replace it")
    return None


def _check_same_origin(previous: Manifest, recipe: Recipe, weights_hash: str, out: Path) -> None:
    """Refuse to mix components made from another recipe or other weights into one bundle."""
    if previous.recipe != recipe:
        raise UserError(f"bundle {out} was made from recipe {previous.recipe.name!r}, not {recipe.name!r}.",
                        fix="export into a new directory, or pass --force to replace the bundle")
    if previous.weights_sha256 != weights_hash:
        raise UserError(f"bundle {out} was made from other weights ({_describe_source_record(previous.source)}).",
                        expected=f"weights sha256 {previous.weights_sha256[:16]}…",
                        got=f"weights sha256 {weights_hash[:16]}…",
                        fix="export into a new directory, or pass --force to replace the bundle")


def _kept_components(previous: Manifest, out: Path, staging: Path, replaced: list[str]) -> dict:
    """Hard-link (or copy) the components that this export does not replace."""
    kept = {}
    for name, record in previous.components.items():
        if name in replaced:
            continue
        for relative in {**record.files, **{e["file"]: None for e in record.engines.values() if "file" in e}}:
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(out / relative, target)
        kept[name] = record
    return kept


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _swap_in(staging: Path, out: Path) -> None:
    if not out.exists():
        os.replace(staging, out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, retired / out.name)
    os.replace(staging, out)
    shutil.rmtree(retired, ignore_errors=True)


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output location {directory}: {err.strerror}.",
                        fix="choose a writable --out path") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UserError(f"output location {directory} is not writable.", fix="choose a writable --out path")


def _source_record(source: Path | RandomWeights) -> dict:
    if isinstance(source, RandomWeights):
        return {"kind": "random", "seed": source.seed}
    return {"kind": "checkpoint", "path": str(Path(source).resolve())}


def _describe_source(source: Path | RandomWeights) -> str:
    return _describe_source_record(_source_record(source))


def _describe_source_record(record: dict) -> str:
    return f"random weights, seed {record['seed']}" if record["kind"] == "random" else record["path"]
