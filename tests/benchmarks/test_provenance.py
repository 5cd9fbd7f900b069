"""The stamp every results file carries: code, date, versions, threads and machine load."""
from __future__ import annotations

import json
import re
import subprocess

from PIL import Image

from benchmarks import provenance

STAMP_FIELDS = {"commit", "dirty", "changed_paths", "date_utc", "finished_utc", "versions", "threads", "machine"}
LIBRARIES = {"python", "numpy", "torch", "onnx", "onnxruntime", "diffusers", "transformers", "tensorrt"}
UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def test_stamp_names_code_date_versions_threads_and_load():
    stamp = provenance.finished(provenance.started(), threads=None)

    assert set(stamp) == STAMP_FIELDS
    assert re.fullmatch(r"[0-9a-f]{40}", stamp["commit"]) and isinstance(stamp["dirty"], bool)
    assert re.fullmatch(UTC, stamp["date_utc"]) and stamp["finished_utc"] >= stamp["date_utc"]
    assert set(stamp["versions"]) == LIBRARIES and stamp["versions"]["numpy"]
    assert set(stamp["threads"]) == {"requested", "onnxruntime_intra_op", "onnxruntime_intra_op_from",
                                     "torch_intra_op", "env"}
    assert stamp["threads"]["onnxruntime_intra_op"] >= 1
    assert {"OMP_NUM_THREADS", "MKL_NUM_THREADS"} <= set(stamp["threads"]["env"])
    machine = stamp["machine"]
    assert {"cpu", "cores", "memory_total_mib", "load_average_before", "load_average_after"} <= set(machine)
    assert len(machine["load_average_before"]) == len(machine["load_average_after"]) == 3
    json.dumps(stamp)  # plain data


def test_commit_is_head_or_unknown_outside_git(tmp_path):
    head = subprocess.run(["git", "-C", str(provenance.REPOSITORY), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert provenance.git_state(provenance.REPOSITORY)["commit"] == head
    assert provenance.git_state(tmp_path) == {"commit": "unknown", "dirty": None, "changed_paths": []}


def test_given_threads_are_what_onnxruntime_uses():
    threads = provenance.thread_settings(1)
    assert threads["requested"] == threads["onnxruntime_intra_op"] == 1
    assert threads["onnxruntime_intra_op_from"] == "--threads"


def test_png_carries_the_stamp_and_stays_readable(tmp_path):
    path = tmp_path / "chart.png"
    Image.new("RGB", (4, 3), "white").save(path)
    stamp = provenance.finished(provenance.started(), threads=2)

    provenance.stamp_png(path, stamp)

    with Image.open(path) as image:
        image.load()
        assert image.size == (4, 3) and json.loads(image.text[provenance.PNG_KEYWORD]) == stamp


def test_markdown_lines_state_commit_threads_and_load():
    stamp = provenance.finished(provenance.started(), threads=None)
    text = "\n".join(provenance.summary_lines(stamp))
    assert stamp["commit"] in text and "ONNX Runtime intra-op" in text and "load average" in text
