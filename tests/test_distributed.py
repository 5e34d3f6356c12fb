"""Synchronised EquiNorm statistics and ENorm under DDP/FSDP2: several processes over gloo on CPU.

Each world size starts its processes once (a module fixture) and runs every check there; each test
then reports one check's outcome on every process. Each launch is killed after a timeout, and the
process group's collectives time out too, so a hang fails the tests instead of blocking the suite.
"""
from __future__ import annotations

import pytest
import torch.distributed as dist

import equinorm_kernels as ek

import distributed_workers as workers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

TWO_PROCESS_CHECKS = ["sync_auto", "sync_reference", "sync_compiled", "sync_per_tap", "stats_fraction", "bad_use",
                      "enorm_ddp", "enorm_fsdp", "example"]  # fmt: skip
THREE_PROCESS_CHECKS = ["sync_auto", "sync_per_tap", "stats_fraction", "enorm_fsdp"]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[int, dict[str, str]]:
    root = tmp_path_factory.mktemp("distributed")
    return {
        2: workers.run_world(2, root / "two", TWO_PROCESS_CHECKS, timeout=150),
        3: workers.run_world(3, root / "three", THREE_PROCESS_CHECKS, timeout=120),
    }


def assert_passed(outcomes: dict[int, dict[str, str]], world_size: int, name: str) -> None:
    outcome = outcomes[world_size][name]
    if outcome != "ok":
        pytest.fail(f"{name} on {world_size} processes:\n{outcome}", pytrace=False)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sync_statistics_equal_one_process_on_the_concatenated_batch(outcomes, world_size):
    # Outputs, each process's input gradient, summed weight/gain/bias gradients, running means (identical
    # on every process); uneven batches, with three processes one of them empty.
    assert_passed(outcomes, world_size, "sync_auto")


@pytest.mark.parametrize("world_size", [2, 3])
def test_sync_per_tap_statistics_equal_one_process_on_the_concatenated_batch(outcomes, world_size):
    # Per-tap means (C, *kernel) reduced over the group, a stride-2 layer among them; with three
    # processes one of them has an empty batch.
    assert_passed(outcomes, world_size, "sync_per_tap")


def test_sync_statistics_on_the_reference_backend(outcomes):
    assert_passed(outcomes, 2, "sync_reference")


def test_sync_statistics_under_compile_fullgraph(outcomes):
    assert_passed(outcomes, 2, "sync_compiled")


@pytest.mark.parametrize("world_size", [2, 3])
def test_stats_fraction_applies_per_process(outcomes, world_size):
    assert_passed(outcomes, world_size, "stats_fraction")


def test_bad_use_raises_on_every_process_without_hanging(outcomes):
    # Differing channel counts, differing layer counts, a group whose batches are all empty.
    assert_passed(outcomes, 2, "bad_use")


def test_enorm_under_ddp_keeps_processes_bit_identical(outcomes):
    assert_passed(outcomes, 2, "enorm_ddp")


@pytest.mark.parametrize("world_size", [2, 3])
def test_enorm_under_fsdp2_equals_the_unsharded_cycle(outcomes, world_size):
    assert_passed(outcomes, world_size, "enorm_fsdp")


def test_no_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="initialised process group.*init_process_group"):
        ek.convert_sync_equinorm(ek.EquiNormLinear(4, 3))


def test_communication_one_all_reduce_of_c_plus_1_forward_and_of_c_backward():
    from equinorm_kernels.bench import communication

    with communication._process_group():
        forward, backward = communication.measure_equinorm(24)
    assert [(c.kind, c.values, c.bytes) for c in forward] == [("all_reduce", 25, 100)]
    assert [(c.kind, c.values, c.bytes) for c in backward] == [("all_reduce", 24, 96)]
    assert not dist.is_initialized()  # the measurement's own group is gone
    # Ring all-reduce: each of W processes sends 2 (W - 1) / W of the message.
    assert forward[0].sent_per_process(4) == 150.0


def test_torchrun_example_trains_and_keeps_processes_identical(outcomes):
    assert_passed(outcomes, 2, "example")


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_converted_model_copies_pickles_and_reverts_clearly(one_process_group):
    import copy
    import pickle

    import torch

    torch.manual_seed(0)
    plain = workers.small_equinorm_net()
    model = ek.convert_sync_equinorm(copy.deepcopy(plain))
    assert all(layer.statistics_sync is model[0].statistics_sync for layer in (model[2], model[5]))
    twin = copy.deepcopy(model)  # shares the process group
    assert twin[0].statistics_sync is model[0].statistics_sync
    with pytest.raises(TypeError, match="cannot be pickled: save its state_dict"):
        pickle.dumps(model)
    x = torch.rand(3, 3, 6, 6)
    # One process: the group's statistics are this process's, as without synchronisation.
    torch.testing.assert_close(model(x), plain(x))
    torch.testing.assert_close(model[2].running_mean, plain[2].running_mean)
    for layer in (model[0], model[2], model[5]):
        layer.statistics_sync = None
    torch.testing.assert_close(model(x), plain(x))
