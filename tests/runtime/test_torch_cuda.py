"""The torch backend on a CUDA device against the same backend on the CPU, same weights and inputs.

fp32 on CUDA (TF32 off) must meet the fp32 gates of `sdrun.gates`, fp16 the fp16 gates. (bf16 has no
gate of its own; on the CPU it is held to the fp16 gates in `test_torch_device.py`.) Skipped only where
torch sees no CUDA device; any CUDA error fails.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdrun import gates
from sdrun.backends import BackendOptions
from sdrun.errors import USAGE_EXIT_CODE
from sdrun.metrics import compare
from tests.runtime.test_torch_device import component_feeds, runners_on, sdrun, txt2img

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason=f"torch {torch.__version__} sees no CUDA device "
                                        f"(built for CUDA {torch.version.cuda or 'none: a CPU build'})")]


@pytest.fixture(scope="module")
def cpu_outputs(tiny_bundle) -> dict[str, dict[str, np.ndarray]]:
    runners = runners_on(tiny_bundle, BackendOptions())
    return {name: {k: v.copy() for k, v in runners[name].run(feeds).items()}
            for name, feeds in component_feeds(tiny_bundle).items()}


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_every_component_on_cuda_matches_the_cpu_within_its_gate(tiny_bundle, cpu_outputs, dtype):
    runners = runners_on(tiny_bundle, BackendOptions(device="cuda", dtype=dtype))
    for name, feeds in component_feeds(tiny_bundle).items():
        outputs = runners[name].run(feeds)
        for output, reference in cpu_outputs[name].items():
            assert outputs[output].dtype == reference.dtype and outputs[output].shape == reference.shape
            verdict = gates.check_output(f"torch cuda {dtype} {name}", output, reference, outputs[output], dtype)
            assert verdict.passed, verdict.describe()


def test_fp32_on_cuda_runs_without_tf32_and_restores_the_settings(tiny_bundle):
    seen = []
    runner = runners_on(tiny_bundle, BackendOptions(device="cuda"))["vae_decoder"]
    hook = runner.module.register_forward_pre_hook(
        lambda module, args: seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)))
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        runner.run(component_feeds(tiny_bundle)["vae_decoder"])
    finally:
        hook.remove()
    assert seen == [(False, False)]
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_txt2img_on_cuda_fp16_matches_the_cpu(tiny_bundle, tmp_path, capsys):
    for name, extra in (("cpu", ()), ("cuda", ("--device", "cuda", "--dtype", "fp16"))):
        code, err = sdrun(capsys, *txt2img(tiny_bundle, tmp_path / f"{name}.png", "--backend", "torch", *extra))
        assert code == 0, err
    images = [np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.float64) / 255.0 for name in ("cpu", "cuda")]
    stats = compare(images[0], images[1], data_range=gates.UNIT_RANGE).to_dict()
    verdict = gates.pipeline_image_gate("fp16").judge("torch cuda fp16 txt2img", stats)
    assert verdict.passed, verdict.describe()


def test_a_device_index_beyond_the_visible_ones_is_refused(tiny_bundle, tmp_path, capsys):
    missing = f"cuda:{torch.cuda.device_count()}"
    code, err = sdrun(capsys, *txt2img(tiny_bundle, tmp_path / "x.png", "--backend", "torch", "--device", missing))
    assert code == USAGE_EXIT_CODE and f"there is no CUDA device {torch.cuda.device_count()}" in err
