"""Start and stop a real `planc serve` process on 127.0.0.1 for tests."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


class ServerProcess:
    def __init__(self, bundle: Path, *args: str, env: dict | None = None, startup_s: float = 60.0):
        self.proc = subprocess.Popen([sys.executable, "-m", "planc.cli", "serve", str(bundle), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.banner: list[str] = []
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("planc serve exited: " + "".join(self.banner) + (self.proc.stdout.read() or ""))
            self.banner.append(line)
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if m:
                self.url = m.group(1)
                break
        else:
            self.proc.kill()
            raise RuntimeError(f"planc serve did not start in {startup_s:g} s")
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("planc serve never became healthy")

    def metric(self, name: str, **labels) -> float:
        """Sum of a Prometheus sample over series whose labels include `labels`."""
        total = 0.0
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if all(f'{k}="{v}"' in line for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        return self.proc.returncode
