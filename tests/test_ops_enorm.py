"""The fused ENorm ops of every backend against the reference loop (enorm/sequential.py).

One fused cycle must leave weights, biases, gradients and optimizer state where the reference
loop leaves them, keep the network's function, be deterministic, pass opcheck, and reject a bad
program with a clear error.
"""
from __future__ import annotations

import copy

import pytest
import torch

from equinorm_kernels import ENorm, reference
from equinorm_kernels.ops.enorm import ENTRY_FIELDS, RescalingProgram

from kernel_backends import fused_backend_params, op
from nets import GroupedConvNet, SmallCNN, SmallResNet, mlp

pytestmark = pytest.mark.parametrize("backend,device", fused_backend_params())

NETS = {
    "mlp": (lambda: mlp((6, 8, 7, 3)), (5, 6)),
    "cnn": (SmallCNN, (2, 3, 8, 8)),
    "resnet": (SmallResNet, (2, 3, 8, 8)),
    "grouped": (GroupedConvNet, (2, 4, 6, 6)),
}


def _unbalanced(name: str, dtype=torch.float32, memory_format=None):
    torch.manual_seed(0)
    factory, input_shape = NETS[name]
    model = factory().to(dtype)
    with torch.no_grad():
        for i, param in enumerate(model.parameters()):
            param.mul_(0.25 + (i % 4))  # layers far from balanced, so every group moves
    if memory_format is not None:
        model = model.to(memory_format=memory_format)
    return model, torch.rand(input_shape, dtype=dtype)


def _pair(name, backend, device, dtype=torch.float32, **enorm_options):
    model, x = _unbalanced(name, dtype)
    fused_model, reference_model = model.to(device), copy.deepcopy(model).cpu()
    fused = ENorm(fused_model, backend=backend, **enorm_options)
    expected = ENorm(reference_model, backend="reference", **enorm_options)
    return (fused_model, fused), (reference_model, expected), x


def _assert_same_parameters(fused_model, reference_model, rtol, atol):
    for (name, got), want in zip(fused_model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(got.detach().cpu(), want.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("include_bias", [True, False])
@pytest.mark.parametrize("c", [1.0, 1.2])
def test_cycles_match_the_reference_loop(backend, device, net, include_bias, c):
    (fused_model, fused), (reference_model, expected), _ = _pair(
        net, backend, device, torch.float64, include_bias=include_bias, c=c
    )
    for _ in range(3):
        fused.step()
        expected.step()
        _assert_same_parameters(fused_model, reference_model, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_other_exponents(backend, device, p):
    (fused_model, fused), (reference_model, expected), _ = _pair("cnn", backend, device, torch.float64, p=p)
    fused.step()
    expected.step()
    _assert_same_parameters(fused_model, reference_model, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_weights(backend, device, dtype):
    (fused_model, fused), (reference_model, expected), _ = _pair("resnet", backend, device, dtype)
    fused.step()
    expected.step()
    rtol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    _assert_same_parameters(fused_model, reference_model, rtol=rtol, atol=1e-6)


def test_channels_last_conv_weights(backend, device):
    model, x = _unbalanced("resnet", torch.float64, memory_format=torch.channels_last)
    assert not model.layer1[0].conv1.weight.is_contiguous()
    reference_model = copy.deepcopy(model)
    model = model.to(device)
    ENorm(model, backend=backend).step()
    ENorm(reference_model, backend="reference").step()
    _assert_same_parameters(model, reference_model, rtol=1e-12, atol=1e-14)
    assert model.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("net", list(NETS))
def test_balance_preserves_the_function_and_lowers_the_energy(backend, device, net):
    model, x = _unbalanced(net, torch.float64)
    model, x = model.to(device), x.to(device)
    before = model(x)
    enorm = ENorm(model, backend=backend)
    energy = sum(enorm.energy().values())
    cycles = enorm.balance(tol=1e-9, max_cycles=500)
    assert cycles < 500
    torch.testing.assert_close(model(x), before, rtol=1e-9, atol=1e-12)
    assert sum(enorm.energy().values()) < energy


@pytest.mark.parametrize(
    "optimizer_factory",
    [
        lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        lambda params: torch.optim.Adam(params, lr=0.01, amsgrad=True),
    ],
    ids=["sgd", "adam"],
)
def test_gradients_and_optimizer_state_match_the_reference(backend, device, optimizer_factory):
    def trained(model_device):
        model, x = _unbalanced("cnn", torch.float64)
        model, x = model.to(model_device), x.to(model_device)
        optimizer = optimizer_factory(model.parameters())
        for _ in range(2):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
        model(x).square().sum().backward()
        return model, optimizer

    fused_model, fused_optimizer = trained(device)
    reference_model, reference_optimizer = trained("cpu")
    ENorm(fused_model, fused_optimizer, backend=backend).step()
    ENorm(reference_model, reference_optimizer, backend="reference").step()
    _assert_same_parameters(fused_model, reference_model, rtol=1e-12, atol=1e-14)
    for got, want in zip(fused_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(got.grad.cpu(), want.grad, rtol=1e-12, atol=1e-14)
        for key, value in reference_optimizer.state[want].items():
            if value.dim() > 0:
                torch.testing.assert_close(fused_optimizer.state[got][key].cpu(), value, rtol=1e-12, atol=1e-14)


def _pair_program(producer, consumer, *, groups=1, columns_per_channel=1):
    """Entries balancing producer rows (counted, d) against consumer columns (counted, 1/d)."""
    return [0, 0, 1, 1, 1, 1, 1, 1, -1, 1, groups, columns_per_channel]


@pytest.mark.parametrize(
    "producer_shape,consumer_shape,groups,columns_per_channel",
    [((6, 3, 3, 3), (4, 6, 3, 3), 1, 1), ((6, 5), (4, 6), 1, 1), ((8, 2, 3, 3), (8, 2, 1, 1), 4, 1), ((3, 4), (5, 12), 1, 4)],
    ids=["conv", "linear", "grouped", "flatten"],
)
def test_group_op_matches_the_reference_pair_balance(backend, device, producer_shape, consumer_shape, groups, columns_per_channel):
    torch.manual_seed(3)
    producer, consumer = torch.randn(producer_shape, dtype=torch.float64), torch.randn(consumer_shape, dtype=torch.float64)
    expected_producer, expected_consumer = producer.clone(), consumer.clone()
    expected_d = reference.enorm_balance_pair_(
        expected_producer, expected_consumer, c=1.1, groups=groups, columns_per_channel=columns_per_channel
    )
    tensors = [producer.to(device), consumer.to(device)]
    entries = _pair_program(producer, consumer, groups=groups, columns_per_channel=columns_per_channel)
    d = op(backend, "enorm_group_")(tensors, entries, 2.0, 1.1)
    torch.testing.assert_close(d.cpu(), expected_d, rtol=1e-12, atol=0)
    torch.testing.assert_close(tensors[0].cpu(), expected_producer, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(tensors[1].cpu(), expected_consumer, rtol=1e-12, atol=1e-15)


def test_zero_energy_channels_keep_coefficient_one(backend, device):
    producer, consumer = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    producer[1] = 0  # dead unit
    consumer[:, 2] = 0  # unread channel
    tensors = [producer.to(device), consumer.to(device)]
    d = op(backend, "enorm_group_")(tensors, _pair_program(producer, consumer), 2.0, 1.0)
    assert torch.isfinite(d).all() and d[1] == 1 and d[2] == 1
    assert all(torch.isfinite(t).all() for t in tensors)


def test_bit_identical_across_thread_counts(backend, device):
    threads = torch.get_num_threads()

    def run(num_threads):
        torch.set_num_threads(num_threads)
        model, _ = _unbalanced("resnet")
        model = model.to(device)
        ENorm(model, backend=backend).step()
        return [p.detach().clone() for p in model.parameters()]

    try:
        first = run(threads)
        for again in (run(threads), run(1), run(max(2, threads))):
            assert all(torch.equal(a, b) for a, b in zip(first, again))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("dtype,p", [(torch.float32, 2.0), (torch.float16, 2.0), (torch.float32, 3.0), (torch.float64, 1.0)])
def test_cycle_op_equals_its_groups_one_call_each(backend, device, net, dtype, p):
    # A cycle may carry work from one group to the next (the CPU kernel sums a weight's new row
    # energies while it scales the weight's columns); the result must be exactly that of the
    # groups run one op call each.
    model, _ = _unbalanced(net, dtype)
    model = model.to(device)
    enorm = ENorm(model, backend=backend, include_bias=True)
    program = RescalingProgram(enorm._state)
    for group in enorm._groups:
        program.add_group(group, include_bias=True)
    by_groups = [t.clone() for t in program.tensors]
    op(backend, "enorm_cycle_")(program.tensors, program.entries, program.group_sizes, p, 1.1)
    first = 0
    for size in program.group_sizes:
        entries = program.entries[first * ENTRY_FIELDS:(first + size) * ENTRY_FIELDS]
        op(backend, "enorm_group_")(by_groups, entries, p, 1.1)
        first += size
    for index, (got, want) in enumerate(zip(program.tensors, by_groups)):
        assert torch.equal(got, want), f"tensor {index} differs"


def test_opcheck_enorm_ops(backend, device):
    def tensors():
        torch.manual_seed(4)
        return [torch.randn(6, 3, 3, 3, device=device), torch.randn(6, device=device), torch.randn(4, 6, 3, 3, device=device)]

    entries = [0, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 2, 1, -1, 1, 1, 1]
    torch.library.opcheck(op(backend, "enorm_group_"), (tensors(), entries, 2.0, 1.0))
    torch.library.opcheck(op(backend, "enorm_cycle_"), (tensors(), entries * 2, [3, 3], 2.0, 1.0))


def test_ops_reject_a_bad_program(backend, device):
    tensors = [torch.randn(6, 3, device=device), torch.randn(4, 5, device=device)]
    group, cycle = op(backend, "enorm_group_"), op(backend, "enorm_cycle_")
    with pytest.raises(RuntimeError, match="records of 6"):
        group(tensors, [0, 0, 1], 2.0, 1.0)
    with pytest.raises(RuntimeError, match="mixes 6 and 5 channels"):
        group(tensors, _pair_program(*tensors), 2.0, 1.0)
    with pytest.raises(RuntimeError, match="names tensor 7"):
        group(tensors, [7, 0, 1, 1, 1, 1], 2.0, 1.0)
    with pytest.raises(RuntimeError, match="counted rows and counted columns"):
        group(tensors, [0, 0, 1, 1, 1, 1], 2.0, 1.0)
    with pytest.raises(RuntimeError, match="p must be"):
        group(tensors, [0, 0, 1, 1, 1, 1, 0, 1, -1, 1, 1, 1], 0.5, 1.0)
    with pytest.raises(RuntimeError, match="group_sizes"):
        cycle(tensors, [0, 0, 1, 1, 1, 1, 0, 1, -1, 1, 1, 1], [3], 2.0, 1.0)
    assert len([0, 0, 1, 1, 1, 1]) == ENTRY_FIELDS
