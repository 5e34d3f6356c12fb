"""autograd.Functions in both forms PyTorch takes, and the call that picks one.

torch.func transforms (grad, vjp, jacrev, vmap) accept only the form whose forward has no ctx and
whose setup_context saves what the backward needs. For that form Function.apply binds the
arguments with inspect.signature on every call: tens of microseconds, more than a small layer's
whole host time. So each Function here is written once, as

    compute(*inputs) -> outputs        the forward, without ctx
    save(ctx, inputs, outputs)         what the backward needs
    backward(ctx, *grads)

and :func:`transformable` gives it the ctx form's forward (compute, then save) for plain calls,
and a twin in the setup_context form that :func:`apply` takes only under a transform.
"""
from __future__ import annotations

import torch

from . import _checks


def transformable(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Class decorator: ``function.forward`` from its ``compute`` and ``save``, and its
    setup_context twin as ``function.in_transforms``."""
    compute, save = function.compute, function.save

    def forward(ctx, *inputs):
        outputs = compute(*inputs)
        save(ctx, inputs, outputs)
        return outputs

    function.forward = staticmethod(forward)
    function.in_transforms = type(
        f"{function.__name__}InTransforms",
        (torch.autograd.Function,),
        {
            # vmap batches the forward and the backward as they are written (the ops' fallback runs
            # them once per batch entry).
            "generate_vmap_rule": True,
            "forward": staticmethod(compute),
            "setup_context": staticmethod(save),
            "backward": staticmethod(function.backward),
        },
    )
    return function


def apply(function: type[torch.autograd.Function], *inputs):
    """``function.apply(*inputs)``, in the setup_context form under a torch.func transform."""
    # torch.compile traces the plain form: its tracing may itself sit on the interpreter stack.
    if not torch.compiler.is_compiling() and _checks.func_transform_active():
        return function.in_transforms.apply(*inputs)
    return function.apply(*inputs)
