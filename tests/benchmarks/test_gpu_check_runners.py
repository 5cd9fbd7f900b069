"""The GPU check's code paths on CPU: every runner it builds, built the same way, with CPU providers.

A signature drift between the GPU check and the backend registry fails here, in every CI run,
instead of on the first machine with a GPU.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sdrun.bundle import read_manifest

GPU_CHECK = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_every_runner_the_gpu_check_builds_runs_on_cpu(tiny_bundle):
    from benchmarks.gpu_check import CPU_REFERENCE, accuracy_table, compare_components, latency_table

    results = compare_components(tiny_bundle, repeats=1, candidate="onnxruntime", options=CPU_REFERENCE)
    assert {r.name for r in results} == set(read_manifest(tiny_bundle).components)
    failed = [v.describe() for r in results for v in r.verdicts.values() if not v.passed]
    assert not failed, failed
    assert "| unet |" in accuracy_table(results) and "| unet |" in latency_table(results)


def test_without_tensorrt_the_gpu_check_exits_2_and_says_why():
    from sdrun.backends.tensorrt import tensorrt_available

    available, _ = tensorrt_available()
    finished = subprocess.run([sys.executable, str(GPU_CHECK)], capture_output=True, text=True, timeout=300)
    if available:
        assert finished.returncode in (0, 1), finished.stderr[-2000:]
    else:
        assert finished.returncode == 2 and "cannot check the TensorRT path" in finished.stderr
