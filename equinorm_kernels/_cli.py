"""What the package's command-line tools share: argument parsers and JSON-safe records."""
from __future__ import annotations

import argparse
import math
from typing import Callable, TypeVar

T = TypeVar("T")


def parsed(kind: Callable[[str], T], text: str, what: str, valid: Callable[[T], bool]) -> T:
    """``kind(text)`` if it converts and is ``valid``, else an argparse error saying ``what`` was expected."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return parsed(int, text, "a positive integer", lambda value: value >= 1)


def positive_float(text: str) -> float:
    return parsed(float, text, "a positive finite number", lambda value: math.isfinite(value) and value > 0)


def finite_or_null(value: object) -> object:
    """``value`` with every non-finite float replaced by None: JSON has no NaN or infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value
