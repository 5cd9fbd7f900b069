"""TensorRT engine build: each component's ONNX graph in a bundle -> an engine file beside it.

Networks are strongly typed, so every tensor keeps the precision the ONNX graph gives it (fp16
comes from our fp16 pass, never from a builder flag), and fp32 stays fp32: TF32 is off unless
asked for. Attention reaches the parser decomposed (MatMul-Softmax-MatMul, which every TensorRT
10 parses and fuses itself) unless the fused `Attention` graph is asked for (parser >= 10.14).
One optimization profile per engine, from
the recipe's shape ranges (`sdcompile.trt_profiles`). Engines are named by TensorRT version and
GPU compute capability and recorded in the manifest (`sdrun.engine_files`); engine, timing
cache and manifest are written to temp files and renamed into place.

The only module on the compile side that imports `tensorrt`, and only when a build starts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from sdcompile.trt_profiles import ShapeRequest, check_profile_against_graph, is_static, profile_from_request
from sdrun.atomic import write_atomic
from sdrun.backends.tensorrt import ATTENTION_TENSORRT, require_tensorrt
from sdrun.bundle import (MANIFEST_NAME, ComponentRecord, Manifest, read_manifest, verify_component_files,
                          write_json_atomic)
from sdrun.engine_files import EngineRecord, capability_text, engine_path, manifest_with_engine, version_tuple
from sdrun.errors import UserError

if TYPE_CHECKING:
    import tensorrt as trt


class AttentionPath(enum.Enum):
    """The attention the ONNX parser is fed."""

    DECOMPOSED = "decomposed"  # MatMul-Softmax-MatMul (passes/unfused_attention.py): every TensorRT 10
    FUSED = "fused"  # the bundle's ONNX Attention nodes as they are: TensorRT >= 10.14


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How engines are built; `None` means TensorRT's default."""

    shapes: ShapeRequest = ShapeRequest()
    timing_cache: Path | None = None  # loaded when the file exists, written after each engine
    optimization_level: int | None = None  # builder optimization level 0..5 (TensorRT's default: 3)
    max_workspace: int | None = None  # bytes of scratch a layer may use while building (default: all)
    # Decomposed until a GPU run shows TensorRT's Attention importer building and matching.
    attention: AttentionPath = AttentionPath.DECOMPOSED
    tf32: bool = False  # let fp32 matrix products and convolutions round their inputs to TF32
    refittable: bool = False  # weights can be replaced after the build (a LoRA at run time), `trt.Refitter`


@dataclasses.dataclass(frozen=True)
class BuildRequest:
    bundle: Path
    components: tuple[str, ...] = ("all",)
    options: BuildOptions = BuildOptions()


@dataclasses.dataclass(frozen=True)
class BuildTarget:
    """The TensorRT and GPU an engine is built by and for."""

    tensorrt_version: str
    compute_capability: tuple[int, int]
    device: str


@dataclasses.dataclass(frozen=True)
class GraphInfo:
    """What the builder needs to know about an ONNX graph before parsing it."""

    input_dims: dict  # input name -> dims (int where fixed, str or None where dynamic)
    op_types: frozenset


def build_engines(request: BuildRequest, log: Callable[[str], None] = print) -> Manifest:
    """Build (or rebuild) the engines of the requested components and record them in the manifest."""
    trt, cuda = require_tensorrt()
    bundle = Path(request.bundle)
    manifest = read_manifest(bundle)
    names = components_to_build(manifest, request.components)
    recipe = manifest.recipe
    profiles = {n: profile_from_request(recipe, manifest.components[n].inputs, request.options.shapes) for n in names}
    target = BuildTarget(trt.__version__, cuda.compute_capability(), cuda.device_name())
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    for n in names:
        checked_graph(bundle, manifest.components[n], profiles[n], trt.__version__, request.options.attention)
    cache = None
    for name in names:
        kind = "static" if is_static(profiles[name]) else "dynamic"
        log(f"[{name}] building a TensorRT {target.tensorrt_version} engine for sm "
            f"{capability_text(target.compute_capability)} ({kind} shapes, "
            f"{request.options.attention.value} attention)")
        started = time.perf_counter()
        with parser_graph(bundle, manifest.components[name], request.options.attention) as graph:
            check_parser_supports(trt.__version__, graph_info_from_onnx(graph), name)
            serialized, cache = engine_from_onnx(trt, builder, logger, graph, profiles[name], request.options,
                                                 cache, log)
        seconds = round(time.perf_counter() - started, 2)
        relative = engine_path(name, target.tensorrt_version, target.compute_capability)
        digest = write_bytes_atomic(bundle / relative, serialized)
        log(f"[{name}] wrote {relative} ({serialized.nbytes / 2**20:.1f} MiB) in {seconds:.1f} s")
        built = engine_record(relative, digest, target, manifest.components[name], profiles[name], seconds,
                              request.options)
        manifest = manifest_with_engine(manifest, name, built)
        write_json_atomic(bundle / MANIFEST_NAME, manifest.to_dict())
        if request.options.timing_cache is not None:
            write_bytes_atomic(request.options.timing_cache, cache.serialize())
    return manifest


def components_to_build(manifest: Manifest, requested: tuple[str, ...]) -> list[str]:
    """`all` means every component in the bundle; names keep the manifest's order."""
    present = list(manifest.components)
    if not requested or "all" in requested:
        return present
    unknown = [n for n in requested if n not in manifest.components]
    if unknown:
        raise UserError(f"the bundle has no component {unknown[0]!r}.", expected=" | ".join([*present, "all"]),
                        got=unknown[0], fix="pick a component the bundle has, or export it first")
    return [n for n in present if n in requested]


def checked_graph(bundle: Path, record: ComponentRecord, profile: dict, tensorrt_version: str,
                  attention: AttentionPath) -> Path:
    """The component's ONNX path, once its files match the manifest and it can take `profile`
    (and, fed fused, this TensorRT's parser reads its operators: refused before any build starts)."""
    verify_component_files(bundle, record)
    graph = bundle / record.graph
    info = graph_info_from_onnx(graph)
    check_profile_against_graph(record.name, profile, info.input_dims)
    if attention is AttentionPath.FUSED:
        check_parser_supports(tensorrt_version, info, record.name)
    return graph


@contextlib.contextmanager
def parser_graph(bundle: Path, record: ComponentRecord, attention: AttentionPath) -> Iterator[Path]:
    """The ONNX file TensorRT parses for `record`, valid inside the `with` block.

    Fused, or with no fused attention to take apart: the bundle's graph itself. Decomposed: the
    graph after the unfuse-attention pass, written without loading its external weights to a
    hidden temporary file beside the bundle's graph, so the weights' relative paths still
    resolve (nothing is copied), and deleted when the block ends, however it ends. A file
    that outlives its build cannot be taken for a current one: it has a random name and is
    not in the manifest.
    """
    import onnx

    from sdcompile.graph.attention_match import FUSED_ATTENTION_OPS
    from sdcompile.graph.external import inside
    from sdcompile.passes import run_pass

    graph = Path(bundle) / record.graph
    model = None if attention is AttentionPath.FUSED else onnx.load(str(graph), load_external_data=False)
    if model is None or not any((n.domain, n.op_type) in FUSED_ATTENTION_OPS for n in model.graph.node):
        yield graph
        return
    with inside(graph.parent):  # any weight the pass reads, it reads from the graph's data file
        decomposed, _ = run_pass("unfuse-attention", model)
    del model
    handle, name = tempfile.mkstemp(prefix=f".{graph.stem}.decomposed-", suffix=".onnx", dir=graph.parent)
    os.close(handle)
    path = Path(name)
    try:
        onnx.save_model(decomposed, str(path))
        del decomposed
        yield path
    finally:
        path.unlink(missing_ok=True)


def engine_from_onnx(trt, builder: trt.Builder, logger: trt.ILogger, graph: Path, profile: dict,
                     options: BuildOptions, cache: trt.ITimingCache | None,
                     log) -> tuple[trt.IHostMemory, trt.ITimingCache]:
    """(serialized engine, timing cache): parse, configure and build one graph.

    `cache` carries tactic timings from one component's build to the next; `None` starts from
    the options' timing-cache file (or empty).
    """
    network, parser = network_from_onnx(trt, builder, logger, graph)
    config = config_from_options(trt, builder, options, profile)
    if cache is None:
        cache = timing_cache_from_file(config, options.timing_cache, log)
    if not config.set_timing_cache(cache, False):
        log("the timing cache was made by another TensorRT or GPU; starting a fresh one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    serialized = engine_from_network(builder, network, config, graph.parent.name)
    del network, parser
    return serialized, cache


def engine_record(relative: str, digest: str, target: BuildTarget, record: ComponentRecord, profile: dict,
                  seconds: float, options: BuildOptions) -> EngineRecord:
    return EngineRecord(file=relative, sha256=digest, tensorrt_version=target.tensorrt_version,
                        compute_capability=capability_text(target.compute_capability), profile=profile,
                        onnx_sha256=dict(record.files), build_seconds=seconds, static=is_static(profile),
                        builder={"device": target.device, "optimization_level": options.optimization_level,
                                 "max_workspace": options.max_workspace, "attention": options.attention.value,
                                 "tf32": options.tf32, "refittable": options.refittable})


def graph_info_from_onnx(path: Path) -> GraphInfo:
    """Input dims and operator types, read without loading external weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}  # old IR versions list weights among the inputs
    dims = {value.name: tuple(_dim(d) for d in value.type.tensor_type.shape.dim)
            for value in model.graph.input if value.name not in weights}
    ops = {node.op_type for node in model.graph.node}
    ops |= {node.op_type for function in model.functions for node in function.node}
    return GraphInfo(dims, frozenset(ops))


def check_parser_supports(tensorrt_version: str, info: GraphInfo, component: str) -> None:
    """The standard ONNX Attention operator needs TensorRT's parser from 10.14 on (`info`: the graph fed)."""
    if "Attention" in info.op_types and version_tuple(tensorrt_version) < ATTENTION_TENSORRT:
        needed = ".".join(map(str, ATTENTION_TENSORRT))
        raise UserError(f"{component}: the graph fed to the parser uses the ONNX Attention operator, which "
                        f"TensorRT {tensorrt_version}'s ONNX parser does not support.",
                        expected=f"TensorRT >= {needed}", got=tensorrt_version,
                        fix=f"build with --attention decomposed, or upgrade TensorRT: pip install -U 'tensorrt>={needed}'")


def network_flags(trt) -> int:
    """Strongly typed networks: TensorRT 10 asks for it by flag; from 11 on every network is (flag deprecated)."""
    if version_tuple(trt.__version__)[0] >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def network_from_onnx(trt, builder: trt.Builder, logger: trt.ILogger,
                      path: Path) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """(network, parser); parsing from the file lets TensorRT find external weight files beside it.

    The parser owns the weights' memory: keep it alive until the engine is built.
    """
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = "\n".join(f"    {parser.get_error(i)}" for i in range(parser.num_errors))
        raise UserError(f"TensorRT {trt.__version__} could not parse {path}:\n{errors}",
                        fix="check the TensorRT version (the Attention operator needs >= "
                            f"{'.'.join(map(str, ATTENTION_TENSORRT))}; --attention decomposed avoids it) "
                            "and the graph with `sdcompile inspect`")
    return network, parser


def profile_from_shapes(builder: trt.Builder, shapes: dict) -> trt.IOptimizationProfile:
    """One optimization profile: per input name, {"min", "opt", "max"} shapes."""
    profile = builder.create_optimization_profile()
    for name, levels in shapes.items():
        profile.set_shape(name, tuple(levels["min"]), tuple(levels["opt"]), tuple(levels["max"]))
    return profile


def config_from_options(trt, builder: trt.Builder, options: BuildOptions, shapes: dict) -> trt.IBuilderConfig:
    config = builder.create_builder_config()
    # TF32 (on by default) rounds the inputs of fp32 matrix products and convolutions to 10-bit mantissas
    # (BuilderFlag.TF32 docs). Strong typing fixes tensor types, not how fp32 products are computed:
    # TensorRT 11, where every network is strongly typed, removed the type-choosing flags (FP16, BF16, INT8,
    # FP8, INT4, FP4; 10.x-to-11.x migration guide) and still lists TF32, "enabled by default". So it applies
    # to strongly typed networks; cleared for every graph: fp32 graphs, and the fp32 islands of fp16 graphs.
    if not options.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if options.refittable:  # REFIT, not REFIT_IDENTICAL: a LoRA brings different weights
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.max_workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.max_workspace)
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    if config.add_optimization_profile(profile_from_shapes(builder, shapes)) < 0:
        raise UserError(f"TensorRT rejected the optimization profile {shapes}.",
                        fix="check --min/--opt/--max: every min <= opt <= max")
    return config


def timing_cache_from_file(config: trt.IBuilderConfig, path: Path | None, log) -> trt.ITimingCache:
    """The cache stored at `path` when there is one, else an empty cache."""
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None and data:
        log(f"the timing cache {path} could not be read; starting a fresh one")
        cache = config.create_timing_cache(b"")
    return cache


def engine_from_network(builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig,
                        component: str) -> trt.IHostMemory:
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT could not build the {component} engine (see the TensorRT errors above).",
                        fix="lower --max batch/height/width, allow more --max-workspace, or build with --static")
    return serialized


def write_bytes_atomic(path: Path, data) -> str:
    """Write a buffer to a temp file beside `path`, then rename over it; returns its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    view = memoryview(data)
    write_atomic(path, lambda temp: temp.write_bytes(view))
    return hashlib.sha256(view).hexdigest()


def _dim(dim) -> int | str | None:
    if dim.HasField("dim_value"):
        return dim.dim_value
    return dim.dim_param or None
