"""Tiny hand-built ONNX graphs and an ONNX Runtime runner for the graph-pass tests."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

BATCH, SEQ, CONTEXT_SEQ, HEADS, HEAD_DIM = 2, 6, 7, 2, 4
WIDTH = HEADS * HEAD_DIM


def run_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def relative_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    expected = expected.astype(np.float64)
    return float(np.linalg.norm(actual.astype(np.float64) - expected) / np.linalg.norm(expected))


def model_of(graph: gs.Graph) -> onnx.ModelProto:
    return gs.export_onnx(graph)


def _const(name: str, values: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(values, name)


def causal_mask(size: int) -> np.ndarray:
    """(size, size): −inf strictly above the diagonal, 0 elsewhere."""
    return np.triu(np.full((size, size), -np.inf, dtype=np.float32), 1)


def attention_model(*, cross: bool = False, causal: bool = False, mask: str | None = None,
                    scale_style: str = "mul", opset: int = 18, seed: int = 0) -> onnx.ModelProto:
    """x (B, S, WIDTH) [, context (B, Sc, WIDTH)] -> explicit two-head attention -> (B, S, WIDTH).

    scale_style: "mul" (scores·(1/√d)), "div" (scores / √d), "sqrt_both" (Q·d^-¼ and Kᵀ·d^-¼,
    the form torch's exporter writes below opset 23). mask: None, "constant" (a fixed additive
    bias (S, Sk)) or "input" (a graph input (B, 1, S, Sk)).
    """
    rng = np.random.default_rng(seed)
    kv_seq = CONTEXT_SEQ if cross else SEQ
    source = "context" if cross else "x"
    inits = [_const(f"w_{p}", rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * 0.5)
             for p in "qkv"]
    inits += [_const("split_heads", np.array([0, 0, HEADS, HEAD_DIM], np.int64)),
              _const("merge_heads", np.array([0, 0, WIDTH], np.int64))]
    nodes = []
    for p, src, perm in (("q", "x", [0, 2, 1, 3]), ("k", source, [0, 2, 3, 1]),
                         ("v", source, [0, 2, 1, 3])):
        nodes += [helper.make_node("MatMul", [src, f"w_{p}"], [f"{p}_proj"], name=f"{p}_matmul"),
                  helper.make_node("Reshape", [f"{p}_proj", "split_heads"], [f"{p}_bshd"]),
                  helper.make_node("Transpose", [f"{p}_bshd"], [f"{p}_heads"], perm=perm)]
    q, kt = "q_heads", "k_heads"
    if scale_style == "sqrt_both":
        inits.append(_const("sqrt_scale", np.array(HEAD_DIM ** -0.25, np.float32)))
        nodes += [helper.make_node("Mul", ["q_heads", "sqrt_scale"], ["q_scaled"]),
                  helper.make_node("Mul", ["k_heads", "sqrt_scale"], ["k_scaled"])]
        q, kt = "q_scaled", "k_scaled"
    nodes.append(helper.make_node("MatMul", [q, kt], ["qk"], name="qk_matmul"))
    scores = "qk"
    if scale_style in ("mul", "div"):
        value = HEAD_DIM ** -0.5 if scale_style == "mul" else HEAD_DIM ** 0.5
        inits.append(_const("scale", np.array([value], np.float32)))
        nodes.append(helper.make_node(scale_style.capitalize(), ["qk", "scale"], ["scores"]))
        scores = "scores"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, SEQ, WIDTH])]
    if cross:
        inputs.append(helper.make_tensor_value_info("context", TensorProto.FLOAT,
                                                    [BATCH, CONTEXT_SEQ, WIDTH]))
    if causal or mask is not None:
        if causal:
            inits.append(_const("mask", causal_mask(SEQ)))
        elif mask == "constant":
            inits.append(_const("mask", rng.standard_normal((SEQ, kv_seq)).astype(np.float32)))
        else:
            inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT,
                                                        [BATCH, 1, SEQ, kv_seq]))
        nodes.append(helper.make_node("Add", [scores, "mask"], ["masked"]))
        scores = "masked"
    nodes += [helper.make_node("Softmax", [scores], ["probs"], axis=-1, name="softmax"),
              helper.make_node("MatMul", ["probs", "v_heads"], ["attended"], name="pv_matmul"),
              helper.make_node("Transpose", ["attended"], ["attended_bshd"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["attended_bshd", "merge_heads"], ["y"])]
    graph = helper.make_graph(nodes, "attention", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)


def attention_feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for graph_input in model.graph.input:
        dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
        feeds[graph_input.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def toy_unet(opset: int = 23) -> onnx.ModelProto:
    """latent = 0.5·sample + t/1000 + mean over (tokens, channels) of the context, per batch item."""
    nodes = [
        helper.make_node("Mul", ["sample", "half"], ["scaled"]),
        helper.make_node("Div", ["timestep", "thousand"], ["t_scaled"]),
        helper.make_node("ReduceMean", ["encoder_hidden_states", "axes"], ["ctx_mean"], keepdims=1),
        helper.make_node("Unsqueeze", ["ctx_mean", "last"], ["ctx4"]),
        helper.make_node("Add", ["scaled", "t_scaled"], ["with_t"]),
        helper.make_node("Add", ["with_t", "ctx4"], ["latent"]),
    ]
    inits = [helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
             helper.make_tensor("thousand", TensorProto.FLOAT, [], [1000.0]),
             helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
             helper.make_tensor("last", TensorProto.INT64, [1], [3])]
    graph = helper.make_graph(
        nodes, "toy_unet",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["cfg_batch", 4, "h", "w"]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["cfg_batch", 77, 8])],
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["cfg_batch", 4, "h", "w"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
