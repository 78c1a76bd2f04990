"""Where numbers go: metrics.jsonl every logged step, optionally TensorBoard; peak memory."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch


class MetricsLog:
    def __init__(self, run_dir: Path, report_to: str, append: bool):
        self.path = run_dir / "metrics.jsonl"
        self.handle = self.path.open("a" if append else "w", encoding="utf-8")
        self.tensorboard = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def peak_memory_mb() -> float:
    """Peak GPU memory allocated on CUDA; otherwise the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
