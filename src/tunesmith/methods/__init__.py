"""Methods: which parameters train. Importing this package registers every built-in method."""

from tunesmith.methods import (  # noqa: F401  (registration side effect)
    adapter,
    freeze,
    full,
    ia3,
    loha,
    lokr,
    lora,
    lora_plus,
    p_tuning,
    prefix,
    prompt,
)
from tunesmith.methods.base import METHODS, MethodSettings, MethodSpec, count_parameters, register

__all__ = ["METHODS", "MethodSettings", "MethodSpec", "count_parameters", "register"]
