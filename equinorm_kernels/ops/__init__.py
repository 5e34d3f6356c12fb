"""The fused ops behind the ``"cpp"``, ``"cuda"`` (and ``"triton"``) backends.

Compiled kernels come from ``equinorm_kernels._C`` (csrc/); when it is missing only the reference
backend exists (see :mod:`equinorm_kernels._extension`).
"""
from __future__ import annotations

import torch

from .._extension import compiled
from ..backends import Backend, register_backend
from . import enorm, equinorm, tap_mean


def _has_kernel(dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("equinorm_kernels::equinorm_forward", dispatch_key)


def _register_compiled_backends() -> None:
    ops = torch.ops.equinorm_kernels
    equinorm.register_fake_kernels()
    equinorm.register_autograd_op()
    enorm.register_fake_kernels()
    tap_mean.register_fake_kernels()
    # The overloads themselves: an overload packet resolves its overload on every call.
    tap_mean.register_ops("compiled", ops.tap_mean.default, ops.tap_mean_backward.default)
    equinorm.register_op_set(
        "compiled",
        equinorm.FusedOps(
            ops.channel_mean.default, ops.equinorm_weight.default, ops.equinorm_forward.default,
            ops.equinorm_backward.default, ops.equinorm_forward_autograd.default,
        ),
    )
    for name, device_type, dispatch_key in (("cpp", "cpu", "CPU"), ("cuda", "cuda", "CUDA")):
        # Decided once: kernels register when the library loads, and torch.compile cannot trace
        # the dispatcher query.
        usable = _has_kernel(dispatch_key)
        register_backend(
            Backend(
                name=name,
                device_types=frozenset({device_type}),
                is_usable=lambda usable=usable: usable,
                channel_mean=equinorm.fused_channel_mean("compiled"),
                equinorm_weight=equinorm.fused_equinorm_weight("compiled"),
                equinorm_forward=equinorm.fused_equinorm_forward("compiled"),
                equinorm_forward_screened=equinorm.fused_equinorm_forward_screened("compiled"),
                enorm_cycle=enorm.fused_sequential_cycle(ops.enorm_cycle_),
                tap_mean=tap_mean.fused_tap_mean("compiled"),
                # The C++ autograd behind them serves CPU tensors (csrc/autograd.cpp).
                conv_train_forward=ops.equinorm_conv_train_forward.default if device_type == "cpu" else None,
                linear_train_forward=ops.equinorm_linear_train_forward.default if device_type == "cpu" else None,
            )
        )


if compiled is not None:
    _register_compiled_backends()


# The Triton backend (equinorm_kernels/triton) registers itself where Triton can run; without
# Triton it registers nothing, and it never stops the package from importing.
def _register_triton_backend() -> None:
    try:
        from .. import triton as triton_backend
    except ImportError:
        return
    triton_backend.register()


_register_triton_backend()
