"""`make bench`: a backend this machine lacks is "not run" with the reason; one it has that fails is a
failure (exit 1 with the reason), never skipped."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from benchmarks import harness
from benchmarks.config import EngineSet
from sdrun.backends.cuda_stack import DriverInfo
from sdrun.backends.tensorrt import TensorRTProbe, probe_tensorrt
from sdrun.errors import UserError


def test_absent_tensorrt_is_not_run_with_the_reason():
    if probe_tensorrt().present:
        pytest.skip("TensorRT and a GPU are here: the benchmark runs TensorRT on this machine")
    sets, skipped = harness.available_engine_sets()
    assert all(s.backend != "tensorrt" for s in sets)
    assert any(s.startswith("tensorrt: not run: ") and "pip install" in s for s in skipped), skipped


def test_tensorrt_counts_as_present_only_when_installed_beside_a_gpu():
    problem = UserError("cuda-bindings 13.0.1 is built for CUDA 13, and this machine's driver supports only CUDA 12.4")
    gpu, no_gpu = DriverInfo(12040, 1), DriverInfo(None, 0, "no NVIDIA driver")
    assert TensorRTProbe(None, None, problem, driver=gpu, installed=True).present
    assert not TensorRTProbe(None, None, problem, driver=no_gpu, installed=True).present
    assert not TensorRTProbe(None, None, problem, driver=gpu, installed=False).present


def test_an_engine_build_that_fails_is_a_failure(tiny_bundle):
    """Here the build fails for want of TensorRT; on a GPU machine any build error takes the same path."""
    if probe_tensorrt().problem is None:
        pytest.skip("TensorRT builds engines here: no failing build to report")
    try:
        harness.build_tensorrt_engines([EngineSet("tensorrt", "fp32")], {"fp32": tiny_bundle}, ("unet",),
                                       log=lambda line: None)
    except harness.BackendFailure as failure:
        assert str(failure).startswith("tensorrt fp32: engine build failed: ") and "TensorRT" in str(failure)
    else:
        raise AssertionError("a failed engine build was not reported as a failure")


def test_a_failing_backend_exits_1_with_the_reason(monkeypatch):
    from benchmarks.__main__ import main

    def failing():
        raise harness.BackendFailure("tensorrt: installed beside a GPU but unusable: cuda-bindings 13.0.1 ...")

    monkeypatch.setattr(harness, "available_engine_sets", failing)
    result = CliRunner().invoke(main, ["--steps", "1", "--repeats", "1"])
    assert result.exit_code == 1
    assert "benchmark FAILED: tensorrt: installed beside a GPU but unusable" in result.stderr
