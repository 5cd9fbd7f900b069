"""`sdcompile inspect`: what a bundle or an ONNX file contains, as plain data and as text."""
from __future__ import annotations

from pathlib import Path

from sdrun.bundle import MANIFEST_NAME, read_manifest


def inspect_path(path: Path) -> dict:
    """Summary of a bundle directory (per component) or of one .onnx file."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return _inspect_bundle(path)
    return {"kind": "onnx", "path": str(path), **_inspect_graph(path)}


def _inspect_bundle(bundle: Path) -> dict:
    manifest = read_manifest(bundle)
    components = {}
    for name, record in manifest.components.items():
        summary = _inspect_graph(bundle / record.graph, _declared_fp32(record), _range_islands(record))
        summary["precision"]["declared"] = record.precision
        components[name] = {"passes": list(record.passes), "profile": record.profile,
                            "engines": list(record.engines), **summary,
                            "io": {"inputs": [t.to_dict() for t in record.inputs],
                                   "outputs": [t.to_dict() for t in record.outputs]}}
    return {"kind": "bundle", "path": str(bundle), "recipe": manifest.recipe.name, "source": manifest.source,
            "weights_sha256": manifest.weights_sha256, "tools": manifest.tools, "components": components}


def _inspect_graph(graph: Path, fp32_node_names=(), ranges=None) -> dict:
    """`fp32_node_names`: nodes declared fp32 beyond the default islands (e.g. the step-fusion update);
    `ranges`: what the range finder kept at export (`fp16_policy.RangeIslands`)."""
    from sdcompile.graph.fp16_policy import Fp16Options
    from sdcompile.inspection.summary import graph_summary
    from sdcompile.graph.external import inside
    from sdcompile.optimize import load_onnx

    graph = Path(graph).resolve()  # read from inside its own directory
    with inside(graph.parent):  # the weights stay in their data file; what is read, is read from there
        summary = graph_summary(load_onnx(graph, with_data=False),
                                Fp16Options(keep_fp32_node_names=frozenset(fp32_node_names), ranges=ranges))
    summary["size_bytes"] = sum(p.stat().st_size for p in _graph_files(graph))
    return summary


def _declared_fp32(record) -> list[str]:
    """Nodes a pass declared fp32 on purpose (the step-fusion update), beyond the default islands."""
    return record.report.get("passes", {}).get("step-fusion", {}).get("fp32_node_names", [])


def _range_islands(record):
    """What the range finder kept when the fp16 pass ran (None: it did not run)."""
    from sdcompile.graph.fp16_policy import RangeIslands

    ranges = record.report.get("passes", {}).get("fp16", {}).get("precision", {}).get("ranges")
    return None if ranges is None else RangeIslands.from_dict(ranges)


def _graph_files(graph: Path) -> list[Path]:
    data = graph.with_name(graph.name + ".data")
    return [graph, data] if data.exists() else [graph]


def format_summary(summary: dict) -> str:
    if summary["kind"] == "onnx":
        return _format_graph(Path(summary["path"]).name, summary)
    lines = [f"bundle {summary['path']}: recipe {summary['recipe']}, weights {_source(summary['source'])}"]
    for name, component in summary["components"].items():
        lines.append("")
        lines.append(_format_graph(name, component))
        lines.append(f"  passes: {', '.join(component['passes'])}; engines: {', '.join(component['engines']) or 'none'}")
    return "\n".join(lines)


def _format_graph(name: str, s: dict) -> str:
    attention, precision = s["attention"], s["precision"]
    io = s.get("io") or {"inputs": s["inputs"], "outputs": s["outputs"]}
    lines = [f"{name}: {s['nodes']} nodes, {s['size_bytes'] / 2**20:.1f} MiB on disk, opsets {s['opsets']}"]
    for kind in ("inputs", "outputs"):
        for t in io[kind]:
            dims = t.get("dims", t.get("shape"))
            lines.append(f"  {kind[:-1]:6s} {t['name']}: {t['dtype']} {dims}")
    top = sorted(s["ops"].items(), key=lambda kv: -kv[1])[:12]
    lines.append("  ops: " + ", ".join(f"{op} {n}" for op, n in top))
    lines.append(f"  attention: {attention['fused']} fused, {attention['unfused']} unfused "
                 f"(self {attention['unfused_self']}, cross {attention['unfused_cross']}, "
                 f"causal {attention['unfused_causal']})")
    outside = precision["fp32_outside_islands"]
    if precision["fp16_nodes"]:
        lines.append(f"  compute: {precision['fp16_nodes']} fp16 nodes, {precision['fp32_nodes']} fp32 nodes "
                     f"({precision['fp32_island_nodes']} in fp32 islands, {len(outside)} outside)")
    else:
        lines.append(f"  compute: {precision['fp32_nodes']} fp32 nodes (an fp32 graph)")
    if precision.get("ranges") is not None:
        lines += [f"  {line}" for line in _describe_ranges(precision["ranges"])]
    return "\n".join(lines)


def _describe_ranges(ranges: dict) -> list[str]:
    from sdcompile.graph.fp16_policy import RangeIslands
    from sdcompile.inspection.fp16_audit import describe_ranges

    return describe_ranges(RangeIslands.from_dict(ranges))


def _source(source: dict) -> str:
    return f"random, seed {source['seed']}" if source["kind"] == "random" else source["path"]
