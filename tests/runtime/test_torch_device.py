"""The torch backend's device and dtype on the CPU: fp32 on the CPU is the default, fp16 and bf16 stay
within the fp16 gates of eager fp32, and --device/--dtype are refused where they cannot apply.

The CUDA side is in `test_torch_cuda.py` (gpu marker).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.gpu_check import sample_feeds
from sdrun import gates
from sdrun.backends import BackendOptions, make_runners
from sdrun.bundle import open_bundle
from sdrun.errors import USAGE_EXIT_CODE
from tests.sdrun_exit import sdrun


def runners_on(bundle, options: BackendOptions) -> dict:
    opened = open_bundle(bundle)
    return make_runners("torch", opened, sorted(opened.verified), options)


def component_feeds(bundle) -> dict[str, dict[str, np.ndarray]]:
    opened = open_bundle(bundle)
    feeds = {}
    for name in sorted(opened.verified):
        record = opened.component(name)
        shapes = {n: levels["opt"] for n, levels in record.profile.items()}
        feeds[name] = sample_feeds(record, shapes, opened.recipe.text_encoder.vocab_size, np.random.default_rng(0))
    return feeds


@pytest.fixture(scope="module")
def fp32_outputs(tiny_bundle) -> dict[str, dict[str, np.ndarray]]:
    runners = runners_on(tiny_bundle, BackendOptions())
    return {name: {k: v.copy() for k, v in runners[name].run(f).items()}
            for name, f in component_feeds(tiny_bundle).items()}


def txt2img(bundle, out, *extra):
    return ["txt2img", "--bundle", bundle, "--prompt", "a red cube", "--steps", 2, "--quiet", "--out", out, *extra]


def test_fp32_on_the_cpu_is_the_default(tiny_bundle, tmp_path, capsys):
    assert sdrun(capsys, *txt2img(tiny_bundle, tmp_path / "default.png", "--backend", "torch"))[0] == 0
    explicit = txt2img(tiny_bundle, tmp_path / "explicit.png", "--backend", "torch", "--device", "cpu", "--dtype", "fp32")
    assert sdrun(capsys, *explicit)[0] == 0
    pixels = [np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("default", "explicit")]
    np.testing.assert_array_equal(pixels[0], pixels[1])


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precisions_on_the_cpu_stay_within_the_fp16_gates(tiny_bundle, fp32_outputs, dtype):
    runners = runners_on(tiny_bundle, BackendOptions(device="cpu", dtype=dtype))
    assert next(iter(runners.values())).placement.dtype == getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype])
    for name, feeds in component_feeds(tiny_bundle).items():
        outputs = runners[name].run(feeds)
        for output, reference in fp32_outputs[name].items():
            assert outputs[output].dtype == reference.dtype, f"{name}.{output}: outputs keep the manifest's dtype"
            verdict = gates.check_output(f"torch {dtype} {name}", output, reference, outputs[output], "fp16")
            assert verdict.passed, verdict.describe()


def test_device_and_dtype_need_the_torch_backend(tiny_bundle, tmp_path, capsys):
    for backend in ("onnxruntime", "auto"):
        code, err = sdrun(capsys, *txt2img(tiny_bundle, tmp_path / "x.png", "--backend", backend, "--dtype", "fp16"))
        assert code == USAGE_EXIT_CODE and "--backend torch" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_cuda_without_a_gpu_is_refused_with_the_fix(tiny_bundle, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: tests/runtime/test_torch_cuda.py runs there")
    code, err = sdrun(capsys, *txt2img(tiny_bundle, tmp_path / "x.png", "--backend", "torch", "--device", "cuda"))
    assert code == USAGE_EXIT_CODE and "--device cuda needs an NVIDIA GPU" in err and "--device cpu" in err
    assert f"torch {torch.__version__}" in err and "Traceback" not in err


def test_unknown_devices_are_refused(tiny_bundle, tmp_path, capsys):
    for device, expected in (("gpu0", "unknown torch device"), ("meta", "not 'meta'")):
        code, err = sdrun(capsys, *txt2img(tiny_bundle, tmp_path / "x.png", "--backend", "torch", "--device", device))
        assert code == USAGE_EXIT_CODE and expected in err and "cpu | cuda | cuda:N" in err
