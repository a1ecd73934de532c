"""`planc bench --bundle`: start `planc serve BUNDLE` on 127.0.0.1 (a free port), run, stop it.

The server is a child process so the load generator and the engine do not share a GIL, which is
how a deployed server runs too.
"""
from __future__ import annotations

import collections
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import httpx

from planc.errors import PlancError

_LISTENING = re.compile(r"listening on (http://[^\s]+:\d+)")


class LocalServer:
    """Context manager: `with LocalServer(bundle) as url: ...`; SIGTERM (graceful drain) on exit."""

    def __init__(self, bundle: Path, serve_args: str = "", start_timeout_s: float = 120,
                 env: Optional[dict[str, str]] = None):
        self.bundle, self.start_timeout_s = Path(bundle), start_timeout_s
        self.args = shlex.split(serve_args)
        self.env = {**os.environ, **(env or {})}
        self.proc: Optional[subprocess.Popen] = None
        self.tail: collections.deque[str] = collections.deque(maxlen=20)
        self.url: Optional[str] = None

    def __enter__(self) -> str:
        if not (self.bundle / "manifest.json").is_file():
            raise PlancError(f"{self.bundle}: not a planc bundle (no manifest.json)")
        cmd = [sys.executable, "-m", "planc.cli", "serve", str(self.bundle), "--host", "127.0.0.1", "--port", "0",
               *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
        found = threading.Event()
        # a reader thread keeps the pipe drained for the server's whole life (a full pipe would block it)
        threading.Thread(target=self._read, args=(found,), daemon=True).start()
        deadline = time.monotonic() + self.start_timeout_s
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise PlancError(f"planc serve {self.bundle} did not start: {self._last_line()}")
        self._wait_healthy(deadline)
        return self.url

    def _read(self, found: threading.Event) -> None:
        for line in self.proc.stdout:
            self.tail.append(line.rstrip())
            m = _LISTENING.search(line)
            if m and self.url is None:
                self.url = m.group(1)
                found.set()

    def _last_line(self) -> str:
        lines = [ln for ln in self.tail if ln.strip()]
        return lines[-1] if lines else "no output"

    def _wait_healthy(self, deadline: float) -> None:
        if not wait_healthy(self.url, deadline):
            self.stop()
            raise PlancError(f"planc serve {self.bundle} never answered /health")

    def stop(self, timeout_s: float = 30) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_healthy(url: str, deadline: float) -> bool:
    """Poll `url`/health until it answers 200 (True) or time.monotonic() passes `deadline` (False)."""
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False
