"""Which implementation runs an op: a small registry of backends with one entry per implementation.

Each backend provides ``channel_mean(x, stats_fraction)``, ``equinorm_weight(weight, mean, ratio,
groups, mode, gain, eps)`` and ``equinorm_forward(x, stats_fraction, weight, ratio, groups, mode,
gain, eps) -> (weight'', mean)`` (both at once, fused where the backend can) with the semantics of
:mod:`equinorm_kernels.reference`, and optionally the ENorm cycle. Arguments reach a backend
already validated. ``"auto"`` takes the first available backend in ``AUTO_PREFERENCE`` that serves
the tensor's device, so the fused kernels win wherever they exist.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import reference

# Fastest first; names not registered in this build are skipped.
AUTO_PREFERENCE = ("cuda", "triton", "cpp", "reference")


@dataclass(frozen=True)
class Backend:
    name: str
    # Device types served (torch.device.type), or None for every device.
    device_types: frozenset[str] | None
    # Whether the backend can run in this process (extension built, triton importable, ...).
    is_usable: Callable[[], bool]
    channel_mean: Callable[..., torch.Tensor]
    equinorm_weight: Callable[..., torch.Tensor]
    equinorm_forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    # One sequential ENorm cycle (equinorm_kernels.enorm.sequential's signature), None: the reference loop.
    enorm_cycle: Callable[..., torch.Tensor | None] | None = None
    # Device types "auto" may pick it for (None: all it serves); a backend can serve a device for
    # testing only, as Triton's interpreter serves CPU tensors.
    auto_device_types: frozenset[str] | None = None

    def serves(self, device: torch.device) -> bool:
        in_scope = self.device_types is None or device.type in self.device_types
        return in_scope and self.is_usable()

    def auto_serves(self, device: torch.device) -> bool:
        in_scope = self.auto_device_types is None or device.type in self.auto_device_types
        return in_scope and self.serves(device)


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Make a backend selectable by name (and by ``"auto"`` if its name is in AUTO_PREFERENCE)."""
    _REGISTRY[backend.name] = backend


def _as_device(device: torch.device | str | torch.Tensor) -> torch.device:
    if isinstance(device, torch.Tensor):
        return device.device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch.device, a device string or a tensor, got {device!r}") from error


def available_backends(device: torch.device | str | torch.Tensor = "cpu") -> list[str]:
    """Names of the backends usable for tensors on ``device``, fastest first; always has "reference"."""
    device = _as_device(device)
    ordered = [name for name in AUTO_PREFERENCE if name in _REGISTRY]
    ordered += [name for name in _REGISTRY if name not in ordered]
    return [name for name in ordered if _REGISTRY[name].serves(device)]


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend that runs on ``device`` for the ``backend=`` argument ``name``."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        return next(_REGISTRY[n] for n in available_backends(device) if _REGISTRY[n].auto_serves(device))
    backend = _REGISTRY.get(name)
    if backend is None:
        known = ", ".join(repr(n) for n in ("auto", *_REGISTRY))
        raise ValueError(f"backend must be one of {known}; got {name!r}")
    if not backend.serves(device):
        usable = ", ".join(repr(n) for n in available_backends(device))
        raise ValueError(f"backend {name!r} is not available for tensors on {device}; available there: {usable}")
    return backend


def _reference_equinorm_forward(x, stats_fraction, weight, ratio, groups, mode, gain, eps):
    mean = reference.equinorm.channel_mean_unchecked(x, stats_fraction)
    return reference.equinorm.equinorm_weight_unchecked(weight, mean, ratio, groups, mode, gain, eps), mean


register_backend(
    Backend(
        name="reference",
        device_types=None,
        is_usable=lambda: True,
        channel_mean=reference.equinorm.channel_mean_unchecked,
        equinorm_weight=reference.equinorm.equinorm_weight_unchecked,
        equinorm_forward=_reference_equinorm_forward,
    )
)
