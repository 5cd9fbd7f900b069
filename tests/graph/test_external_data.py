"""Graphs whose weights stay on disk: spill, embed and save keep every tensor's bytes; past 2 GiB end to end."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdcompile.graph.external import (ALIGNMENT, data_file_of, external_info, load_structure, save_graph,
                                      spill)


def linear_stack(widths: list[int], seed: int = 0) -> onnx.ModelProto:
    """y = x @ W_0 @ W_1 ...: one float32 initializer per layer, (w_i, w_{i+1}), plus a tiny bias."""
    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array((rng.standard_normal((a, b), dtype=np.float32) / np.sqrt(a)).astype(np.float32),
                                       f"w{i}")
               for i, (a, b) in enumerate(zip(widths, widths[1:]))]
    bias = numpy_helper.from_array(np.full(widths[-1], 0.5, np.float32), "bias")  # small: stays in the graph
    names = ["x", *[f"h{i}" for i in range(len(weights) - 1)], "z"]
    nodes = [helper.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]]) for i in range(len(weights))]
    nodes.append(helper.make_node("Add", ["z", "bias"], ["y"]))
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", widths[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", widths[-1]])],
                              [*weights, bias])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def arrays(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_spill_writes_large_tensors_aligned_and_keeps_small_ones_in_the_graph(tmp_path):
    model = linear_stack([64, 32, 16])
    expected = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    written = spill(model, tmp_path / "model.onnx", None)
    assert written == [tmp_path / "model.onnx", data_file_of(tmp_path / "model.onnx")]
    structure = load_structure(tmp_path / "model.onnx")
    external = {t.name: external_info(t) for t in structure.graph.initializer if t.external_data}
    assert sorted(external) == ["w0", "w1"]  # the 64-byte bias stays in the graph
    assert all(int(info["offset"]) % ALIGNMENT == 0 for info in external.values())
    got = arrays(tmp_path / "model.onnx")
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_respilling_from_one_directory_to_another_copies_external_bytes(tmp_path):
    model = linear_stack([64, 32, 16])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    spill(model, tmp_path / "a" / "model.onnx", None)
    expected = arrays(tmp_path / "a" / "model.onnx")
    structure = load_structure(tmp_path / "a" / "model.onnx")
    spill(structure, tmp_path / "b" / "model.onnx", tmp_path / "a", threshold=4096)  # w1 (2 KiB) now embedded
    moved = load_structure(tmp_path / "b" / "model.onnx")
    assert [t.name for t in moved.graph.initializer if t.external_data] == ["w0"]
    got = arrays(tmp_path / "b" / "model.onnx")
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="overwrite its own source"):
        spill(load_structure(tmp_path / "b" / "model.onnx"), tmp_path / "b" / "model.onnx", tmp_path / "b")


@pytest.mark.parametrize("always_external", [False, True])
def test_save_graph_embeds_below_the_protobuf_limit_unless_told(tmp_path, always_external):
    (tmp_path / "work").mkdir()
    spill(linear_stack([64, 32, 16]), tmp_path / "work" / "model.onnx", None)
    expected = arrays(tmp_path / "work" / "model.onnx")
    written = save_graph(load_structure(tmp_path / "work" / "model.onnx"), tmp_path / "model.onnx", tmp_path / "work",
                         always_external)
    assert len(written) == (2 if always_external else 1)
    got = arrays(tmp_path / "model.onnx")
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_a_graph_past_two_gib_round_trips_through_passes_inspect_and_onnxruntime(tmp_path):
    """2.06 GiB of float32 weights: written external, optimized on disk (cleanup, then fp16), inspected and
    run on ONNX Runtime against numpy."""
    import onnxruntime as ort
    from click.testing import CliRunner

    from sdcompile.cli import cli
    from sdcompile.passes import optimize_on_disk

    widths = [4096] + [16384, 4096] * 4 + [4096]  # 9 layers of 64 MiB .. 256 MiB
    model = linear_stack(widths)
    expected_bytes = sum(t.ByteSize() for t in model.graph.initializer)
    assert expected_bytes > 2 * 1024**3
    source = tmp_path / "source"
    source.mkdir()
    spill(model, source / "model.onnx", None)
    del model
    x = np.random.default_rng(1).standard_normal((2, widths[0]), dtype=np.float32)
    expected = x
    for i, w in sorted(arrays(source / "model.onnx").items()):
        if i.startswith("w"):
            expected = expected @ w
    expected = expected + 0.5

    for passes, tolerance in ((["cleanup"], 1e-4), (["cleanup", "fp16"], 5e-2)):
        out = tmp_path / "-".join(passes)
        out.mkdir()
        optimized, _, data_dir = optimize_on_disk(source / "model.onnx", passes, out / "work")
        written = save_graph(optimized, out / "model.onnx", data_dir)
        assert len(written) == (2 if passes == ["cleanup"] else 1)  # fp16 halves it below the limit
        session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": x})[0]
        error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert error < tolerance, f"{passes}: rel L2 {error:.3g}"
        del session
        inspected = CliRunner().invoke(cli, ["inspect", str(out / "model.onnx")])
        assert inspected.exit_code == 0, inspected.output
