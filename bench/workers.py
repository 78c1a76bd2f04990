"""Shared by the benchmarks: each tool runs in a subprocess of the same script, so its peak memory is
its own, and reports its figures on one `RESULT {json}` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def report(figures: dict) -> None:
    """Called in the worker: print the figures for the driver."""
    print("RESULT " + json.dumps(figures))


def run_worker(script: str, options: dict[str, object], threads: int | None = None) -> dict | None:
    """Run `script` with `--key value` options; the worker's figures, or None if it failed (e.g. OOM)."""
    command = [sys.executable, script]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        print(result.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(lines[-1].removeprefix("RESULT "))


def status_mb(field: str) -> float:
    """A memory field of this process's /proc/self/status (VmRSS, VmHWM: the peak since the last reset,
    RssAnon: its private memory, RssFile: mapped files' pages), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")
