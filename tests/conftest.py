"""Session setup shared by every test module: the Triton backend on machines without a GPU.

Triton decides whether a function is compiled or interpreted when it is defined: its own library
when ``triton`` is imported, our kernels when ``equinorm_kernels`` is first imported (both read
TRITON_INTERPRET then, and the interpreter checks the setting again while it runs). Without a GPU
the Triton kernels can only run under the interpreter, on CPU tensors. So here, before any test
module is imported, Triton is imported with TRITON_INTERPRET=1 and the setting is then pinned in
``triton.knobs`` for this process only: the "triton" backend serves CPU tensors here (the
backend-parametrised tests include it), while the environment is restored, so subprocesses that
tests start, and torch.compile's own Triton code generation, see no TRITON_INTERPRET. With a GPU,
without Triton, or when TRITON_INTERPRET is already set, nothing changes.
"""
from __future__ import annotations

import importlib.util
import os

import torch

if (
    "TRITON_INTERPRET" not in os.environ
    and not torch.cuda.is_available()
    and importlib.util.find_spec("triton") is not None
):
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from triton import knobs

        knobs.runtime.interpret = True  # held by the knob itself from now on, whatever the environment says
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
