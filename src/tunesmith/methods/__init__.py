"""Methods: which parameters train. Importing this package registers every built-in method."""

from tunesmith.methods import freeze, full, lora  # noqa: F401  (registration side effect)
from tunesmith.methods.base import METHODS, MethodSettings, MethodSpec, count_parameters, register

__all__ = ["METHODS", "MethodSettings", "MethodSpec", "count_parameters", "register"]
