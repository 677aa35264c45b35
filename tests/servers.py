"""Servers the tests start on 127.0.0.1 (moto S3, mlflow): a free port, a bounded wait, a clean kill."""
import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(cmd: list[str], probe_url: str, log_path: Path, timeout: float, cwd=None):
    """Start ``cmd`` in its own process group, wait until ``probe_url`` answers 200 (at most
    ``timeout`` seconds; fail with the server's log if it dies or never answers), kill it at the end."""
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with urllib.request.urlopen(probe_url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not come up:\n{Path(log_path).read_text()[-2000:]}")
            time.sleep(0.3)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
