"""The ``"triton"`` backend: EquiNorm and ENorm kernels written in Triton.

The ops ``torch.ops.equinorm_kernels.triton_*`` have the signatures of the compiled ops
(csrc/ops.cpp) and their semantics; :mod:`.equinorm` and :mod:`.enorm` hold the kernels.

Where it runs:
- CUDA tensors, with the kernels compiled by Triton (``torch.compile`` traces through them).
- CPU tensors under Triton's interpreter, for testing only: set ``TRITON_INTERPRET=1`` (or
  ``triton.knobs.runtime.interpret = True``) before ``equinorm_kernels`` is first imported, since
  Triton reads it when the kernels are defined. The interpreter is slow, so ``backend="auto"``
  never picks it; ask for ``backend="triton"``.

Importing this package never imports Triton; :func:`register` does, and only when the backend can
run (:func:`is_available`).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import torch

_registered = False
_usable = False


def interpreted() -> bool:
    """Whether the kernels run (or, once defined, would run) under Triton's interpreter."""
    runtime = sys.modules.get(f"{__name__}._runtime")
    if runtime is not None:
        return runtime.INTERPRETED
    knobs = sys.modules.get("triton.knobs")
    if knobs is not None:  # Triton is imported: its setting, which may also have been set in code
        return bool(knobs.runtime.interpret)
    # TRITON_INTERPRET as Triton reads it, without importing Triton.
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def is_available() -> bool:
    """Triton is importable and can run here: a CUDA device, or the interpreter for CPU tensors."""
    if importlib.util.find_spec("triton") is None:
        return False
    return interpreted() or torch.cuda.is_available()


def register() -> bool:
    """Define the Triton ops and register the ``"triton"`` backend; returns whether it is usable.

    Safe to call more than once. Without Triton nothing is registered; with Triton but nowhere to
    run the backend is registered as unusable, so ``backend="triton"`` says why it cannot run.
    """
    global _registered, _usable
    if _registered:
        return _usable
    if importlib.util.find_spec("triton") is None:
        return False
    usable = is_available()
    op_set = None
    if usable:
        try:
            op_set = _define_ops()
        except Exception as error:  # e.g. a Triton release without an API the kernels use
            warnings.warn(f"equinorm_kernels: the Triton backend is disabled ({error!r})", RuntimeWarning, stacklevel=2)
            usable = False
    _register_backend(op_set)
    _registered, _usable = True, usable
    return usable


def _define_ops():
    """Imports the kernel modules (which define the ops) and returns the EquiNorm op set."""
    from ..ops import enorm as fused_enorm
    from ..ops import equinorm as fused_equinorm
    from ..ops import tap_mean as fused_tap_mean
    from . import _runtime, enorm, equinorm, tap_mean  # noqa: F401 - importing defines the ops

    if _runtime.INTERPRETED:
        # triton_op derives fake kernels from the launchers; the interpreter's custom ops need them.
        fused_equinorm.register_fake_kernels(prefix="triton_")
        torch.library.register_fake("equinorm_kernels::triton_enorm_group_", fused_enorm.fake_enorm_group_)
        torch.library.register_fake("equinorm_kernels::triton_enorm_cycle_", fused_enorm.fake_enorm_cycle_)
        fused_tap_mean.register_fake_kernels(prefix="triton_")
    ops = torch.ops.equinorm_kernels
    fused_tap_mean.register_ops("triton", ops.triton_tap_mean, ops.triton_tap_mean_backward)
    return fused_equinorm.FusedOps(
        ops.triton_channel_mean, ops.triton_equinorm_weight, ops.triton_equinorm_forward, ops.triton_equinorm_backward
    )


def _register_backend(op_set) -> None:
    from ..backends import Backend, register_backend
    from ..ops import enorm as fused_enorm
    from ..ops import equinorm as fused_equinorm
    from ..ops import tap_mean as fused_tap_mean

    if op_set is not None:
        fused_equinorm.register_op_set("triton", op_set)
    device_types = {"cuda", "cpu"} if interpreted() else {"cuda"}
    cycle = None
    if op_set is not None:
        cycle = fused_enorm.fused_sequential_cycle(torch.ops.equinorm_kernels.triton_enorm_cycle_)
    register_backend(
        Backend(
            name="triton",
            device_types=frozenset(device_types),
            is_usable=lambda: op_set is not None,
            channel_mean=fused_equinorm.fused_channel_mean("triton"),
            equinorm_weight=fused_equinorm.fused_equinorm_weight("triton"),
            equinorm_forward=fused_equinorm.fused_equinorm_forward("triton"),
            enorm_cycle=cycle,
            auto_device_types=frozenset({"cuda"}),
            tap_mean=fused_tap_mean.fused_tap_mean("triton") if op_set is not None else None,
        )
    )
