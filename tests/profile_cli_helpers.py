"""What the profile CLI tests share: running ``loraplan profile`` in a subprocess and reading its
JSONL records back (checking that no line was torn)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CLI = [sys.executable, "-m", "loraplan.cli", "profile"]


def run_cli(*args, env=None, timeout=240):
    e = dict(os.environ, **(env or {}))
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=e)


def lines(path):
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "a torn last line"
    return [json.loads(l) for l in data.splitlines() if l.strip()]
