"""Keeping optimizer state consistent with rescaled weights.

After W' = s * W (s > 0 per row or per column) the gradient with respect to W' is g / s. First
moments (SGD momentum, Adam exp_avg) and ``.grad`` are therefore multiplied by 1 / s, second
moments (Adam exp_avg_sq, max_exp_avg_sq) by 1 / s^2, so that weight * momentum is unchanged.
"""
from __future__ import annotations

from typing import Callable

import torch

# Applies a per-channel factor in place along the weight's rows or columns.
ScaleFn = Callable[[torch.Tensor, torch.Tensor], object]

FIRST_MOMENTS = ("momentum_buffer", "exp_avg")
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")
# Subclasses too: their state is checked key by key (moment_tensors) when it is rescaled.
SUPPORTED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def moment_tensors(state: dict, optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The first and second moments in one parameter's optimizer state.

    Raises:
        ValueError: the state holds another per-element tensor (a subclass's own state), which
            ENorm could not keep consistent with the rescaled weight.
    """
    unknown = [key for key, value in state.items()
               if isinstance(value, torch.Tensor) and value.dim() > 0 and key not in FIRST_MOMENTS + SECOND_MOMENTS]
    if unknown:
        raise ValueError(
            f"ENorm does not know how to rescale the optimizer state {unknown} of {type(optimizer).__name__} "
            f"(it rescales {', '.join(FIRST_MOMENTS + SECOND_MOMENTS)}); pass optimizer_state='ignore' to "
            "leave the state untouched"
        )
    first = [state[key] for key in FIRST_MOMENTS if isinstance(state.get(key), torch.Tensor)]
    second = [state[key] for key in SECOND_MOMENTS if isinstance(state.get(key), torch.Tensor)]
    return first, second


class StateRescaler:
    """Rescales a parameter's optimizer state and gradient after the parameter was rescaled.

    ``optimizer=None`` makes every call a no-op. ``rescale_grads=False`` leaves ``.grad`` alone.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None, *, rescale_grads: bool = True) -> None:
        self.optimizer = optimizer
        self.rescale_grads = rescale_grads

    def follow(self, param: torch.Tensor, scale: ScaleFn, factor: torch.Tensor) -> None:
        """``param`` was multiplied by ``factor`` via ``scale``; update what depends on it."""
        inverse = None
        if self.rescale_grads and param.grad is not None:
            inverse = 1.0 / factor
            scale(param.grad, inverse)
        state = self.optimizer.state.get(param) if self.optimizer is not None else None
        if not state:
            return
        first, second = moment_tensors(state, self.optimizer)
        inverse = 1.0 / factor if inverse is None else inverse
        for moment in first:
            scale(moment, inverse)
        for moment in second:
            scale(moment, inverse * inverse)


def check_optimizer(optimizer: object, optimizer_state: str) -> None:
    """Raise unless ``optimizer`` is None or an optimizer whose state ENorm knows how to rescale."""
    if optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if optimizer_state == "rescale" and not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
        raise ValueError(
            f"ENorm cannot rescale the state of optimizer {type(optimizer).__name__}: only "
            f"{', '.join(cls.__name__ for cls in SUPPORTED_OPTIMIZERS)} are supported; pass "
            "optimizer_state='ignore' to leave its state untouched"
        )
