"""What synchronised statistics send: EquiNorm (``convert_sync_equinorm``) against SyncBatchNorm.

EquiNorm's traffic is measured: a converted EquiNormConv2d runs one training step (forward and
backward) in a process group while a dispatch mode records every collective it issues and the
bytes of its input. SyncBatchNorm runs only on GPUs, so its traffic is taken from its algorithm
(torch/nn/modules/_functions.py): forward, an all-gather of 2C + 1 values per process (mean,
inverse std, count); backward, an all-reduce of 2C values (sum of dy, sum of dy * (x - mean)).

Bytes sent per process follow the ring algorithms (NCCL's and gloo's defaults for large
messages): an all-reduce of n bytes sends 2 (W - 1) / W * n, an all-gather of n bytes from each
process sends (W - 1) * n, for W processes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

CHANNELS = (64, 256, 1024)
WORLD_SIZES = (8, 64)
FLOAT32_BYTES = 4


@dataclass(frozen=True)
class Collective:
    kind: str  # "all_reduce" or "all_gather"
    values: int  # per process
    bytes: int  # per process

    def sent_per_process(self, world_size: int) -> float:
        if self.kind == "all_reduce":
            return 2 * (world_size - 1) / world_size * self.bytes
        return (world_size - 1) * self.bytes

    def __str__(self) -> str:
        return f"{self.kind} of {self.values} values ({self.bytes} B)"


class _CollectiveRecorder(TorchDispatchMode):
    """Records the collectives dispatched while active (functional and in-place c10d ops alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.collectives: list[Collective] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        kind = "all_reduce" if "all_reduce" in name or "allreduce" in name else "all_gather" if "gather" in name else None
        if kind is not None and name.split("::")[0] in ("_c10d_functional", "c10d"):
            tensors = [t for t in _flat(args) if isinstance(t, torch.Tensor)]
            data = tensors[0] if kind == "all_reduce" else tensors[-1]
            self.collectives.append(Collective(kind, data.numel(), data.numel() * data.element_size()))
        return func(*args, **(kwargs or {}))


def _flat(values) -> Iterator[object]:
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from _flat(value)
        else:
            yield value


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """The default group if there is one, else a one-process gloo group for the measurement."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def measure_equinorm(channels: int) -> tuple[list[Collective], list[Collective]]:
    """The collectives one training step of a synchronised EquiNormConv2d(C, C, 3) issues: (forward, backward)."""
    from ..distributed import convert_sync_equinorm
    from ..layers import EquiNormConv2d

    layer = convert_sync_equinorm(EquiNormConv2d(channels, channels, 3, padding=1))
    x = torch.rand(2, channels, 4, 4, requires_grad=True)
    with _CollectiveRecorder() as forward:
        out = layer(x)
    with _CollectiveRecorder() as backward:
        out.sum().backward()
    return forward.collectives, backward.collectives


def sync_batchnorm_collectives(channels: int) -> tuple[list[Collective], list[Collective]]:
    """SyncBatchNorm's collectives for C channels in float32, from its algorithm."""
    forward = Collective("all_gather", 2 * channels + 1, (2 * channels + 1) * FLOAT32_BYTES)
    backward = Collective("all_reduce", 2 * channels, 2 * channels * FLOAT32_BYTES)
    return [forward], [backward]


HEADERS = ["C", "EquiNorm forward (measured)", "EquiNorm backward (measured)", "SyncBatchNorm forward",
           "SyncBatchNorm backward"] + [f"bytes sent, W={w}: EquiNorm / SyncBN" for w in WORLD_SIZES]  # fmt: skip
EXPLANATION = (
    "per layer and training step, float32 statistics; EquiNorm's collectives recorded while a synchronised "
    "EquiNormConv2d(C, C, 3) ran, SyncBatchNorm's from its algorithm (it runs on GPUs only); bytes sent per "
    "process under ring all-reduce (2(W-1)/W n) and all-gather ((W-1) n), and their ratio"
)


def _sent(collectives: Sequence[Collective], world_size: int) -> float:
    return sum(c.sent_per_process(world_size) for c in collectives)


def communication_rows(channels: Sequence[int] = CHANNELS) -> list[list[str]]:
    rows = []
    with _process_group():
        for c in channels:
            ours_forward, ours_backward = measure_equinorm(c)
            bn_forward, bn_backward = sync_batchnorm_collectives(c)
            row = [str(c), *("; ".join(map(str, part)) or "none" for part in
                             (ours_forward, ours_backward, bn_forward, bn_backward))]  # fmt: skip
            for w in WORLD_SIZES:
                ours, theirs = _sent(ours_forward + ours_backward, w), _sent(bn_forward + bn_backward, w)
                row.append(f"{ours:,.0f} / {theirs:,.0f} B ({theirs / ours:.1f}x less)")
            rows.append(row)
    return rows


def communication_section() -> tuple[str, str, list[str], list[list[str]]]:
    """(title, explanation, headers, rows) for the benchmark report."""
    return "synchronised statistics", EXPLANATION, HEADERS, communication_rows()
