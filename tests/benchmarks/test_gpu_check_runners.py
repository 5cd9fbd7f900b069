"""The GPU check's code paths on CPU: every runner it builds, built the same way, with CPU providers; the
torch anchor on the tiny recipe on the CPU; and the exit status without a GPU.

A signature drift between the GPU check and the backend registry fails here, in every CI run,
instead of on the first machine with a GPU.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_parts import Status
from sdrun.bundle import read_manifest

GPU_CHECK = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_every_runner_the_gpu_check_builds_runs_on_cpu(tiny_bundle):
    from benchmarks.gpu_check import CPU_REFERENCE, accuracy_table, compare_components, latency_table

    results = compare_components(tiny_bundle, repeats=1, candidate="onnxruntime", options=CPU_REFERENCE)
    assert {r.name for r in results} == set(read_manifest(tiny_bundle).components)
    failed = [v.describe() for r in results for v in r.verdicts.values() if not v.passed]
    assert not failed, failed
    assert "| unet |" in accuracy_table(results) and "| unet |" in latency_table(results)


def test_the_torch_anchor_runs_the_same_code_on_the_cpu():
    """The sd15 UNet on CUDA in the real check; the tiny twin on the CPU here, same functions."""
    from benchmarks.gpu_torch_anchor import AnchorConfig, torch_anchor_part

    part = torch_anchor_part(AnchorConfig(recipe="tiny", device="cpu", dtype="fp16", repeats=2, warmup=1))
    assert part.status is Status.PASSED, part.checks
    assert part.measurements["latency"]["calls"] == 2 and part.measurements["latency"]["median_ms"] > 0
    assert part.measurements["accuracy"]["precision"] == "fp16"
    assert [c.name for c in part.checks] == ["fp16 vs fp32 on cpu", "UNet call, latents 2x4x8x8"]


def test_without_a_gpu_the_gpu_check_exits_2_and_says_why(tmp_path):
    from sdrun.backends.cuda_stack import read_driver

    report = tmp_path / "report.json"
    finished = subprocess.run([sys.executable, str(GPU_CHECK), "--out", str(report)], capture_output=True,
                              text=True, timeout=600)
    if read_driver().device_count:
        assert finished.returncode in (0, 1), finished.stderr[-2000:]
        assert report.is_file()
    else:
        assert finished.returncode == 2, finished.stderr[-2000:]
        assert "cannot check the GPU paths" in finished.stderr and "no NVIDIA driver" in finished.stderr
        assert not report.exists()
