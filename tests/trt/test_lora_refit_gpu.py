"""A LoRA swapped into TensorRT engines by refitting them: the same image as ONNX Runtime's swap, and a
non-refittable engine refused with the rebuild command.

Needs TensorRT, CUDA Python and an NVIDIA GPU (the `gpu` marker); skipped with the reason elsewhere.
"""
from __future__ import annotations

import pytest

from sdrun.errors import UserError
from sdrun.gates import tensorrt_gate
from sdrun.lora import LoraRequest
from sdrun.metrics import compare
from tests.lora.lora_files import peft_lora_file
from tests.trt.engine_bundles import engine_bundle

pytestmark = pytest.mark.gpu
COMPONENTS = ("text_encoder", "unet", "vae_decoder")


def images(bundle, backend: str, lora):
    from sdrun.pipeline import GenerationRequest
    from sdrun.session import load_pipeline

    loaded = load_pipeline(bundle, backend, step_fusion=False, loras=[LoraRequest(lora, 0.8)])
    return loaded.pipeline.generate(GenerationRequest("a lighthouse on a cliff at dawn", steps=4, seed=1)).decoded


def test_refit_equals_the_onnxruntime_swap(tiny_bundle, tiny_recipe, tmp_path):
    bundle = engine_bundle(tiny_bundle, tmp_path, COMPONENTS, refittable=True)
    lora = peft_lora_file(tiny_recipe, tmp_path / "lora.safetensors", seed=3)
    statistics = compare(images(bundle, "onnxruntime", lora), images(bundle, "tensorrt", lora), 2.0).to_dict()
    verdict = tensorrt_gate("images", "fp32", tf32=False).judge("refit vs onnxruntime", statistics)
    assert verdict.passed, verdict.describe()


def test_a_lora_on_an_engine_built_without_refit_is_refused(tiny_bundle, tiny_recipe, tmp_path):
    bundle = engine_bundle(tiny_bundle, tmp_path, COMPONENTS)
    lora = peft_lora_file(tiny_recipe, tmp_path / "lora.safetensors", seed=3)
    with pytest.raises(UserError, match="--refittable"):
        images(bundle, "tensorrt", lora)
