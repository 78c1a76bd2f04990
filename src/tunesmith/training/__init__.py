"""The one training loop and what it needs: optimiser, schedule, checkpoints, metrics.

`train`, `TrainResult` and `EXIT_INTERRUPTED` are loaded on first use (PEP 562): tunesmith.config
imports `MetaConfig` from training/meta.py, and the loop imports tunesmith.config.
"""

__all__ = ["EXIT_INTERRUPTED", "TrainResult", "train"]


def __getattr__(name: str):
    if name in __all__:
        from tunesmith.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'tunesmith.training' has no attribute {name!r}")
