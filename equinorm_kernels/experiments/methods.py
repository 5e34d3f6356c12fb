"""The methods compared: each a named (normalization, residual scheme, ENorm) combination."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from torch import nn

from ..models import build_model


@dataclass(frozen=True)
class Method:
    """One row of the comparison tables.

    Attributes:
        name: the name used on the command line and in the results.
        norm: the models' ``norm`` argument.
        scheme: the models' ``scheme`` argument.
        enorm: run one ENorm cycle after every optimizer step.
        model_options: extra keyword arguments for :func:`equinorm_kernels.models.build_model`.
        summary: one line for the results table.
    """

    name: str
    norm: str
    scheme: str
    summary: str
    enorm: bool = False
    model_options: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def enorm_compatible(self) -> bool:
        """Whether ENorm can trace this method's models (no normalization, standard blocks)."""
        return self.norm == "none" and self.scheme == "standard"

    def build(self, arch: str, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        """A freshly initialised model for this method (seed the RNG first for reproducibility)."""
        return build_model(arch, in_shape, num_classes, norm=self.norm, scheme=self.scheme, **self.model_options)


METHODS: tuple[Method, ...] = (
    Method("batchnorm", "batch", "standard", "BatchNorm after every conv/linear"),
    Method("groupnorm", "group", "standard", "GroupNorm after every conv/linear"),
    Method("equinorm", "equinorm", "standard", "EquiNorm layers, statistics from the whole batch"),
    Method(
        "equinorm-quarter",
        "equinorm",
        "standard",
        "EquiNorm layers, statistics from the first quarter of the batch",
        model_options=MappingProxyType({"equinorm_options": {"stats_fraction": 0.25}}),
    ),
    Method(
        "equinorm-per-tap",
        "equinorm",
        "standard",
        "EquiNorm conv layers with exact per-tap statistics (tap_mean) instead of channel means and the ratio",
        model_options=MappingProxyType({"equinorm_options": {"per_tap": True}}),
    ),
    Method("none", "none", "standard", "no normalization, standard initialisation"),
    Method("skipinit", "none", "skipinit", "no normalization, residual branches scaled by a zero-initialised scalar"),
    Method("fixup", "none", "fixup", "no normalization, Fixup initialisation and scalar biases (10x smaller lr)"),
    Method("risotto", "none", "risotto", "no normalization, RISOTTO isometric initialisation"),
    Method("enorm", "none", "standard", "no normalization, one ENorm cycle after every SGD step", enorm=True),
)

METHOD_NAMES: tuple[str, ...] = tuple(method.name for method in METHODS)


def method_by_name(name: str) -> Method:
    """The method called ``name``; ValueError listing the known names otherwise."""
    for method in METHODS:
        if method.name == name:
            return method
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)}")
