"""Quality signals: the black/saturated rule on synthetic images, and a copy of the tiny bundle whose VAE
decoder always answers −1 makes `sdrun txt2img` warn and the served model's black counter rise."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from sdrun.quality import QualityCounter, Signal, image_signal, prometheus_text

SIDE = 16


def test_black_saturated_and_ordinary_images():
    rng = np.random.default_rng(0)
    ordinary = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    black = np.full((SIDE, SIDE, 3), 2, np.uint8)
    white = np.full((SIDE, SIDE, 3), 255, np.uint8)
    noise = (rng.integers(0, 2, (SIDE, SIDE, 3)) * 255).astype(np.uint8)
    almost_black = black.copy()
    almost_black[:4] = 128  # 25% of the pixels lit: not black
    assert [image_signal(i) for i in (ordinary, black, white, noise, almost_black)] == [
        None, Signal.BLACK, Signal.SATURATED, Signal.SATURATED, None]


def test_the_counter_speaks_prometheus():
    counter = QualityCounter()
    counter.add([Signal.BLACK, None, Signal.BLACK])
    text = prometheus_text(counter, "txt2img")
    assert 'sdrun_images_total{model="txt2img"} 3' in text
    assert 'sdrun_image_quality_total{model="txt2img",signal="black"} 2' in text
    assert 'sdrun_image_quality_total{model="txt2img",signal="saturated"} 0' in text


def constant_decoder(scale: int) -> onnx.ModelProto:
    """latent (B, 4, h, w) -> images (B, 3, scale·h, scale·w), every value −1 (black once decoded)."""
    constants = [helper.make_tensor("starts", TensorProto.INT64, (1,), [0]),
                 helper.make_tensor("ends", TensorProto.INT64, (1,), [3]),
                 helper.make_tensor("axes", TensorProto.INT64, (1,), [1]),
                 helper.make_tensor("scales", TensorProto.FLOAT, (4,), [1, 1, scale, scale]),
                 helper.make_tensor("zero", TensorProto.FLOAT, (), [0.0]),
                 helper.make_tensor("one", TensorProto.FLOAT, (), [1.0])]
    nodes = [helper.make_node("Slice", ["latent", "starts", "ends", "axes"], ["rgb"]),
             helper.make_node("Resize", ["rgb", "", "scales"], ["large"], mode="nearest"),
             helper.make_node("Mul", ["large", "zero"], ["zeros"]),
             helper.make_node("Sub", ["zeros", "one"], ["images"])]
    graph = helper.make_graph(nodes, "black", [helper.make_tensor_value_info("latent", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, None)], constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.fixture(scope="module")
def black_bundle(tiny_bundle, tmp_path_factory):
    from sdrun.bundle import MANIFEST_NAME, read_manifest, sha256_file

    bundle = tmp_path_factory.mktemp("black") / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    graph = bundle / "vae_decoder" / "model.onnx"
    for stale in graph.parent.glob("model.onnx*"):
        stale.unlink()
    onnx.save_model(constant_decoder(read_manifest(bundle).recipe.vae_scale), str(graph))
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest["components"]["vae_decoder"]["files"] = {
        name: sha256_file(bundle / name) for name in manifest["components"]["vae_decoder"]["files"]
        if (bundle / name).exists()} | {"vae_decoder/model.onnx": sha256_file(graph)}
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    return bundle


def test_a_black_image_raises_the_served_counter_and_warns(black_bundle, tmp_path):
    from sdrun.generate import GenerateJob, run_job
    from sdrun.pipeline import GenerationRequest
    from sdrun.serve.contract import TXT2IMG
    from sdrun.serve.model import PipelineModel
    from sdrun.session import load_pipeline

    loaded = load_pipeline(black_bundle, "onnxruntime")
    model = PipelineModel(TXT2IMG, loaded.pipeline.bundle, [loaded.pipeline], "onnxruntime", 1, 0.0)
    try:
        model.checked_batch(loaded.pipeline, [GenerationRequest("a lighthouse", steps=1)])
    finally:
        model.close()
    assert model.quality.snapshot() == {"images": 1, "non_finite": 0, "black": 1, "saturated": 0}

    lines = []
    run_job(GenerateJob(bundle=black_bundle, prompt="a lighthouse", out=tmp_path / "out.png", steps=1,
                        backend="onnxruntime", quiet=True), echo=lines.append)
    assert any(line.startswith("warning: image 0: the image is black") for line in lines)
