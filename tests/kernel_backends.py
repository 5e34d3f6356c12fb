"""The fused backends every kernel test runs against: each one available for each device present.

CPU tensors: "cpp" (and "triton" under TRITON_INTERPRET=1); CUDA tensors, when a GPU is present:
"cuda" and "triton". A backend that is not built here simply does not appear.
"""
from __future__ import annotations

import pytest
import torch

import equinorm_kernels


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fused_backend_params() -> list:
    params = [
        pytest.param(name, device, id=f"{name}-{device}")
        for device in devices()
        for name in equinorm_kernels.available_backends(device)
        if name != "reference"
    ]
    return params or [pytest.param(None, None, marks=pytest.mark.skip(reason="no fused backend is built"))]


def op(backend: str, name: str):
    """The registered op behind ``backend``: torch.ops.equinorm_kernels.<name> (triton_<name> for Triton)."""
    prefix = "triton_" if backend == "triton" else ""
    return getattr(torch.ops.equinorm_kernels, prefix + name)
