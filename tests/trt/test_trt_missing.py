"""Without TensorRT: clear messages, exit code 2, and a fallback reason for `--backend auto`.

Each check runs in a fresh interpreter whose import system refuses `tensorrt` (and, where
named, `cuda`), so the result is the same on a machine that has TensorRT installed.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

INSTALL_HINT = "pip install 'sdcompile[tensorrt]'"
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
