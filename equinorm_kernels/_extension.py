"""Loads the compiled extension ``equinorm_kernels._C`` if it was built, and says why not otherwise.

The package works without it: only the pure-PyTorch ``"reference"`` backend is then available.
"""
from __future__ import annotations

import importlib.util
import warnings
from types import ModuleType

import torch

_REBUILD_HINT = "reinstall from source with `pip install --no-build-isolation .`"


def _load() -> tuple[ModuleType | None, str]:
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return None, "the compiled extension equinorm_kernels._C is not built"
    try:
        from . import _C
    except ImportError as error:  # built against another torch or toolkit: undefined symbols
        return None, f"the compiled extension equinorm_kernels._C could not be loaded ({error})"
    if _C.torch_version != torch.__version__:
        return None, (
            f"equinorm_kernels._C was built against torch {_C.torch_version} "
            f"but torch {torch.__version__} is running"
        )
    return _C, ""


compiled, load_error = _load()
if compiled is None:
    warnings.warn(
        f"equinorm_kernels: {load_error}; only the 'reference' backend is available. "
        f"To get the fused kernels, {_REBUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )


def build_info() -> dict[str, object]:
    """How the compiled extension was built: ``{"compiled", "with_cuda", "torch_version",
    "cuda_arch_list", "error"}``; ``compiled`` is False (with ``error`` saying why) when it is missing."""
    if compiled is None:
        return {"compiled": False, "with_cuda": False, "torch_version": None, "cuda_arch_list": "", "error": load_error}
    return {
        "compiled": True,
        "with_cuda": bool(compiled.with_cuda),
        "torch_version": compiled.torch_version,
        "cuda_arch_list": compiled.cuda_arch_list,
        "error": "",
    }
