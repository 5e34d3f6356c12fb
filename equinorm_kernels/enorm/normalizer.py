"""The ENorm object: validated settings, the discovered groups, and the cycles."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import _checks
from ..backends import resolve_backend
from ..reference.enorm import enorm_column_energy, enorm_row_energy
from .bindings import ParameterBindings
from .graph import discover_groups
from .optimizer_state import StateRescaler, check_optimizer
from .plan import Layer, RescalingGroup
from .release import discover_release_chain, release_cycle
from .sharded import full_tensor, holds_sharded_parameters, is_distributed_tensor, sharded_sequential_cycle
from .sequential import sequential_cycle as reference_sequential_cycle

SCHEDULES = ("sequential", "release")
BATCHNORM_MODES = ("paper", "affine")
OPTIMIZER_STATE_MODES = ("rescale", "ignore")


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


class ENorm:
    """Equi-normalization: rescale a ReLU network's weights to minimise sum_k ||W_k||_p^p.

    For every channel i between layers, the rows producing it (weights and bias) are multiplied by
    d_i > 0 and the columns reading it divided by d_i, which leaves the network's function
    unchanged; d_i = (C_i / (c^p R_i))^(1/(2p)) balances the two sides (see
    :mod:`equinorm_kernels.reference.enorm`). Use :meth:`step` after every optimizer step, or
    :meth:`balance` to iterate to the fixed point where ||col_i||_p = c ||row_i||_p.

    Args:
        model: the network. ``schedule="sequential"`` traces it with torch.fx to find the channel
            groups (see :mod:`equinorm_kernels.enorm.graph`); build ENorm after the model's
            structure is final. A DistributedDataParallel model stands for the module it wraps;
            parameters sharded by FSDP2's ``fully_shard`` are handled by
            :mod:`equinorm_kernels.enorm.sharded`.
        optimizer: optional SGD/Adam/AdamW whose state is rescaled along with the weights: first
            moments (momentum_buffer, exp_avg) like gradients (rows x 1/d, columns x d), second
            moments (exp_avg_sq, max_exp_avg_sq) by the squares. See ``optimizer_state``.
        c: asymmetric scaling in [2**-63, 2**63] (rows are scaled by about c^(-1/2), second moments
            by c^(-1)); the authors found 1 to 1.2 best.
        p: exponent of the energy, >= 1 and finite.
        schedule: "sequential" (block coordinate descent over all groups, residual blocks included,
            function preserving) or "release" (the cycle as published with the paper: a chain of the weights in
            registration order, Jacobi updates, the last two layers' shared channels never
            balanced, biases untouched; the model counts as convolutional, with norms in q = 2,
            when any chained weight has more than 2 dims, else q = p; see
            :mod:`equinorm_kernels.enorm.release`).
        include_bias: count |bias|^p in the producers' row energies (biases are rescaled with their
            rows either way). Ignored by ``schedule="release"``, which never touches biases.
        batchnorm: "paper": BatchNorm is transparent and its affine untouched, as the authors did
            (then not function preserving: BatchNorm undoes the row scaling); "affine": BatchNorm's
            gamma/beta are the producer rows/biases of the space its output opens and the layer
            feeding it is not rescaled for that space (function preserving in train and eval mode).
        optimizer_state: "rescale": the optimizer state and, with the sequential schedule, the
            ``.grad`` of every rescaled parameter follow the weights (weight * momentum and
            weight * grad are unchanged); "ignore": only weights and biases change.
        backend: "auto" or a name from :func:`equinorm_kernels.available_backends`: the sequential
            cycle runs as one fused op call on the "cpp"/"cuda" backends and as a loop of PyTorch
            ops on "reference". The release schedule always runs in PyTorch ops.

    Channels whose row or column energy is zero (dead units, unread channels) keep d = 1, so every
    weight stays finite.

    Every weight and bias of a group is rescaled, frozen ones (``requires_grad=False``) and ones
    the optimizer does not hold included: leaving one out would change the network's function.

    Replaced parameters: :meth:`step`, :meth:`balance` and :meth:`energy` first check that every
    layer's weight and bias is still the tensor its module holds. A parameter replaced by one of
    the same shape (``model.fc.weight = nn.Parameter(...)``, ``load_state_dict(..., assign=True)``)
    is adopted, with whatever optimizer state the optimizer keeps for the new parameter (state of
    the replaced one is not carried over; give the optimizer the new parameters). A parameter
    replaced by one of another shape, removed, or a layer module replaced by a module of another
    type raises ValueError naming it: build a new ENorm then.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        c: float = 1.0,
        p: float = 2.0,
        schedule: str = "sequential",
        include_bias: bool = True,
        batchnorm: str = "paper",
        optimizer_state: str = "rescale",
        backend: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module  # the wrapper's forward scatters and syncs: trace what it wraps
        self.c = _checks.check_scale_option(c, "c")
        self.p = _checks.check_number(p, "p", low=1.0, low_inclusive=True)
        self.schedule = _check_choice(schedule, "schedule", SCHEDULES)
        if not isinstance(include_bias, bool):
            raise TypeError(f"include_bias must be a bool, got {type(include_bias).__name__}")
        self.include_bias = include_bias
        self.batchnorm = _check_choice(batchnorm, "batchnorm", BATCHNORM_MODES)
        self.optimizer_state = _check_choice(optimizer_state, "optimizer_state", OPTIMIZER_STATE_MODES)
        check_optimizer(optimizer, self.optimizer_state)
        self.backend = _checks.check_backend_name(backend)
        self.model = model
        self.optimizer = optimizer
        rescale = self.optimizer_state == "rescale"
        # The release schedule never touches gradients; "ignore" leaves everything but the weights alone.
        self._state = StateRescaler(optimizer if rescale else None, rescale_grads=rescale and schedule == "sequential")
        self._release = discover_release_chain(model) if schedule == "release" else None
        if self._release is not None:
            self._layers, self._groups = self._release.layers, self._release.pairs
        else:
            layers, groups = discover_groups(model, self.batchnorm)
            self._layers, self._groups = tuple(layers), tuple(groups)
        self._bindings = ParameterBindings(model, self._layers)

    @property
    def groups(self) -> tuple[RescalingGroup, ...]:
        """The groups one cycle rescales, in visiting order: channel count, producer and consumer names."""
        return tuple(group.describe() for group in self._groups)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Every layer counted by :meth:`energy`, in graph (or, for release, chain) order."""
        return tuple(layer.name for layer in self._layers)

    @property
    def convolutional(self) -> bool | None:
        """Release schedule: whether the chain counts as convolutional (q = 2); None otherwise."""
        return None if self._release is None else self._release.convolutional

    def step(self) -> None:
        """Run one ENorm cycle in place (weights, biases, optimizer state)."""
        self._bindings.refresh()
        self._cycle()

    def balance(self, tol: float = 1e-6, max_cycles: int = 1000) -> int:
        """Run cycles until every coefficient of a cycle is within ``tol`` of 1.

        Returns:
            The number of cycles run (at least 1). When ``max_cycles`` cycles were not enough a
            RuntimeWarning is issued and ``max_cycles`` is returned.
        """
        tol = _checks.check_number(tol, "tol", low=0.0, low_inclusive=True)
        if isinstance(max_cycles, bool) or not isinstance(max_cycles, int) or max_cycles < 1:
            raise ValueError(f"max_cycles must be a positive int, got {max_cycles!r}")
        self._bindings.refresh()
        for cycle in range(1, max_cycles + 1):
            deviation = self._cycle()
            if deviation is None or float(deviation) <= tol:
                return cycle
        warnings.warn(
            f"ENorm.balance did not reach tol={tol} in {max_cycles} cycles (last max |d - 1| = {float(deviation):.3g})",
            RuntimeWarning,
            stacklevel=2,
        )
        return max_cycles

    def energy(self, per_column: bool = False) -> dict[str, float] | dict[str, torch.Tensor]:
        """Energy of every layer, keyed by layer name (see :attr:`layer_names`).

        Layers are the Linear/Conv weights ENorm found (with ``batchnorm="affine"`` also the
        BatchNorm affines it rescales; for the release schedule, the chained weights).

        Args:
            per_column: False: float sum |W|^p (+ sum |bias|^p when ``include_bias`` and the
                schedule is sequential). True: a tensor of the p-norms of the weight's columns,
                one per input feature of a Linear, per input channel of a Conv (its out/groups x
                kernel weights), and |gamma| for a BatchNorm affine.
        """
        self._bindings.refresh()
        if per_column:
            return {layer.name: self._column_norms(layer) for layer in self._layers}
        count_bias = self.include_bias and self._release is None
        return {layer.name: self._layer_energy(layer, count_bias) for layer in self._layers}

    def _layer_energy(self, layer: Layer, count_bias: bool) -> float:
        bias = full_tensor(layer.bias.detach()) if count_bias and layer.bias is not None else None
        return float(enorm_row_energy(full_tensor(layer.weight.detach()), self.p, bias).sum())

    def _column_norms(self, layer: Layer) -> torch.Tensor:
        weight = full_tensor(layer.weight.detach())
        if layer.kind == "batchnorm":  # gamma acts as a diagonal matrix: column j holds gamma_j alone
            energy = enorm_row_energy(weight, self.p)
        else:
            energy = enorm_column_energy(weight, self.p, groups=layer.groups)
        # Energies are float64 (they can leave float32's range); the norms are representable
        # wherever the weights are, and come back in the weights' precision.
        return energy.pow(1.0 / self.p).to(torch.float64 if weight.dtype == torch.float64 else torch.float32)

    @torch.no_grad()
    def _cycle(self) -> torch.Tensor | None:
        if self._release is not None:
            if any(is_distributed_tensor(layer.weight) for layer in self._layers):
                raise ValueError("ENorm: schedule='release' does not support sharded (DTensor) parameters; "
                                 "use schedule='sequential'")
            return release_cycle(self._release, self.p, self.c, self._state)
        cycle = reference_sequential_cycle
        if holds_sharded_parameters(self._groups):  # FSDP2: energies reduced over the shard group
            cycle = sharded_sequential_cycle
        elif self._groups:
            fused = resolve_backend(self.backend, self._groups[0].producers[0].weight.device).enorm_cycle
            cycle = fused or cycle
        return cycle(self._groups, self.p, self.c, self.include_bias, self._state)

    def __repr__(self) -> str:
        settings = (
            f"c={self.c}, p={self.p}, schedule={self.schedule!r}, include_bias={self.include_bias}, "
            f"batchnorm={self.batchnorm!r}, backend={self.backend!r}"
        )
        lines = [f"ENorm({settings}) with {len(self._groups)} groups:"]
        lines += [f"  {group}" for group in self.groups]
        return "\n".join(lines)
