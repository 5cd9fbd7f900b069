"""`sdcompile export`: models -> verified, optimized ONNX graphs in a bundle directory, in little more
memory than the largest model's weights.

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
import torch

from sdcompile.components import COMPONENTS, component_spec, selected_components
from sdcompile.components.spec import ComponentSpec, dim_multiples, input_profile, trace_binding, verify_binding
from sdcompile.export import name_io_dims, trace_to_file
from sdcompile.fingerprint import WeightsDigest
from sdcompile.graph.external import inside, load_structure, save_graph, spill
from sdcompile.memory import peak_gib, resident_gib, return_freed_memory
from sdcompile.options import ATTENTION_OPSET, DEFAULT_OPSET, AttentionImpl, AttentionTarget, Precision
from sdcompile.graph.fp16_policy import Fp16Options
from sdcompile.passes import PassOptions, default_passes, optimize_on_disk, run_pass
from sdcompile.recipes import Recipe, TokenizerPadding
from sdcompile.verify import eager_outputs, verify_graph
from sdcompile.weights import RandomWeights, load_models
from sdcompile.weight_map import FILE_NAME as WEIGHT_MAP
from sdcompile.weight_map import WeightSource, final_map, traced_sources, write_weight_map
from sdcompile.weights.layout import Component, recipe_components
from sdcompile.weights.lora_merge import LoraMerge
from sdrun.bundle import (MANIFEST_NAME, ComponentRecord, Manifest, read_manifest, sha256_file,
                          write_json_atomic)
from sdrun.errors import UserError, stage
from sdrun.lora import LoraRequest

TOKENIZER_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
END_OF_TEXT_ID = 49407
WORK_DIR = ".work"  # inside the staging directory: traced graphs and pass steps, removed before the swap


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
    external_data: bool = False  # always write weights to model.onnx.data (else only past protobuf's 2 GiB)
    seed: int = 0  # seeds the sample inputs used for tracing and verification
    loras: tuple[LoraRequest, ...] = ()  # merged into the UNet and text encoder as they load
    fp32_islands: tuple[str, ...] = ()  # fp16: node names kept in fp32 besides the policy's (--fp32-islands)
    # fp16: False drops the policy's op-type islands and the range finder, leaving only `fp32_islands` (a test
    # option, hidden --no-fp32-islands: it makes graphs whose fp16 errors `sdcompile debug precision` finds)
    default_fp32_islands: bool = True


def export_bundle(config: ExportConfig, log=print) -> Manifest:
    """Export the selected components of `config.recipe` into the bundle at `config.out`.

    One model's weights are in memory at a time (UNet, VAE, text encoders in `HASHED_COMPONENTS`
    order, hashed as they load): its components' eager reference outputs are computed and their
    graphs traced to disk, the model is freed, and only then do the passes, the save and ONNX
    Runtime's verification run, on graphs whose weights stay in external-data files. LoRAs are merged
    into each model as it loads, so the hash and the graphs are of the merged weights.
    """
    names = _with_bases(selected_components(config.components, config.recipe), config.recipe)
    check_attention_opset(config.opset, config.attention_target)
    with stage("reading the LoRAs"):
        loras = LoraMerge(config.loras, config.recipe)
    out = Path(config.out)
    previous = _previous_bundle(out, config.force)
    _check_writable(out.parent)
    merging = previous is not None and not config.force
    if merging:
        _check_same_origin(previous, config.recipe, _weights_sha256(config, loras, log), out)
    # Absolute: passes run inside their data directories (`graph.external.inside`).
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent)).resolve()
    try:
        records = _kept_components(previous, out, staging, names) if merging else {}
        digest = _digest(config.recipe)
        for part in digest.parts:
            group = [n for n in names if component_spec(n, config.recipe).model.value == part]
            records.update(_export_model(part, group, config, loras, staging, digest, records, log))
        shutil.rmtree(staging / WORK_DIR, ignore_errors=True)
        manifest = Manifest(recipe=config.recipe, source=_source_record(config.source),
                            weights_sha256=digest.hexdigest(), tokenizer=_copy_tokenizer(config.recipe, staging),
                            components={n: records[n] for n in COMPONENTS if n in records}, tools=tool_versions(),
                            loras=loras.records())
        write_json_atomic(staging / MANIFEST_NAME, manifest.to_dict())
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _digest(recipe: Recipe) -> WeightsDigest:
    return WeightsDigest(tuple(c.value for c in recipe_components(recipe)))


def _load_model(part: str, config: ExportConfig, loras: LoraMerge, log):
    log(f"loading the {config.recipe.name} {part} weights ({_describe_source(config.source)})")
    with stage("loading the weights"):
        models = load_models(config.recipe, config.source, attention=config.attention, parts=(Component(part),))
    with stage("merging the LoRAs"):
        loras.apply_(models, Component(part))
    return models


def _weights_sha256(config: ExportConfig, loras: LoraMerge, log) -> str:
    """The bundle's weights hash (LoRAs merged), each model loaded, hashed and freed in turn."""
    digest = _digest(config.recipe)
    for part in digest.parts:
        digest.add(part, _load_model(part, config, loras, log).component(Component(part)).state_dict())
        return_freed_memory()
    return digest.hexdigest()


@dataclasses.dataclass
class _Traced:
    """A component between its eager phase and its graph phase."""

    spec: ComponentSpec
    phases: _PhaseClock
    checked: dict | None  # verification inputs (None: --no-verify)
    references: tuple[np.ndarray, ...] | None  # eager outputs on them
    graph: Path | None  # the traced graph; None for a derived component
    sources: dict[str, WeightSource] | None  # the traced graph's initializers' checkpoint tensors


def _export_model(part: str, names: list[str], config: ExportConfig, loras: LoraMerge, staging: Path,
                  digest: WeightsDigest, records: dict, log) -> dict[str, ComponentRecord]:
    """Load one model, hash it, take its components' eager outputs and traces, free it, then finish
    each component on disk."""
    models = _load_model(part, config, loras, log)
    digest.add(part, models.component(Component(part)).state_dict())
    traced = {}
    # Derived components (no trace of their own) first: their eager references then run before any trace
    # leaves the exporter's allocations behind on top of the model.
    for name in sorted(names, key=lambda n: not component_spec(n, config.recipe).derived_from):
        with stage(f"exporting {name}"):
            traced[name] = _eager_phase(name, models, config, staging / WORK_DIR / name, log)
    del models
    return_freed_memory()
    done, optimized = {}, {}
    for name in names:
        with stage(f"exporting {name}"):
            done[name], optimized[name] = _graph_phase(traced.pop(name), config, staging, optimized,
                                                       {**records, **done}, log)
    return done


def _eager_phase(name: str, models, config: ExportConfig, work: Path, log) -> _Traced:
    """Everything that needs the eager model: reference outputs for verification and the trace."""
    spec = component_spec(name, config.recipe)
    module = spec.wrap(models, config.recipe).eval()
    phases = _PhaseClock(name, log)
    checked = references = None
    if config.verify:
        checked = _verification_inputs(spec, config)
        references = eager_outputs(module, checked)
        phases.done("eager reference")
    graph = None
    if not spec.derived_from:
        inputs = spec.sample(config.recipe, trace_binding(config.recipe), torch.Generator().manual_seed(config.seed))
        graph = work / "traced" / "model.onnx"
        graph.parent.mkdir(parents=True)
        trace_to_file(module, inputs, spec.inputs, spec.outputs, dim_multiples(config.recipe), graph, config.opset)
        phases.done(f"traced (opset {config.opset})")
        sources = traced_sources(module, models.component(spec.model), models.prefixes[spec.model], graph)
        return _Traced(spec, phases, checked, references, graph, sources)
    return _Traced(spec, phases, checked, references, None, None)


def _graph_phase(traced: _Traced, config: ExportConfig, staging: Path, optimized: dict[str, tuple], records: dict,
                 log) -> tuple[ComponentRecord, tuple[Path, dict]]:
    """Passes (or the derivation), save and verification of a traced component; returns its record and what
    a derived component starts from: the optimized graph on disk (weights external) and its weight sources."""
    spec, phases, sources = traced.spec, traced.phases, traced.sources
    phases.resume()
    if spec.derived_from:
        base, sources = optimized[spec.derived_from]
        with inside(base.parent):
            model, derivation = run_pass(spec.derived_by, load_structure(base))
        name_io_dims(model, spec.inputs, spec.outputs)
        source_dir = staging / WORK_DIR / spec.name / "derived"
        source_dir.mkdir(parents=True)
        spill(model, source_dir / "model.onnx", base.parent)
        passes = [*records[spec.derived_from].passes, spec.derived_by]
        pass_report = {spec.derived_by: derivation}
        phases.done(f"derived from {spec.derived_from}")
    else:
        passes = default_passes(config.precision)
        model, pass_report, source_dir = optimize_on_disk(traced.graph, passes, traced.graph.parent.parent / "passes",
                                                          PassOptions(fp16=fp16_options(config)),
                                                          attention_target=config.attention_target,
                                                          range_samples=_range_samples(traced, config))
        phases.done(f"passes {', '.join(passes)}")
    directory = staging / spec.name
    directory.mkdir()
    weight_map = final_map(model, sources)
    checked = source_dir / "model.onnx"  # the same tensors as the bundle's graph, in external-data form
    written = save_graph(model, directory / "model.onnx", source_dir, config.external_data)
    written.append(write_weight_map(weight_map, directory / WEIGHT_MAP))
    del model
    phases.done("saved")
    report = {"export_seconds": phases.total(), "passes": pass_report,
              "weight_map": {"file": f"{spec.name}/{WEIGHT_MAP}", "mapped": len(weight_map["initializers"]),
                             "unmapped": len(weight_map["unmapped"])}}
    if config.verify:
        report["verification"] = verify_graph(spec.name, traced.references, traced.checked, checked,
                                              config.precision, log)
        phases.done("verified")
    report["phases"] = phases.seconds
    record = ComponentRecord(
        name=spec.name, graph=f"{spec.name}/model.onnx",
        files={f"{spec.name}/{p.name}": sha256_file(p) for p in written},
        inputs=spec.inputs, outputs=spec.outputs, profile=input_profile(spec, config.recipe),
        precision=config.precision.value, passes=tuple(passes), report=report)
    return record, (source_dir / "model.onnx", sources)


def _verification_inputs(spec: ComponentSpec, config: ExportConfig) -> dict:
    return spec.sample(config.recipe, verify_binding(config.recipe), torch.Generator().manual_seed(config.seed + 1))


def fp16_options(config: ExportConfig) -> Fp16Options:
    """The fp16 pass's islands: the policy's plus `config.fp32_islands`, or those alone."""
    named = frozenset(config.fp32_islands)
    if config.default_fp32_islands:
        return Fp16Options(keep_fp32_node_names=named)
    return Fp16Options(keep_fp32_op_types=frozenset(), keep_fp32_node_names=named,
                       keep_fp32_upstream_of=frozenset())


def _range_samples(traced: _Traced, config: ExportConfig) -> dict[str, np.ndarray] | None:
    """The fp16 range finder's inputs: the verification inputs (made for it alone under --no-verify)."""
    if config.precision is not Precision.FP16 or not config.default_fp32_islands:
        return None
    checked = traced.checked if traced.checked is not None else _verification_inputs(traced.spec, config)
    return {k: v.numpy() for k, v in checked.items()}


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
        self.log(f"[{self.component}] {phase}: {self.seconds[phase]:.1f} s, {resident_gib():.1f} GiB resident "
                 f"(peak {peak_gib():.1f} GiB)")

    def resume(self) -> None:
        """The next phase starts now: the time since the last one was other components' work."""
        self._last = time.perf_counter()

    def total(self) -> float:
        return round(sum(self.seconds.values()), 2)


def _with_bases(names: list[str], recipe: Recipe) -> list[str]:
    """Derived components need their base exported first (registry order puts it first)."""
    bases = {component_spec(n, recipe).derived_from for n in names} - {None}
    return selected_components([*names, *bases], recipe)


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
    pad_id = END_OF_TEXT_ID if recipe.text_encoder.padding is TokenizerPadding.END_TOKEN else 0  # encoder 1's
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
