"""The graph `build-trt` hands TensorRT's ONNX parser, checked without TensorRT: decomposed
attention by default, the bundle's own graph with `--attention fused`."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from benchmarks.gpu_check import sample_feeds
from sdcompile.cli_trt import build_trt_command
from sdcompile.graph.attention_match import FUSED_ATTENTION_OPS
from sdcompile.trt import AttentionPath, check_parser_supports, graph_info_from_onnx, parser_graph
from sdrun.backends.tensorrt import ATTENTION_TENSORRT, MIN_TENSORRT
from sdrun.bundle import read_manifest
from sdrun.errors import UserError
from sdrun.metrics import relative_l2

# The same float32 arithmetic in the same order once ONNX Runtime folds the scale into the MatMul
# (tests/passes/test_pass_unfuse_attention.py).
PARITY_RTOL_L2 = 1e-6


def _version(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version)) + ".0"


def _fused_ops(path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    return [n.op_type for n in model.graph.node if (n.domain, n.op_type) in FUSED_ATTENTION_OPS]


def _outputs(path, feeds) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _feeds(manifest, record) -> dict[str, np.ndarray]:
    shapes = {n: levels["opt"] for n, levels in record.profile.items()}
    return sample_feeds(record, shapes, manifest.recipe.text_encoder.vocab_size, np.random.default_rng(0))


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_decomposed_graphs_have_no_attention_node_and_the_bundles_outputs(tiny_bundle):
    manifest = read_manifest(tiny_bundle)
    for name, record in manifest.components.items():
        graph = tiny_bundle / record.graph
        before = _listing(graph.parent)
        with parser_graph(tiny_bundle, record, AttentionPath.DECOMPOSED) as fed:
            assert fed.parent == graph.parent and fed.name.startswith(".") and fed != graph
            assert _fused_ops(graph) and not _fused_ops(fed), name
            check_parser_supports(_version(MIN_TENSORRT), graph_info_from_onnx(fed), name)
            feeds = _feeds(manifest, record)
            for actual, expected in zip(_outputs(fed, feeds), _outputs(graph, feeds)):
                assert relative_l2(expected, actual) <= PARITY_RTOL_L2, name
        assert _listing(graph.parent) == before, f"{name}: the parser's graph outlived the build"


def test_fused_feeds_the_bundles_graph_which_needs_the_attention_parser(tiny_bundle):
    record = read_manifest(tiny_bundle).components["text_encoder"]
    with parser_graph(tiny_bundle, record, AttentionPath.FUSED) as fed:
        assert fed == tiny_bundle / record.graph
        info = graph_info_from_onnx(fed)
    older = _version((ATTENTION_TENSORRT[0], ATTENTION_TENSORRT[1] - 1))
    with pytest.raises(UserError, match="Attention operator") as caught:
        check_parser_supports(older, info, "text_encoder")
    assert "--attention decomposed" in caught.value.fix
    check_parser_supports(_version(ATTENTION_TENSORRT), info, "text_encoder")


def test_external_weights_stay_where_they_are(tiny_bundle, tmp_path):
    """Past 2 GiB a graph keeps its weights in `model.onnx.data`: the parser's graph points at
    that same file (relative to its folder), so nothing is copied."""
    manifest = read_manifest(tiny_bundle)
    record = manifest.components["unet"]
    bundle = tmp_path / "bundle"
    (bundle / "unet").mkdir(parents=True)
    model = onnx.load(str(tiny_bundle / record.graph))
    onnx.save_model(model, str(bundle / record.graph), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    weights = bundle / "unet" / "model.onnx.data"
    before = (_listing(bundle / "unet"), weights.stat().st_mtime_ns)
    with parser_graph(bundle, record, AttentionPath.DECOMPOSED) as fed:
        assert not _fused_ops(fed) and fed.stat().st_size < weights.stat().st_size / 10
        feeds = _feeds(manifest, record)
        for actual, expected in zip(_outputs(fed, feeds), _outputs(tiny_bundle / record.graph, feeds)):
            assert relative_l2(expected, actual) <= PARITY_RTOL_L2
    assert (_listing(bundle / "unet"), weights.stat().st_mtime_ns) == before


def test_the_parsers_graph_is_removed_when_the_build_fails(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    record = read_manifest(bundle).components["vae_decoder"]
    before = _listing(bundle / "vae_decoder")
    with pytest.raises(RuntimeError, match="builder failed"):
        with parser_graph(bundle, record, AttentionPath.DECOMPOSED) as fed:
            assert fed.is_file()
            raise RuntimeError("builder failed")
    assert _listing(bundle / "vae_decoder") == before


def test_build_trt_offers_both_attention_paths_and_tf32():
    result = CliRunner().invoke(build_trt_command, ["--help"])
    assert result.exit_code == 0
    assert "[decomposed|fused]" in result.output and "default: decomposed" in result.output
    assert "--tf32" in result.output
