"""The GPU runtime: no host-device synchronisation in a training or eval step, data checks that run
on the device and report later, CUDA-graph capture, and deterministic kernel choice.

"No synchronisation" is proven without a GPU: a dispatch mode fails on every aten op that copies a
value to the host, and the CUDA policy of the data checks is put in force for CPU tensors (the
same code runs for both; only CUDA events are absent on the CPU). With a GPU the same tests also
run on CUDA tensors.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import equinorm_kernels as ek
from equinorm_kernels import _value_checks, backends

from kernel_backends import devices, fused_backend_params

aten = torch.ops.aten
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

# Ops whose result the host must read: each waits for the device's queue to drain.
_HOST_READS = {
    aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.allclose, aten.nonzero,
    aten.masked_select, aten._unique, aten._unique2, aten.unique_consecutive, aten.unique_dim,
    aten.repeat_interleave,
}
_COPIES = {aten._to_copy, aten.copy_, aten.to}


class FailOnHostSync(TorchDispatchMode):
    """Raises on any aten op that reads a device value on the host, or copies one there blocking."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in _HOST_READS:
            raise AssertionError(f"{func} reads a tensor value on the host")
        if func.overloadpacket in _COPIES and _blocking_copy_to_host(func, args, kwargs):
            raise AssertionError(f"{func} copies a device tensor to the host and waits for it")
        return func(*args, **kwargs)


def _blocking_copy_to_host(func, args, kwargs) -> bool:
    if func.overloadpacket is aten.copy_:
        destination, source = args[0], args[1]
        blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        return source.device.type != "cpu" and destination.device.type == "cpu" and blocking
    source = args[0]
    target = kwargs.get("device")
    blocking = not kwargs.get("non_blocking", False)
    return source.device.type != "cpu" and target is not None and torch.device(target).type == "cpu" and blocking


@pytest.fixture
def gpu_check_policy(monkeypatch):
    """The data checks run as on CUDA for every device (deferred), with a fresh record, restored after."""
    monkeypatch.setattr(_value_checks, "DEFERRED_DEVICE_TYPES", {"cuda", "cpu"})
    monkeypatch.setattr(_value_checks, "_FLAGS", {})
    ek.set_value_checks("auto")
    yield
    ek.set_value_checks("auto")


def _model(backend: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        ek.EquiNormConv2d(3, 8, 3, padding=1, backend=backend),
        nn.ReLU(),
        ek.EquiNormConv2d(8, 8, 3, stride=2, padding=1, momentum=None, backend=backend),  # cumulative average
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        ek.EquiNormLinear(8, 4, mode="exact", backend=backend),
    ).to(device)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def _step_params():
    return [pytest.param("auto", device, id=f"auto-{device}") for device in devices()] + fused_backend_params()


def test_the_sync_detector_catches_a_host_read():
    x = torch.ones(3)
    with pytest.raises(AssertionError, match="reads a tensor value on the host"):
        with FailOnHostSync():
            bool(x.sum() > 0)


@pytest.mark.parametrize("backend, device", _step_params())
def test_training_and_eval_steps_never_synchronise(backend, device, gpu_check_policy):
    model = _model(backend, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(4, 3, 8, 8, device=device)
    _train_step(model, optimizer, x)  # first calls create optimizer state and the check flags
    with FailOnHostSync():
        for _ in range(3):
            _train_step(model, optimizer, x)
        model.eval()
        with torch.no_grad():
            model(x)
    ek.check_values()  # every input was good: nothing to report


@pytest.mark.parametrize("backend, device", _step_params())
def test_per_tap_layers_on_signed_inputs_never_synchronise(backend, device, gpu_check_policy):
    # Signed inputs: the backward needs sign(x) in the flagged channels, and must learn which
    # channels are flagged without reading them back from the device.
    torch.manual_seed(0)
    model = nn.Sequential(
        ek.EquiNormConv2d(3, 8, 3, padding=1, per_tap=True, backend=backend),
        ek.EquiNormConv2d(8, 8, 3, stride=2, padding=1, per_tap=True, backend=backend),
    ).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(4, 3, 8, 8, device=device) - 0.5
    _train_step(model, optimizer, x)
    with FailOnHostSync():
        for _ in range(3):
            _train_step(model, optimizer, x)
    ek.check_values()


@pytest.mark.parametrize("device", devices())
def test_an_enorm_cycle_never_synchronises(device):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    enorm = ek.ENorm(model, optimizer)
    x = torch.rand(4, 3, 8, 8, device=device)
    _train_step(model, optimizer, x)
    enorm.step()
    with FailOnHostSync():
        _train_step(model, optimizer, x)
        enorm.step()


def _images(device: str = "cpu", batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, 6, 6, device=device)


@pytest.mark.parametrize("device", devices())
def test_deferred_checks_report_a_bad_input_at_a_later_call(device, gpu_check_policy):
    layer = ek.EquiNormConv2d(3, 4, 3).to(device)
    bad = _images(device)
    bad[1, 2, 0, 0] = float("nan")
    layer(bad)  # queued: the call itself does not wait for the check
    if device == "cuda":
        torch.cuda.synchronize()  # the copy of the flags has landed by now
    with pytest.raises(ValueError, match="x had NaN or Inf values"):
        layer(_images(device))
    layer(_images(device))  # reported once, then clean
    ek.check_values()


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda layer, x: x.sub_(0.75), "negative channel mean"),
        (lambda layer, x: layer.weight.data.view(-1)[3].fill_(float("inf")), "weight had NaN or Inf"),
        (lambda layer, x: layer.gain.data[1].fill_(float("nan")), "gain had NaN or Inf"),
    ],
    ids=["negative-mean", "inf-weight", "nan-gain"],
)
def test_check_values_reports_every_kind_of_bad_operand_at_once(spoil, message, gpu_check_policy):
    layer = ek.EquiNormConv2d(3, 4, 3, statistic="mean")  # the paper's statistic: a negative mean is an error
    x = _images()
    spoil(layer, x)
    layer(x)
    with pytest.raises(ValueError, match=message):
        ek.check_values()
    ek.check_values()  # cleared by the report


def test_deferred_checks_of_the_eval_path_name_the_running_mean(gpu_check_policy):
    layer = ek.EquiNormConv2d(3, 4, 3).eval()
    layer.running_mean[0] = -1.0
    layer(_images())
    with pytest.raises(ValueError, match="mean had NaN, Inf or negative values"):
        ek.check_values("cpu")


def test_deferred_channel_mean_accepts_negative_means_but_not_nan(gpu_check_policy):
    x = _images() - 2.0
    ek.channel_mean(x)
    ek.check_values()
    x[0, 0, 0, 0] = float("inf")
    ek.channel_mean(x)
    with pytest.raises(ValueError, match="x had NaN or Inf values"):
        ek.check_values()


def test_sync_mode_raises_at_the_offending_call_on_deferred_devices(gpu_check_policy):
    ek.set_value_checks("sync")
    bad = _images()
    bad[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"x contains NaN or Inf"):
        ek.EquiNormConv2d(3, 4, 3)(bad)


def test_checks_off_record_nothing(gpu_check_policy):
    ek.set_value_checks(False)
    bad = _images()
    bad[0, 0, 1, 1] = float("nan")
    ek.EquiNormConv2d(3, 4, 3)(bad)
    ek.set_value_checks(True)
    ek.check_values()


def test_value_check_modes_are_validated():
    with pytest.raises(ValueError, match="mode must be one of"):
        ek.set_value_checks("sometimes")


def test_auto_on_cuda_is_deterministic_by_default(monkeypatch):
    """No timing decides the kernel unless asked for: with both GPU backends present, "auto" is the
    CUDA extension (covered with fake backends in test_triton_backend.py; here the real registry)."""
    monkeypatch.delenv(backends.FORCE_ENV, raising=False)
    available = ek.available_backends("cuda") if torch.cuda.is_available() else []
    chosen = backends.resolve_backend("auto", torch.device("cuda")) if available else None
    if "cuda" in available:
        assert chosen.name == "cuda"
    elif "triton" in available:
        assert chosen.name == "triton"
    else:
        pytest.skip("no GPU backend here")


def test_triton_autotuning_is_opt_in():
    """Autotuning picks launch configurations (and so summation orders) by timing: off unless asked."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    code = "from equinorm_kernels.triton import _runtime; print(_runtime.AUTOTUNE)"
    environment = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EQUINORM_KERNELS_TRITON_AUTOTUNE")}

    def autotune(**extra: str) -> str:
        run = subprocess.run([sys.executable, "-c", code], env={**environment, **extra}, capture_output=True,
                             text=True, check=True)
        return run.stdout.strip()

    assert autotune() == "False"
    assert autotune(EQUINORM_KERNELS_TRITON_AUTOTUNE="1") == "True"


# ---- on a GPU ----

@needs_cuda
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if b in ek.available_backends("cuda")] or ["auto"])
def test_forward_and_backward_capture_into_a_cuda_graph_and_replay(backend):
    model = _model(backend, "cuda")
    static_x = torch.rand(4, 3, 8, 8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: kernels compiled, flags allocated
        for _ in range(3):
            model(static_x).square().mean().backward()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = model(static_x).square().mean()
        static_loss.backward()

    for _ in range(2):
        eager = copy.deepcopy(model)  # the state the replay starts from (running means move)
        eager.zero_grad(set_to_none=True)
        static_x.copy_(torch.rand_like(static_x))
        graph.replay()
        loss = eager(static_x).square().mean()
        loss.backward()
        torch.testing.assert_close(static_loss, loss.detach(), rtol=0, atol=0)
        for (name, captured), (_, expected) in zip(model.named_parameters(), eager.named_parameters()):
            torch.testing.assert_close(captured.grad, expected.grad, rtol=0, atol=0, msg=name)
        for (name, captured), (_, expected) in zip(model.named_buffers(), eager.named_buffers()):
            torch.testing.assert_close(captured, expected, rtol=0, atol=0, msg=name)
    ek.check_values()


@needs_cuda
def test_results_are_bit_identical_across_processes_by_default():
    import subprocess
    import sys

    script = (
        "import torch, equinorm_kernels as ek\n"
        "torch.manual_seed(0)\n"
        "x = torch.rand(8, 64, 28, 28, device='cuda'); w = torch.randn(64, 64, 3, 3, device='cuda')\n"
        "w.requires_grad_(True)\n"
        "out, mean = ek.equinorm_forward(x, w)\n"
        "out.square().sum().backward()\n"
        "print(hash(out.detach().cpu().numpy().tobytes()), hash(mean.cpu().numpy().tobytes()),"
        " hash(w.grad.cpu().numpy().tobytes()))\n"
    )
    runs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(runs) == 1, runs
