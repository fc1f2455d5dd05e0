"""Shared by the bench tests: run a bench script and stop it with SIGTERM once it has written rows."""
from __future__ import annotations

import signal
import subprocess
import sys
import time


def sigterm_after_first_rows(argv: list, csv_path, wait_s: float = 240) -> tuple[int, str]:
    """Start `python argv...`, send SIGTERM as soon as `csv_path` exists; returns (exit code, stderr)."""
    p = subprocess.Popen([sys.executable, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + wait_s
        while not csv_path.exists():
            assert p.poll() is None, f"finished before it could be stopped: {p.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, f"no row written in {wait_s:.0f} s"
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, err
