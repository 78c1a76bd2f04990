"""Continual learning: a run that starts from a previous run (`model.from_run`) and guards its skills
with replay, a regulariser towards the previous weights (L2-SP, EWC, O-LoRA), or a new LoRA adapter
per task beside the frozen old ones."""

from tunesmith.continual.config import ContinualConfig, RegularizerConfig, ReplayConfig
from tunesmith.continual.penalties import REGULARIZERS, RegularizerSpec, register
from tunesmith.continual.prepare import Continual, prepare_continual

__all__ = [
    "REGULARIZERS",
    "Continual",
    "ContinualConfig",
    "RegularizerConfig",
    "RegularizerSpec",
    "ReplayConfig",
    "prepare_continual",
    "register",
]
