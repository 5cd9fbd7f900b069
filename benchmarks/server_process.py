"""Real servers on 127.0.0.1 for tests and benchmarks — `sdrun serve`, or the `tritonserver` binary PyTriton
ships on a model repository — on free ports, with bounded start and stop."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 90


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class ServerProcess:
    """`command(http, grpc, metrics)` started with its output in `log`."""

    def __init__(self, command, log: Path, env: dict | None = None):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.url = f"http://127.0.0.1:{self.http}"
        self.log = log
        self.process = subprocess.Popen(command(self.http, self.grpc, self.metrics), stdout=open(log, "w"),
                                        stderr=subprocess.STDOUT, env={**(env or os.environ), "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, models=("txt2img",)) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            if all(self.get(f"/v2/models/{m}/ready")[0] == 200 for m in models):
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the server was not ready in {START_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")

    def get(self, path: str, port: int | None = None) -> tuple[int, str]:
        url = f"http://127.0.0.1:{port or self.http}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except (OSError, ValueError) as err:
            return getattr(err, "code", 0) or 0, str(err)

    def stop(self) -> int:
        """SIGTERM, then the exit status (killed after STOP_TIMEOUT_S)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


@contextlib.contextmanager
def running(command, log: Path, models: tuple[str, ...], env: dict | None = None):
    server = ServerProcess(command, log, env)
    try:
        server.wait_ready(models)
        yield server
    finally:
        server.stop()


def running_server(bundle: Path, log: Path, *options: str, models=("txt2img",)):
    """`sdrun serve --bundle bundle *options`, ready when `models` are."""
    def command(http: int, grpc: int, metrics: int) -> list[str]:
        return [str(Path(sys.executable).with_name("sdrun")), "serve", "--bundle", str(bundle), "--http-port",
                str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), *options]
    return running(command, log, models)


def running_tritonserver(repository: Path, workdir: Path, models: tuple[str, ...]):
    """PyTriton's `tritonserver` with its Python backend on `repository`, the stub built for this interpreter
    and seeing this environment's packages."""
    import pytriton

    package = Path(pytriton.__file__).parent
    server = workdir / "tritonserver"
    shutil.copytree(package / "tritonserver", server, ignore=shutil.ignore_patterns("python_backend_stubs"))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy(package / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub",
                server / "backends" / "python")
    libraries = [sysconfig.get_config_var("LIBDIR"), str(package.parent / "nvidia_pytriton.libs")]
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(libraries),
           "PYTHONPATH": os.pathsep.join(site.getsitepackages()),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}

    def command(http: int, grpc: int, metrics: int) -> list[str]:
        return [str(server / "bin" / "tritonserver"), "--model-repository", str(repository),
                "--backend-directory", str(server / "backends"), "--http-address", "127.0.0.1", "--http-port",
                str(http), "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc), "--metrics-address",
                "127.0.0.1", "--metrics-port", str(metrics), "--exit-timeout-secs", "30"]
    return running(command, workdir / "tritonserver.log", models, env)
