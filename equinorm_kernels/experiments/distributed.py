"""Data-parallel training on the digits: synchronised EquiNorm, and ENorm, over several processes.

    torchrun --nproc-per-node 2 -m equinorm_kernels.experiments.distributed

trains a CifarResNet on scikit-learn's digits twice, over gloo on CPU (NCCL on GPUs with
``--backend nccl``): with EquiNorm layers whose statistics are synchronised over the processes
(``convert_sync_equinorm``) under DistributedDataParallel, then without normalization and with one
ENorm cycle after every SGD step, under DDP or, with ``--fsdp``, with parameters sharded by FSDP2's
``fully_shard``. Every global batch is split into contiguous, possibly uneven, per-process parts
(the last batch of an epoch is smaller than the others). Process 0 prints the test accuracy per
epoch; at the end every process checks that its parameters equal process 0's.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._cli import positive_float, positive_int
from ..distributed import convert_sync_equinorm
from ..enorm import ENorm
from ..models import CifarResNet
from ..models.blocks import ResidualBlock
from .data import Dataset, load_digits_dataset, take_train_subset

METHODS = ("equinorm", "enorm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m equinorm_kernels.experiments.distributed",
        description="Data-parallel CifarResNet on the digits: synchronised EquiNorm statistics, and ENorm.",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--batch-size", type=positive_int, default=64, help="global batch size [64]")
    parser.add_argument("--lr", type=positive_float, default=0.05)
    parser.add_argument("--depth", type=positive_int, default=8, help="CifarResNet depth (6n + 2) [8]")
    parser.add_argument("--train-subset", type=positive_int, help="train on this many samples only")
    parser.add_argument("--fsdp", action="store_true", help="ENorm with FSDP2 fully_shard instead of DDP")
    parser.add_argument("--backend", default="gloo", help="process group backend [gloo]")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("run me under torchrun, e.g. torchrun --nproc-per-node 2 -m equinorm_kernels.experiments.distributed")
    # A 1x1 convolution's weight gradient (C, C', 1, 1) may come back with strides that differ from
    # the contiguous ones only in its size-1 dims; DDP warns about it, and it is harmless.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    dist.init_process_group(args.backend)
    try:
        dataset = take_train_subset(load_digits_dataset(), args.train_subset)
        for method in args.methods:
            train(method, dataset, args)
    finally:
        dist.destroy_process_group()
    return 0


def build_model(method: str, dataset: Dataset, depth: int, device: torch.device, fsdp: bool) -> nn.Module:
    """The method's model, the same on every process; wrapped for data-parallel training."""
    channels = dataset.in_shape[0]
    norm = "equinorm" if method == "equinorm" else "none"
    model = CifarResNet(depth, 16, dataset.num_classes, channels, norm=norm).to(device)
    if method == "equinorm":
        convert_sync_equinorm(model)
    if fsdp and method == "enorm":
        from torch.distributed.fsdp import fully_shard

        for block in model.modules():
            if isinstance(block, ResidualBlock):
                fully_shard(block)
        fully_shard(model)
        return model
    return DistributedDataParallel(model)


def local_part(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This process's contiguous part of a global batch (sizes differ by at most one)."""
    return torch.tensor_split(batch, world_size)[rank]


def train(method: str, dataset: Dataset, args: argparse.Namespace) -> nn.Module:
    """Train ``method`` for ``args.epochs`` epochs; returns the (wrapped) model."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if args.backend == "nccl" else torch.device("cpu")
    torch.manual_seed(args.seed)  # the same initial model and data order everywhere
    model = build_model(method, dataset, args.depth, device, args.fsdp)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    enorm = ENorm(model, optimizer) if method == "enorm" else None
    order_generator = torch.Generator().manual_seed(args.seed)
    wrapper = "FSDP2" if args.fsdp and method == "enorm" else "DDP"
    for epoch in range(args.epochs):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(dataset.train_labels), generator=order_generator)
        for indices in order.split(args.batch_size):
            mine = local_part(indices, rank, world_size)
            images, labels = dataset.train_images[mine].to(device), dataset.train_labels[mine].to(device)
            # The global batch's mean loss: DDP and FSDP average gradients over the processes.
            loss = F.cross_entropy(model(images), labels, reduction="sum") * (world_size / len(indices))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if enorm is not None:
                enorm.step()
        accuracy = evaluate(model, dataset, device)
        if rank == 0:
            print(f"{method} ({wrapper}, {world_size} processes) epoch {epoch + 1}: test accuracy {100 * accuracy:.1f}%, "
                  f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    check_identical_parameters(model, method)
    return model


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device: torch.device) -> float:
    """Test accuracy, each process scoring its part of the test set, summed over the processes."""
    model.eval()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    images = local_part(dataset.test_images, rank, world_size).to(device)
    labels = local_part(dataset.test_labels, rank, world_size).to(device)
    correct = torch.tensor([float((model(images).argmax(dim=1) == labels).sum())], device=device)
    dist.all_reduce(correct)
    return float(correct) / len(dataset.test_labels)


def check_identical_parameters(model: nn.Module, method: str) -> None:
    """Raise unless every parameter and buffer equals process 0's bit for bit (FSDP2: the gathered tensors)."""
    from ..enorm.sharded import full_tensor

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        mine = full_tensor(tensor.detach()).clone()
        first = mine.clone()
        dist.broadcast(first, src=0)
        if not torch.equal(mine, first):
            raise RuntimeError(f"{method}: {name} differs between process {dist.get_rank()} and process 0")
    if dist.get_rank() == 0:
        print(f"{method}: parameters and buffers identical on every process", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
