"""Multi-process test harness: worker functions run by torch.multiprocessing over gloo on CPU.

Every worker joins a process group through a file store, checks its part against a reference
computed in the same process (one process on the concatenated batch), and raises on a mismatch;
``launch`` fails the test with the worker's traceback, or kills the processes after a timeout so
that a hang can never block the suite.
"""
from __future__ import annotations

import copy
import datetime
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=45)


def launch(world_size: int, worker: Callable, store_dir: Path, *args, timeout: float = 90.0) -> None:
    """Run ``worker(rank, world_size, *args)`` in ``world_size`` processes; raise if any fails or hangs."""
    store = Path(store_dir) / f"store-{world_size}-{worker.__name__}-{time.monotonic_ns()}"
    context = mp.start_processes(
        _entry, args=(world_size, str(store), worker, args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{worker.__name__} did not finish in {timeout} s on {world_size} processes")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _entry(rank: int, world_size: int, store: str, worker: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        worker(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


# ---- helpers --------------------------------------------------------------------------------------

def split_sizes(world_size: int) -> list[int]:
    """Uneven per-process batch sizes; with three processes one of them holds no sample."""
    return {2: [3, 1], 3: [2, 0, 3]}[world_size]


def rows_of(rank: int, sizes: list[int]) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def gathered(tensor: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def summed(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def assert_identical_across_processes(tensor: torch.Tensor, what: str) -> None:
    for rank, part in enumerate(gathered(tensor)):
        if not torch.equal(part, tensor):
            raise AssertionError(f"{what} differs between process {dist.get_rank()} and process {rank}")


def small_equinorm_net(per_tap: bool = False, **options) -> nn.Module:
    import equinorm_kernels as ek

    return nn.Sequential(
        ek.EquiNormConv2d(3, 4, 3, padding=1, per_tap=per_tap, **options),
        nn.ReLU(),
        ek.EquiNormConv2d(4, 6, 3, stride=2, padding=1, per_tap=per_tap, **options),
        nn.ReLU(),
        nn.Flatten(),
        ek.EquiNormLinear(6 * 3 * 3, 5, **options),
    )


def global_batch(total: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The same inputs and per-sample loss weights on every process."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.rand(total, 3, 6, 6, generator=generator, dtype=dtype)
    loss_weights = torch.randn(total, 5, generator=generator, dtype=dtype)
    return x, loss_weights


# ---- workers --------------------------------------------------------------------------------------

def check_sync_matches_one_process(rank: int, world_size: int, backend: str, compiled: bool,
                                   per_tap: bool = False) -> None:
    """Outputs, input gradients, summed parameter gradients and running means, against one process."""
    import equinorm_kernels as ek

    sizes = split_sizes(world_size)
    torch.manual_seed(0)
    reference = small_equinorm_net(per_tap=per_tap, backend=backend).double()
    model = ek.convert_sync_equinorm(copy.deepcopy(reference))
    run = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager") if compiled else model
    x, loss_weights = global_batch(sum(sizes), torch.float64)

    for step in range(2):  # the second step sees the running means the first one tracked
        x_ref = (x + step).requires_grad_()
        expected = reference(x_ref)
        (expected * loss_weights).sum().backward()

        local = x_ref.detach()[rows_of(rank, sizes)].clone().requires_grad_()
        out = run(local)
        (out * loss_weights[rows_of(rank, sizes)]).sum().backward()

        torch.testing.assert_close(out, expected[rows_of(rank, sizes)], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(local.grad, x_ref.grad[rows_of(rank, sizes)], rtol=1e-9, atol=1e-12)
        for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(summed(param.grad), ref_param.grad, rtol=1e-9, atol=1e-12, msg=name)
        for name, buffer in model.named_buffers():
            ref_buffer = reference.get_buffer(name)
            if buffer.is_floating_point():
                torch.testing.assert_close(buffer, ref_buffer, rtol=1e-12, atol=1e-14, msg=name)
            assert_identical_across_processes(buffer, name)
        model.zero_grad()
        reference.zero_grad()


def check_stats_fraction_per_process(rank: int, world_size: int) -> None:
    """Each process averages its own first ceil(f * N_p) samples; the reference takes their union."""
    import equinorm_kernels as ek
    from equinorm_kernels import reference as ref

    sizes, fraction = [4, 3, 2][:world_size], 0.5
    used = [ek._checks.stats_rows(n, fraction) for n in sizes]  # 2, 2, 1
    torch.manual_seed(0)
    layer = ek.EquiNormConv2d(3, 4, 3, stride=2, padding=1, stats_fraction=fraction).double()
    with torch.no_grad():
        layer.gain.uniform_(0.5, 1.5)
    x = torch.rand(sum(sizes), 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    loss_weights = torch.randn(sum(sizes), 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))

    # Independent reference: the reference math on the union of every process's statistics rows.
    x_ref = x.clone().requires_grad_()
    weight, gain = layer.weight.detach().clone().requires_grad_(), layer.gain.detach().clone().requires_grad_()
    fed = torch.cat([x_ref[rows_of(r, sizes)][: used[r]] for r in range(world_size)])
    mean = fed.mean(dim=(0, 2, 3))
    ratio = 3 * 3 * 2 * 2 / (5 * 5)
    rescaled = ref.equinorm_weight(weight, mean, ratio=ratio, gain=gain)
    expected = F.conv2d(x_ref, rescaled, layer.bias.detach(), stride=2, padding=1)
    (expected * loss_weights).sum().backward()

    ek.convert_sync_equinorm(layer)
    local = x[rows_of(rank, sizes)].clone().requires_grad_()
    out = layer(local)
    (out * loss_weights[rows_of(rank, sizes)]).sum().backward()
    torch.testing.assert_close(out, expected.detach()[rows_of(rank, sizes)])
    torch.testing.assert_close(local.grad, x_ref.grad[rows_of(rank, sizes)])
    torch.testing.assert_close(summed(layer.weight.grad), weight.grad)
    torch.testing.assert_close(summed(layer.gain.grad), gain.grad)
    torch.testing.assert_close(layer.running_mean, 0.9 + 0.1 * mean.detach())


def check_bad_use(rank: int, world_size: int) -> None:
    """Clear errors on every process, and the group still usable afterwards (nothing hangs)."""
    import pytest

    import equinorm_kernels as ek

    # Channel counts that differ between processes.
    layer = ek.EquiNormConv2d(3 + rank, 4, 3)
    with pytest.raises(ValueError, match=r"layer '<model>' has \d input channels here, but between 3 and 4"):
        ek.convert_sync_equinorm(layer)
    # A different number of layers.
    model = nn.Sequential(*[ek.EquiNormLinear(4, 4) for _ in range(1 + rank)])
    with pytest.raises(ValueError, match="different numbers of EquiNorm layers"):
        ek.convert_sync_equinorm(model)
    # A group whose batches are all empty.
    model = ek.convert_sync_equinorm(small_equinorm_net())
    with pytest.raises(ValueError, match="every process of the group has an empty batch"):
        model(torch.rand(0, 3, 6, 6))
    # Still in step: a real batch trains normally afterwards.
    out = model(torch.rand(2, 3, 6, 6))
    assert torch.isfinite(out).all()
    assert_identical_across_processes(model[0].running_mean, "running_mean")


def check_enorm_ddp_bit_identical(rank: int, world_size: int) -> None:
    """DDP + ENorm: parameters and optimizer state bit-identical on every process after training."""
    from torch.nn.parallel import DistributedDataParallel

    import equinorm_kernels as ek

    torch.manual_seed(rank)  # different initial weights: DDP broadcasts process 0's
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16, 3))  # fmt: skip
    model = DistributedDataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    enorm = ek.ENorm(model, optimizer)
    generator = torch.Generator().manual_seed(100 + rank)  # every process its own data
    for _ in range(3):
        x, y = torch.rand(4, 3, 6, 6, generator=generator), torch.randint(0, 3, (4,), generator=generator)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        enorm.step()
        optimizer.zero_grad()
    for name, param in net.named_parameters():
        assert_identical_across_processes(param.detach(), name)
        assert_identical_across_processes(optimizer.state[param]["momentum_buffer"], f"momentum of {name}")


def _sharded_net() -> nn.Module:
    # 4 and 5 output channels: uneven shards over 2 or 3 processes, an empty one for 4 over 3.
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(5 * 3 * 3, 3))  # fmt: skip


def check_enorm_fsdp_matches_unsharded(rank: int, world_size: int) -> None:
    """FSDP2 + ENorm + SGD momentum: weights, gradients and momenta equal one unsharded process."""
    import pytest
    from torch.distributed.fsdp import fully_shard

    import equinorm_kernels as ek

    torch.manual_seed(0)
    reference = _sharded_net().double()
    model = copy.deepcopy(reference)
    for index in (0, 2, 5):
        fully_shard(model[index])
    fully_shard(model)
    assert isinstance(model[2].weight, torch.distributed.tensor.DTensor)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_enorm, enorm = ek.ENorm(reference, ref_optimizer), ek.ENorm(model, optimizer)
    assert enorm.groups == ref_enorm.groups
    generator = torch.Generator().manual_seed(5)
    per_process = 2
    for _ in range(3):
        x = torch.rand(per_process * world_size, 3, 7, 7, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (per_process * world_size,), generator=generator)
        F.cross_entropy(reference(x), y).backward()
        mine = slice(rank * per_process, (rank + 1) * per_process)
        F.cross_entropy(model(x[mine]), y[mine]).backward()  # FSDP averages: the mean over all samples
        for opt in (ref_optimizer, optimizer):
            opt.step()
        ref_enorm.step()
        enorm.step()
        for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(param.full_tensor(), ref_param, rtol=1e-10, atol=1e-12, msg=name)
            torch.testing.assert_close(param.grad.full_tensor(), ref_param.grad, rtol=1e-10, atol=1e-12, msg=name)
            momentum = optimizer.state[param]["momentum_buffer"].full_tensor()
            torch.testing.assert_close(momentum, ref_optimizer.state[ref_param]["momentum_buffer"], rtol=1e-10,
                                       atol=1e-12, msg=name)  # fmt: skip
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
    assert enorm.energy().keys() == ref_enorm.energy().keys()
    for name, energy in enorm.energy().items():
        assert energy == pytest.approx(ref_enorm.energy()[name], rel=1e-10)

    # A grouped convolution sharded along its output channels cannot be a consumer: an error everywhere.
    grouped = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2))
    fully_shard(grouped)
    with pytest.raises(ValueError, match="grouped convolution .* sharded along its output channels"):
        ek.ENorm(grouped).step()


def check_example_trains(rank: int, world_size: int) -> None:
    """The torchrun example's training loop on a few digit-shaped images: both methods, DDP and FSDP2."""
    import argparse

    from equinorm_kernels.experiments import distributed as example
    from equinorm_kernels.experiments.data import Dataset

    generator = torch.Generator().manual_seed(3)
    images, labels = torch.rand(50, 1, 8, 8, generator=generator), torch.randint(0, 10, (50,), generator=generator)
    dataset = Dataset("random digits", images[:40], labels[:40], images[40:], labels[40:], 10)
    for fsdp in (False, True):
        args = argparse.Namespace(epochs=1, batch_size=15, lr=0.05, depth=8, fsdp=fsdp, backend="gloo", seed=0)
        for method in example.METHODS if not fsdp else ("enorm",):
            example.train(method, dataset, args)  # checks that every process holds the same parameters


CHECKS = {
    "sync_auto": (check_sync_matches_one_process, ("auto", False)),
    "sync_reference": (check_sync_matches_one_process, ("reference", False)),
    "sync_compiled": (check_sync_matches_one_process, ("auto", True)),
    "sync_per_tap": (check_sync_matches_one_process, ("auto", False, True)),
    "stats_fraction": (check_stats_fraction_per_process, ()),
    "bad_use": (check_bad_use, ()),
    "enorm_ddp": (check_enorm_ddp_bit_identical, ()),
    "enorm_fsdp": (check_enorm_fsdp_matches_unsharded, ()),
    "example": (check_example_trains, ()),
}


def run_checks(rank: int, world_size: int, result_dir: str, names: list[str]) -> None:
    """Run the named checks in order, writing each one's outcome ("ok" or the traceback) per process."""
    import traceback

    for name in names:
        worker, args = CHECKS[name]
        start = time.perf_counter()
        try:
            worker(rank, world_size, *args)
            outcome = "ok"
        except Exception:
            outcome = traceback.format_exc()
        (Path(result_dir) / f"{name}.{rank}").write_text(outcome)
        if os.environ.get("EQUINORM_KERNELS_TEST_TIMES"):
            print(f"{name} on process {rank}/{world_size}: {time.perf_counter() - start:.1f} s", flush=True)
        dist.barrier()


def run_world(world_size: int, result_dir: Path, names: list[str], timeout: float) -> dict[str, str]:
    """Every check's outcome on every process: {name: "ok" or what went wrong}."""
    result_dir.mkdir(parents=True, exist_ok=True)
    failure = None
    try:
        launch(world_size, run_checks, result_dir, str(result_dir), names, timeout=timeout)
    except Exception as error:  # a crash or a hang: the checks without an outcome report it
        failure = f"the processes failed: {error}"
    outcomes = {}
    for name in names:
        texts = [(result_dir / f"{name}.{rank}") for rank in range(world_size)]
        problems = [f"process {r}: {t.read_text()}" for r, t in enumerate(texts) if t.exists() and t.read_text() != "ok"]
        if not all(t.exists() for t in texts):
            problems.append(failure or "no outcome")
        outcomes[name] = "ok" if not problems else "\n".join(problems)
    return outcomes
