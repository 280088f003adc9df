"""A `serve.py` subprocess on 127.0.0.1 for the server tests, and reading its /metrics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python serve.py *args` (or another `script` of the repository taking --host and --port)
    on a free port; waits until /health answers and, with --api-server-count N, until all N
    HTTP processes are up (each exports its CPU series once its app is built)."""

    def __init__(self, *args: str, startup_s: float = 300, env: dict[str, str] | None = None,
                 script: str = "serve.py"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log", delete=False)
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip(),
               **(env or {})}
        if script == "serve.py" and "--compilation-cache" not in args:  # keep tests out of the user's cache
            args = (*args, "--compilation-cache", "off")
        self.process = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args, "--host", "127.0.0.1",
                                         "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        cwd=ROOT)
        workers = int(args[args.index("--api-server-count") + 1]) if "--api-server-count" in args else 1
        deadline = time.monotonic() + startup_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{script} exited with {self.process.returncode}:\n{self.output()}")
            try:
                if self.up(workers):
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{script} did not start in {startup_s} s:\n{self.output()}")
            time.sleep(0.5)

    def up(self, workers: int) -> bool:
        """/health answers, and each of `workers` HTTP processes (> 1) shows its CPU series."""
        if httpx.get(self.url + "/health", timeout=2).status_code != 200:
            return False
        return workers == 1 or sum(k.startswith("dspark_api_server_cpu_seconds") for k in self.metrics()) == workers

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-5000:]

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics by name with labels, e.g. 'dspark_kv_pages_used' or
        'dspark_verify_length_total{length=2}'."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return out

    def wait_idle(self, timeout_s: float = 30) -> dict[str, float]:
        """/metrics once no request runs or waits and no page is held."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.metrics()
            if m["dspark_num_requests_running"] == m["dspark_num_requests_waiting"] == m["dspark_kv_pages_used"] == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"the server is still busy after {timeout_s} s: {m}")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
