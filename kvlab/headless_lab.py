"""A headless JupyterLab for the tests that check `make lab` and the notebooks in a browser.

:func:`running_lab` starts ``jupyter lab`` from this Python on a free local port with a random
token, waits until it answers, and stops it afterwards: ``tests/test_lab.py`` (does `make lab`
serve the course?) and ``browser/conftest.py`` (run every notebook in Chromium) share it.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Lab:
    """A running JupyterLab: its address, token and the folder it serves."""

    url: str
    token: str
    root: Path

    def api(self, method: str, path: str) -> bytes:
        """The body of an authenticated request to the server (``path`` from ``/``)."""
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def shut_down_kernels(self) -> None:
        """Ends every kernel, so the next notebook starts on a quiet machine."""
        for session in json.loads(self.api("GET", "/api/sessions")):
            self.api("DELETE", f"/api/sessions/{session['id']}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_lab(root: Path, env: Mapping[str, str], log_path: Path, start_s: float = 120,
                extra_args: Sequence[str] = ()) -> Iterator[Lab]:
    """JupyterLab serving ``root`` with environment ``env``, its output in ``log_path``.

    Raises RuntimeError (with the end of the log) when it exits or does not answer
    ``/api/status`` within ``start_s`` seconds. JupyterLab refuses to run as root unless told
    to, as the Makefile's ``make lab`` tells it.
    """
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
           f"--port={port}", f"--IdentityProvider.token={token}", f"--notebook-dir={root}",
           # the port we picked, or fail: a server that moved on to another port would never
           # answer where we ask, and the wait would end only at start_s
           "--ServerApp.port_retries=0", *extra_args]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, env=dict(env), cwd=root, stdout=log,
                                  stderr=subprocess.STDOUT)
    lab = Lab(f"http://127.0.0.1:{port}", token, root)
    try:
        deadline = time.monotonic() + start_s
        while True:
            try:
                lab.api("GET", "/api/status")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n"
                                       + Path(log_path).read_text(errors="replace")[-3000:]) from None
                time.sleep(0.5)
        yield lab
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
