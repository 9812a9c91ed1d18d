"""Preservation methods: one file per method, the shared interface in ``base``, lookup in ``registry``.

Public surface: ``Method``, ``MethodConfig``, ``TrainingData``, ``register``, ``available``, ``make``.
"""

from tether.methods.base import Method, MethodConfig, TrainingData
from tether.methods.registry import available, check_stack, get, make, register

__all__ = ["Method", "MethodConfig", "TrainingData", "available", "check_stack", "get", "make", "register"]
