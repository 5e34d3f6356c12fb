"""The normalization comparison behind ``equinorm-experiments``.

Modules: ``data`` (digits, CIFAR-10), ``methods`` (the compared methods), ``training`` (one run),
``report`` (median/IQR tables and plots), ``cli`` (the command).
"""
from .cli import main

__all__ = ["main"]
