"""EquiNorm statistics synchronised over a process group (data-parallel training).

By default every EquiNorm layer takes its channel statistics from its own process's batch (the
paper's setting: statistics per GPU). :func:`convert_sync_equinorm` makes the layers of a model
reduce them over a group instead, so that every process normalises with the statistics of the
whole global batch:

    forward   each process p holds S_p = (its per-channel statistic) * n_p and its element count
              n_p; one all-reduce of the C + 1 values [S_p, n_p] gives mu = sum_p S_p / sum_p n_p
    backward  one all-reduce of dL/dmu (C values); process p's input then receives
              dL/dmu / sum_p n_p per element, the gradient of one process holding the whole batch

Sums and counts travel in the statistic's dtype (float32; float64 for float64 inputs): a count
above 2**24 elements per channel rounds to float32's precision, as the sums do.

This holds for any per-channel statistic of the form (sum over elements of f(x)) / count, whatever
f the layer uses: only the statistic and its count cross processes. The collectives are
``torch.distributed._functional_collectives``, so ``torch.compile(fullgraph=True)`` traces them
without a graph break.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from . import _checks
from ._transformable import apply, transformable
from .reference.equinorm import _accumulation_dtype


def _require_process_group(process_group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    if not dist.is_available():
        raise RuntimeError("synchronised EquiNorm statistics need torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise RuntimeError(
            "synchronised EquiNorm statistics need an initialised process group: call "
            "torch.distributed.init_process_group(...) (torchrun sets up its environment) before "
            "convert_sync_equinorm"
        )
    return dist.group.WORLD if process_group is None else process_group


def _collective_device(group: dist.ProcessGroup) -> torch.device:
    """Where tensors for an eager collective on ``group`` must live (NCCL: the current GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@transformable
class _SynchronizedStatistic(torch.autograd.Function):
    """local statistic (C,), local count -> the group's statistic (C,), with one all-reduce each way.

    The forward also returns d mu / d local, which ``save`` keeps."""

    @staticmethod
    def compute(local: torch.Tensor, count: int, group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
        packed = torch.cat([local * count, local.new_full((1,), count)])
        total = funcol.all_reduce(packed, "sum", group)
        sums, total_count = total[:-1], total[-1:]
        if count == 0 and not torch.compiler.is_compiling():
            # Only a process without samples can see an empty group; one with samples knows the
            # total is positive, so the common case reads nothing back from the device.
            _check_group_has_samples(total_count)
        # An all-empty group under torch.compile gets a zero statistic (a zero weight), not NaN.
        total_count = total_count.clamp_min(1)
        # d mu / d local = count / total count, kept as a tensor: a size saved on ctx would be a
        # symbol of the forward's graph under torch.compile(dynamic=True), unusable in the backward's.
        return sums / total_count, packed[-1:] / total_count

    @staticmethod
    def save(ctx, inputs, output) -> None:
        ctx.save_for_backward(output[1])
        ctx.group = inputs[2]
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_share: torch.Tensor):
        (share,) = ctx.saved_tensors
        total_grad = funcol.all_reduce(grad.contiguous(), "sum", ctx.group)
        # The local statistic's own backward then divides by this process's count.
        return total_grad * share, None, None


def _check_group_has_samples(total_count: torch.Tensor) -> None:
    if float(total_count) == 0:
        raise ValueError(
            "synchronised EquiNorm statistics: every process of the group has an empty batch in training, "
            "so there is no sample to take channel statistics from"
        )


def synchronized_statistic(local: torch.Tensor, count: int, process_group: dist.ProcessGroup) -> torch.Tensor:
    """The group's per-channel statistic from each process's own.

    Args:
        local: (C,) (or per tap (C, *kernel)) this process's statistic, sum over its elements of f(x) divided by ``count``
            (any value when ``count`` is 0); float32 or float64. Differentiable.
        count: the number of elements per channel behind ``local`` (0 for an empty batch).
        process_group: the group to reduce over; every member must call this with the same C.

    Returns:
        (C,) sum_p local_p * count_p / sum_p count_p, identical on every process, in ``local``'s
        dtype; its gradient is all-reduced over the group in the backward.

    Raises:
        ValueError: every process of the group passed ``count`` 0 (raised on each of them).
    """
    # Flat across processes: a per-tap statistic (C, *kernel) travels as C * K values.
    return apply(_SynchronizedStatistic, local.reshape(-1), count, process_group)[0].reshape(local.shape)


class StatisticsSync:
    """The hook :func:`convert_sync_equinorm` gives each EquiNorm layer: statistics over ``process_group``.

    Called by the layer's training forward with its statistics input ``x`` (N, C, *spatial), the
    fraction of N that feeds the statistics on this process, and the ratio; returns the layer's
    weight built from the group's statistics and those statistics (detached, for the running mean).
    """

    def __init__(self, process_group: dist.ProcessGroup) -> None:
        self.process_group = process_group

    def __call__(self, layer: nn.Module, x: torch.Tensor, stats_fraction: float, ratio: float):
        if not torch.compiler.is_compiling() and not dist.is_initialized():
            raise RuntimeError(
                f"{type(layer).__name__} synchronises its statistics, but no process group is initialised "
                "(was it destroyed?); call torch.distributed.init_process_group first"
            )
        rows = 0 if x.shape[0] == 0 else _checks.stats_rows(x.shape[0], stats_fraction)
        count = layer._statistic_count(x, rows)
        if rows == 0:
            # Nothing to average here; the other processes' samples decide. A sum over the empty x
            # (zeros) rather than new zeros: when x requires grad this process must still join
            # the backward's all-reduce, as every process with samples does.
            zeros = x.sum(dim=(0, *range(2, x.dim())), dtype=_accumulation_dtype(x))
            shape = layer._statistic_shape()
            local = zeros.reshape(zeros.shape[0], *(1,) * (len(shape) - 1)).expand(shape)
        else:
            local = layer._local_statistic(x, stats_fraction)
        mean = synchronized_statistic(local, count, self.process_group)
        return layer.normalized_weight(mean, ratio), mean.detach()

    def __deepcopy__(self, memo: dict) -> StatisticsSync:
        return self  # a copy of the model synchronises over the same group

    def __reduce__(self):
        raise TypeError(
            "a model converted by convert_sync_equinorm holds a process group, which cannot be pickled: "
            "save its state_dict() instead"
        )

    def __repr__(self) -> str:
        return f"StatisticsSync({self.process_group!r})"


def _equinorm_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    from .layers import EquiNormLayer

    return [(name, layer) for name, layer in module.named_modules() if isinstance(layer, EquiNormLayer)]


def _check_same_layers_everywhere(layers: list[tuple[str, nn.Module]], group: dist.ProcessGroup) -> None:
    """Raise on every process unless all hold the same number of layers with the same channel counts.

    Two eager all-reduces (of the layer count, then of the channel counts), at conversion only:
    mismatched layers would make the per-step all-reduces disagree in size and hang or fail obscurely.
    """
    device = _collective_device(group)
    number = torch.tensor([len(layers), -len(layers)], dtype=torch.float64, device=device)
    dist.all_reduce(number, dist.ReduceOp.MAX, group=group)
    if number[0] != -number[1]:
        raise ValueError(
            "convert_sync_equinorm: the processes hold different numbers of EquiNorm layers "
            f"(between {int(-number[1])} and {int(number[0])}; this process {len(layers)}): every process "
            "must convert the same model"
        )
    channels = torch.tensor([layer._in_channels() for _, layer in layers], dtype=torch.float64, device=device)
    extremes = torch.cat([channels, -channels])
    dist.all_reduce(extremes, dist.ReduceOp.MAX, group=group)
    largest, smallest = extremes[: len(layers)], -extremes[len(layers) :]
    differing = (largest != smallest).nonzero().flatten().tolist()
    if differing:
        index = differing[0]
        name = layers[index][0] or "<model>"
        raise ValueError(
            f"convert_sync_equinorm: EquiNorm layer '{name}' has {int(channels[index])} input channels here, "
            f"but between {int(smallest[index])} and {int(largest[index])} across the processes; the channel "
            "counts must agree on every process"
        )


def convert_sync_equinorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Make every EquiNorm layer in ``module`` take its training statistics over ``process_group``.

    As ``nn.SyncBatchNorm.convert_sync_batchnorm``, for EquiNorm: in training, each layer's
    per-channel statistics are those of the group's whole batch (one all-reduce of C + 1 values
    forward, one of C values backward per layer and step; see :mod:`equinorm_kernels.distributed`),
    so outputs, input gradients and running statistics equal those of one process running the
    concatenated batch. Processes may hold batches of different sizes, empty ones included, as long
    as the group has at least one sample. ``stats_fraction`` applies per process: each takes the
    first ceil(stats_fraction * N_p) of its own N_p samples. Eval mode uses the running statistics,
    which are identical on every process, and communicates nothing.

    Every process must convert the same model and run its layers in the same order in training,
    as with SyncBatchNorm: collectives pair up in call order.

    Args:
        module: a model (or one layer); changed in place and returned. Wrap it in
            DistributedDataParallel after or before converting, either works.
        process_group: the group to reduce over; None for the default (world) group.

    Returns:
        ``module``. ``layer.statistics_sync = None`` turns a layer back to per-process statistics.

    Raises:
        RuntimeError: no initialised process group.
        ValueError: the processes' models differ in their EquiNorm layers or channel counts
            (raised on every process; the check costs two small collectives, here only).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    group = _require_process_group(process_group)
    layers = _equinorm_layers(module)
    _check_same_layers_everywhere(layers, group)
    sync = StatisticsSync(group)
    for _, layer in layers:
        layer.statistics_sync = sync
    return module
