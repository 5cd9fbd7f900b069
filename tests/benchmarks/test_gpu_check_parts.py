"""The GPU check's pure pieces: part results, the exit status, the table and the JSON report, the
bit-exact comparison of the CUDA-buffer part, and TensorRT "not run" where it is not installed."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

from benchmarks.gpu_cuda_buffers import random_array, same_bits
from benchmarks.gpu_parts import (FAILED_EXIT, NO_GPU_EXIT, Check, PartResult, Status, exit_code, run_part,
                                  summary_table, write_report)

PASSED = PartResult.from_checks("cuda buffers", [Check("round trip", True, "6/6 bit-exact")])
FAILED = PartResult.from_checks("torch cuda", [Check("fp16 vs fp32", False, "cosine 0.98"), Check("timed", True)])
NOT_RUN = PartResult("tensorrt", Status.NOT_RUN, "TensorRT is not installed")


def test_a_part_fails_when_any_check_fails_or_none_ran():
    assert PASSED.status is Status.PASSED and PASSED.reason == ""
    assert FAILED.status is Status.FAILED and FAILED.reason == "failed: fp16 vs fp32"
    assert PartResult.from_checks("empty", []).status is Status.FAILED


def test_exit_status_two_without_gpu_one_on_any_failure_zero_otherwise():
    assert exit_code(False, []) == NO_GPU_EXIT
    assert exit_code(True, [PASSED, NOT_RUN]) == 0
    assert exit_code(True, [PASSED, FAILED, NOT_RUN]) == FAILED_EXIT


def test_an_exception_is_a_failed_part_with_its_reason(capsys):
    def broken():
        raise RuntimeError("cudaErrorIllegalAddress\nsecond line")

    result = run_part("cuda buffers", broken, log=lambda line: None)
    assert result.status is Status.FAILED and result.reason == "RuntimeError: cudaErrorIllegalAddress second line"
    assert result.seconds >= 0 and "Traceback" in capsys.readouterr().err


def test_table_and_json_report_name_every_part_and_check(tmp_path):
    parts = [PASSED, FAILED, NOT_RUN]
    table = summary_table(parts)
    assert "| cuda buffers | round trip | pass | 6/6 bit-exact |" in table
    assert "| torch cuda | fp16 vs fp32 | FAIL | cosine 0.98 |" in table
    assert "| tensorrt | — | not run | TensorRT is not installed |" in table
    path = write_report(tmp_path / "out" / "report.json", {"driver": "x"}, parts, exit_code(True, parts))
    report = json.loads(path.read_text())
    assert report["exit_code"] == FAILED_EXIT and report["environment"] == {"driver": "x"}
    assert [(p["name"], p["status"]) for p in report["parts"]] == [
        ("cuda buffers", "passed"), ("torch cuda", "failed"), ("tensorrt", "not run")]
    assert report["parts"][1]["checks"][0] == {"name": "fp16 vs fp32", "passed": False, "detail": "cosine 0.98"}


def test_round_trip_data_covers_every_bit_and_a_flipped_bit_is_caught():
    data = random_array((2, 77, 768), "float16", np.random.default_rng(0))
    assert data.shape == (2, 77, 768) and data.dtype == np.float16
    assert np.unique(data.view(np.uint8)).size == 256  # every byte value, NaN patterns included
    copy = data.copy()
    assert same_bits(data, copy)
    copy.reshape(-1).view(np.uint8)[12345] ^= 0x01
    assert not same_bits(data, copy)


def test_tensorrt_part_is_not_run_where_tensorrt_is_not_installed():
    from tests.trt.test_trt_missing import BLOCK_IMPORTS

    code = """
    from benchmarks.gpu_check import TensorRTCheck, tensorrt_part
    part = tensorrt_part(TensorRTCheck(None, "fp16", False, 1))
    print(part.status.value, "|", part.reason)
    """
    script = BLOCK_IMPORTS.format(blocked={"tensorrt"}) + textwrap.dedent(code)
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    status, reason = finished.stdout.strip().split(" | ", 1)
    assert status == "not run", finished.stderr[-2000:]
    assert "TensorRT is required" in reason and "pip install 'sdcompile[tensorrt-cu1" in reason
