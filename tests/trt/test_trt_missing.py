"""Without TensorRT: clear messages, exit code 2, and a fallback reason for `--backend auto`; and which
extra fits which driver, and packages built for a newer CUDA than the driver, named as such.

Each check runs in a fresh interpreter whose import system refuses `tensorrt` (and, where
named, `cuda`), so the result is the same on a machine that has TensorRT installed.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import tomllib
from pathlib import Path

import pytest

from sdrun.backends.cuda_stack import (EXTRAS, CudaPackage, DriverInfo, cuda_bindings_hint, cuda_version_text,
                                       extra_for_driver, install_hint, stack_fix, stack_problems)

INSTALL_HINT = "pip install 'sdcompile[tensorrt-cu1"  # the extra that fits the driver, or both when none is found
NVIDIA_INDEX = "pypi.nvidia.com"

BLOCK_IMPORTS = """
import importlib.abc, sys

class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _Refuse())
for loaded in [m for m in sys.modules if m.split(".")[0] in {blocked!r}]:
    del sys.modules[loaded]
"""

CLI = """
import click
from sdcompile.cli_trt import register
from sdrun.errors import run_cli

@click.group()
def cli():
    pass

register(cli)
run_cli(cli, sys.argv[1:])
"""


def run_without(blocked: set[str], code: str, *args: str) -> subprocess.CompletedProcess:
    script = BLOCK_IMPORTS.format(blocked=blocked) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)


def test_build_trt_exits_2_with_the_install_command(tmp_path):
    result = run_without({"tensorrt"}, CLI, "build-trt", str(tmp_path), "--component", "unet")
    assert result.returncode == 2, result.stderr
    assert INSTALL_HINT in result.stderr and NVIDIA_INDEX in result.stderr
    assert "TensorRT" in result.stderr and "Traceback" not in result.stderr


def test_build_trt_help_needs_no_tensorrt():
    result = run_without({"tensorrt"}, CLI, "build-trt", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--static", "--min", "--opt", "--max", "--timing-cache", "--builder-optimization-level",
                   "--max-workspace", "--component"):
        assert option in result.stdout


def test_unreadable_override_is_a_usage_error_before_tensorrt_is_needed(tmp_path):
    result = run_without({"tensorrt"}, CLI, "build-trt", str(tmp_path), "--opt", "batch=two")
    assert result.returncode == 2
    assert "cannot read --opt" in result.stderr and "Traceback" not in result.stderr


def test_runtime_backend_refuses_with_exit_code_2():
    code = """
    from sdrun.backends import BackendOptions
    from sdrun.backends.tensorrt import tensorrt_runners
    from sdrun.errors import MissingDependencyError
    try:
        tensorrt_runners(None, ["unet"], BackendOptions())
    except MissingDependencyError as err:
        print(json.dumps({"code": err.exit_code, "message": err.message()}))
    """
    result = run_without({"tensorrt"}, "import json\n" + textwrap.dedent(code))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["code"] == 2 and INSTALL_HINT in report["message"]


def test_auto_backend_gets_a_fallback_reason():
    code = """
    from sdrun.backends.tensorrt import tensorrt_available, tensorrt_fallback_reason
    available, reason = tensorrt_available()
    print(json.dumps({"available": available, "reason": reason,
                      "fallback": tensorrt_fallback_reason(None, ["unet"])}))
    """
    result = run_without({"tensorrt"}, "import json\n" + textwrap.dedent(code))
    report = json.loads(result.stdout)
    assert report["available"] is False
    assert "not installed" in report["reason"] and INSTALL_HINT in report["reason"]
    assert report["fallback"] == report["reason"]


def test_missing_cuda_python_names_its_package():
    code = """
    from sdrun.backends.tensorrt import import_cudart
    from sdrun.errors import MissingDependencyError
    try:
        import_cudart()
    except MissingDependencyError as err:
        print(err.exit_code, err.message())
    """
    result = run_without({"cuda"}, textwrap.dedent(code))
    assert result.stdout.startswith("2 ") and "cuda-bindings" in result.stdout


def test_type_stubs_alone_do_not_count_as_tensorrt():
    """`tensorrt-stubs` installs a bare `tensorrt/` folder that imports as an empty namespace package."""
    import importlib.util

    spec = importlib.util.find_spec("tensorrt")
    if spec is None or spec.origin not in (None, "namespace"):
        pytest.skip("this environment has no stub-only tensorrt namespace package")
    from sdrun.backends.tensorrt import import_tensorrt
    from sdrun.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match="type stubs"):
        import_tensorrt()


def test_driver_versions_read_as_major_dot_minor():
    assert [cuda_version_text(v) for v in (12040, 12090, 13000, 13010, 11080)] == ["12.4", "12.9", "13.0", "13.1",
                                                                                  "11.8"]


def test_the_extra_fits_the_newest_cuda_major_the_driver_runs():
    assert extra_for_driver(12040) == extra_for_driver(12090) == "sdcompile[tensorrt-cu12]"
    assert extra_for_driver(13000) == extra_for_driver(14020) == "sdcompile[tensorrt-cu13]"
    assert extra_for_driver(11080) is None and extra_for_driver(None) is None


def test_install_hint_names_the_driver_and_its_extra():
    hint = install_hint(DriverInfo(12040, 1))
    assert "pip install 'sdcompile[tensorrt-cu12]'" in hint and "CUDA 12.4" in hint and NVIDIA_INDEX in hint
    unknown = install_hint(DriverInfo(None))
    assert "sdcompile[tensorrt-cu12]" in unknown and "sdcompile[tensorrt-cu13]" in unknown and "nvidia-smi" in unknown
    assert "upgrade the NVIDIA driver" in install_hint(DriverInfo(11080, 1))
    assert "cuda-bindings>=12.8,<13" in cuda_bindings_hint(DriverInfo(12040, 1))


def test_cuda_bindings_newer_than_the_driver_is_named_with_the_extra_that_fits():
    """The reported failure: `cuda-bindings>=12` resolved to 13.x on a CUDA-12 driver."""
    packages = [CudaPackage("cuda-bindings", "13.0.1", 13), CudaPackage("tensorrt-cu12", "10.14.1.48", 12)]
    problems = stack_problems(12040, packages)
    assert problems == ["cuda-bindings 13.0.1 is built for CUDA 13, and this machine's driver supports only CUDA 12.4"]
    assert "sdcompile[tensorrt-cu12]" in stack_fix(DriverInfo(12040, 1))
    assert stack_problems(13000, packages) == [] and stack_problems(None, packages) == []


def test_pyproject_extras_pin_what_the_runtime_names():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert {name for name in extras if name.startswith("tensorrt")} == {e.name for e in EXTRAS.values()}
    for extra in EXTRAS.values():
        requirements = extras[extra.name]
        assert extra.cuda_bindings in requirements, (extra.name, requirements)
        assert any(r.startswith(f"{extra.tensorrt}>=") for r in requirements), (extra.name, requirements)


def test_the_driver_is_asked_without_cuda_python():
    code = """
    from sdrun.backends.cuda_stack import read_driver
    driver = read_driver()
    print(json.dumps({"version": driver.cuda_version, "count": driver.device_count, "text": driver.description}))
    """
    result = run_without({"cuda", "tensorrt"}, "import json\n" + textwrap.dedent(code))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["version"] is None) == (report["text"] == "no NVIDIA driver")
    assert report["count"] >= 0
