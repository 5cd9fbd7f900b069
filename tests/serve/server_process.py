"""A real `sdrun serve` process on 127.0.0.1 for tests: free ports, bounded start and stop."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
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
    def __init__(self, bundle: Path, log: Path, *options: str):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.url = f"http://127.0.0.1:{self.http}"
        self.log = log
        command = [str(Path(sys.executable).with_name("sdrun")), "serve", "--bundle", str(bundle), "--http-port", str(self.http),
                   "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), *options]
        self.process = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, models=("txt2img",)) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sdrun serve exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            if all(self.get(f"/v2/models/{m}/ready")[0] == 200 for m in models):
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"sdrun serve not ready in {START_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")

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
def running_server(bundle: Path, log: Path, *options: str, models=("txt2img",)):
    server = ServerProcess(bundle, log, *options)
    try:
        server.wait_ready(models)
        yield server
    finally:
        server.stop()
