"""The Triton backend: what is specific to it, on top of the backend-parametrised suites.

The kernels run natively on CUDA tensors when a GPU is present, and under Triton's interpreter on
CPU tensors otherwise (tests/conftest.py switches the interpreter on for the test process before
``equinorm_kernels`` is imported). test_ops_*.py check every backend's ops against the reference;
here: registration, schemas and fake kernels, the launch paths that small inputs do not take by
default (channel sums split over several programs, rows looped over several channel and tap
blocks, every autotuning configuration), torch.compile, ENorm through the backend, import without
Triton, and how ``backend="auto"`` chooses between the CUDA extension and Triton on a GPU (with
fake timers, so it runs without one).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import equinorm_kernels
from equinorm_kernels import backends, functional, reference
from equinorm_kernels import triton as triton_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CPU tensors under the interpreter; CUDA tensors with a GPU (compiled, unless TRITON_INTERPRET is set).
DEVICES = [
    device
    for device, present in (("cpu", triton_backend.interpreted()), ("cuda", torch.cuda.is_available()))
    if present and "triton" in equinorm_kernels.available_backends(device)
]
needs_triton = pytest.mark.skipif(not DEVICES, reason="the Triton backend cannot run here")
on_each_device = pytest.mark.parametrize(
    "device",
    [
        pytest.param(device, marks=pytest.mark.skipif(device not in DEVICES, reason=reason))
        for device, reason in (
            ("cpu", "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before the first import)"),
            ("cuda", "no GPU with Triton"),
        )
    ],
)

if DEVICES:
    from equinorm_kernels.triton import _runtime
    from equinorm_kernels.triton import equinorm as triton_equinorm

OPS = ("channel_mean", "equinorm_weight", "equinorm_forward", "equinorm_backward", "enorm_group_", "enorm_cycle_")
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _op(name: str):
    return getattr(torch.ops.equinorm_kernels, "triton_" + name)


class RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the names of the ops dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(shape, *, layout: str = "contiguous", seed: int = 0) -> torch.Tensor:
    """float64 CPU weight; row 0 one-signed (the single_pass fallback), row 1 constant where it has
    4 or more values (no positive mass: a zero row)."""
    w = torch.randn(shape, generator=_generator(seed), dtype=torch.float64)
    w[0] = w[0].abs() + 0.1
    if shape[0] > 2 and w[1].numel() >= 4:
        w[1] = 0.3
    return _layout(w, layout)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and t.dim() in (4, 5):
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    if layout == "strided":  # neither contiguous nor channels_last
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    return t


def _input(weight_shape, groups: int, *, batch: int = 3, spatial: int = 5, layout: str = "contiguous") -> torch.Tensor:
    """Non-negative float64 CPU input (post-ReLU activations) for a weight of ``weight_shape``."""
    dims = (spatial,) * (len(weight_shape) - 2)
    x = torch.rand((batch, weight_shape[1] * groups, *dims), generator=_generator(1), dtype=torch.float64)
    return _layout(x, layout)


def _max_error(value: torch.Tensor, reference64: torch.Tensor) -> float:
    return (value.double() - reference64).abs().max().item()


def assert_matches_reference(kernel, same_precision, reference64, precision: torch.dtype) -> None:
    """fp64/fp32: close to the float64 reference; fp16/bf16: within twice the error of the
    reference run in the same precision, plus a floor for outputs it rounds exactly."""
    scale = max(reference64.abs().max().item(), 1e-30)
    if precision == torch.float64:
        tolerance = 1e-12 * scale
    elif precision == torch.float32:
        tolerance = 5e-6 * scale
    else:
        tolerance = 2 * _max_error(same_precision, reference64) + 1e-6 * scale
    assert _max_error(kernel, reference64) <= tolerance, (_max_error(kernel, reference64), tolerance)


def _reference_forward(x, weight, gain, stats_fraction, groups, mode, ratio=0.75, eps=1e-5):
    mean = reference.equinorm.channel_mean_unchecked(x, stats_fraction)
    return reference.equinorm.equinorm_weight_unchecked(weight, mean, ratio, groups, mode, gain, eps), mean


def _triton_forward(x, weight, gain, stats_fraction, groups, mode, ratio=0.75, eps=1e-5):
    return functional.equinorm_forward(
        x, weight, stats_fraction=stats_fraction, ratio=ratio, groups=groups, mode=mode, gain=gain, eps=eps,
        backend="triton",
    )


# ---- registration ----

@needs_triton
@on_each_device
def test_backend_is_registered_for_its_devices_and_never_auto_picked_on_the_cpu(device):
    backend = backends.resolve_backend("triton", torch.device(device))
    assert backend.name == "triton"
    assert backend.auto_device_types == frozenset({"cuda"})
    assert backend.enorm_cycle is not None
    assert "cpu" in backend.device_types if _runtime.INTERPRETED else backend.device_types == frozenset({"cuda"})
    assert backends.resolve_backend("auto", torch.device("cpu")).name != "triton"
    assert triton_backend.register()  # a second call changes nothing


@needs_triton
def test_kernels_run_the_way_triton_was_configured_at_import():
    from triton.runtime.interpreter import InterpretedFunction

    kernel = triton_equinorm._finish_channel_means_kernel
    assert isinstance(kernel, InterpretedFunction) == _runtime.INTERPRETED == triton_backend.interpreted()
    # Under the interpreter autotuning keeps only the default configuration: nothing to benchmark.
    tuned = triton_equinorm._planar_channel_sums_kernel
    assert len(tuned.configs) == (1 if not _runtime.AUTOTUNE else len(triton_equinorm._CHANNEL_SUM_CONFIGS))


def _normalised_schema(op) -> tuple:
    """Argument names, types and mutability, and return types, of an op's schema: the Triton ops'
    schemas are inferred from Python annotations (int -> SymInt, unnamed returns)."""
    schema = op.default._schema

    def kind(t) -> str:
        return str(t).replace("SymInt", "int")

    arguments = tuple(
        (a.name, kind(a.type), a.alias_info is not None and a.alias_info.is_write) for a in schema.arguments
    )
    return arguments, tuple(kind(r.type) for r in schema.returns)


@needs_triton
@pytest.mark.skipif(not equinorm_kernels.build_info()["compiled"], reason="the compiled extension is not built")
@pytest.mark.parametrize("name", OPS)
def test_schemas_match_the_compiled_ops(name):
    compiled = getattr(torch.ops.equinorm_kernels, name)
    assert _normalised_schema(_op(name)) == _normalised_schema(compiled)
    assert _op(name).default._schema.name == f"equinorm_kernels::triton_{name}"


def _equinorm_samples(device: str):
    """Arguments of every EquiNorm op for a contiguous and a channels_last float32 weight."""
    samples = []
    for layout in ("contiguous", "channels_last"):
        w = _weight((4, 3, 3, 3), layout=layout).float().to(device)
        x = _input((4, 3, 3, 3), 1, layout=layout).float().to(device)
        mean = x.mean(dim=(0, 2, 3))
        gain = torch.linspace(0.5, 1.5, 4, device=device)
        _, stats = _op("equinorm_weight")(w, mean, gain, 0.5, 1, "exact", 1e-5)
        samples.append({
            "channel_mean": (x, 2, "mean"),
            "equinorm_weight": (w, mean, gain, 0.5, 1, "single_pass", 1e-5),
            "equinorm_forward": (x, 2, w, gain, 0.5, 1, "exact", 1e-5, "mean"),
            "equinorm_backward": (torch.randn_like(w), w, mean, gain, stats, 1),
        })
        signed = x - 0.5
        samples.append({
            "channel_mean": (signed, 2, "abs_mean"),
            "equinorm_forward": (signed, 2, w, gain, 0.5, 1, "exact", 1e-5, "abs_mean"),
        })
    return samples


def _enorm_program(device: str, dtype=torch.float32):
    """A conv -> grouped conv -> flatten -> linear chain as one ENorm program (two groups)."""
    g = _generator(3)
    conv = torch.randn(6, 3, 3, 3, generator=g).to(device, dtype)
    bias = torch.randn(6, generator=g).to(device, dtype)
    grouped = torch.randn(4, 3, 3, 3, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    grouped_grad = torch.randn(4, 3, 3, 3, generator=g).to(device, dtype)
    linear = torch.randn(5, 16, generator=g).to(device, dtype)
    tensors = [conv, bias, grouped, grouped_grad, linear]
    entries = [
        0, 0, 1, 1, 1, 1,  # conv rows * d
        1, 0, 1, 1, 1, 1,  # its bias * d
        2, 1, -1, 1, 2, 1,  # grouped conv columns / d (2 groups)
        3, 1, 1, 0, 2, 1,  # their gradient * d, not counted
        2, 0, 1, 1, 1, 1,  # grouped conv rows * d (next group)
        4, 1, -1, 1, 1, 4,  # linear columns / d, 4 columns per channel (a flatten of 2x2)
    ]
    return tensors, entries, [4, 2]


@needs_triton
@on_each_device
def test_fake_kernels_give_the_real_outputs_metadata(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    samples = _equinorm_samples(device)
    calls = list(samples[2].items()) + list(samples[3].items())  # channels_last, both statistics
    tensors, entries, sizes = _enorm_program(device)
    calls += [
        ("enorm_group_", (tensors, entries[:24], 2.0, 1.0)),
        ("enorm_cycle_", (tensors, entries, sizes, 2.0, 1.0)),
    ]

    def converted(args, convert):
        def one(a):
            if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
                return [convert(t) for t in a]
            return convert(a) if isinstance(a, torch.Tensor) else a
        return [one(a) for a in args]

    for name, args in calls:
        real = _op(name)(*converted(args, torch.clone))
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = _op(name)(*converted(args, mode.from_tensor))
        for r, f in zip(real if isinstance(real, tuple) else (real,), fake if isinstance(fake, tuple) else (fake,)):
            assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride()), name


@needs_triton
@on_each_device
def test_opcheck_every_triton_op(device):
    for sample in _equinorm_samples(device):
        for name, args in sample.items():
            torch.library.opcheck(_op(name), args)
    tensors, entries, sizes = _enorm_program(device)
    torch.library.opcheck(_op("enorm_group_"), (tensors, entries[:24], 2.0, 1.0))
    torch.library.opcheck(_op("enorm_cycle_"), (tensors, entries, sizes, 2.0, 1.0))


# ---- EquiNorm against the reference ----

# (weight shape, groups): C = 1 and 3, 1x1 to 7x7, depthwise, Linear, 1-D and 3-D convs.
CASES = {
    "3x3": ((4, 3, 3, 3), 1),
    "C1": ((3, 1, 3, 3), 1),
    "1x1": ((4, 3, 1, 1), 1),
    "5x5": ((3, 2, 5, 5), 1),
    "7x7": ((3, 3, 7, 7), 1),
    "depthwise": ((4, 1, 3, 3), 4),
    "linear": ((5, 6), 1),
    "conv1d": ((3, 2, 4), 1),
    "conv3d": ((3, 2, 3, 3, 3), 1),
}


@needs_triton
@on_each_device
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["single_pass", "exact"])
def test_forward_matches_reference_in_float64(device, case, mode):
    shape, groups = CASES[case]
    w, x = _weight(shape), _input(shape, groups)
    gain = torch.linspace(0.5, 1.5, shape[0], dtype=torch.float64)
    expected, expected_mean = _reference_forward(x, w, gain, 1.0, groups, mode)
    with RecordOps() as recorded:
        out, mean = _triton_forward(x.to(device), w.to(device), gain.to(device), 1.0, groups, mode)
    assert "equinorm_kernels::triton_equinorm_forward" in recorded.names
    assert_matches_reference(out.cpu(), expected, expected, torch.float64)
    assert_matches_reference(mean.cpu(), expected_mean, expected_mean, torch.float64)


@needs_triton
@on_each_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["3x3", "depthwise", "linear"])
def test_forward_in_lower_precision(device, dtype, case):
    shape, groups = CASES[case]
    w64, x64 = _weight(shape), _input(shape, groups)
    w, x = w64.to(dtype), x64.to(dtype)
    expected, _ = _reference_forward(x.double(), w.double(), None, 1.0, groups, "single_pass")
    same_precision, _ = _reference_forward(x, w, None, 1.0, groups, "single_pass")
    out, _ = _triton_forward(x.to(device), w.to(device), None, 1.0, groups, "single_pass")
    assert out.dtype == dtype
    assert_matches_reference(out.cpu(), same_precision, expected, dtype)


@needs_triton
@on_each_device
@pytest.mark.parametrize(
    "weight_layout,x_layout,stats_fraction",
    [("channels_last", "channels_last", 1.0), ("strided", "contiguous", 0.5), ("contiguous", "strided", 0.4)],
)
def test_layouts_and_stats_fraction(device, weight_layout, x_layout, stats_fraction):
    shape = (4, 3, 3, 3)
    w, x = _weight(shape, layout=weight_layout), _input(shape, 1, batch=5, layout=x_layout)
    expected, expected_mean = _reference_forward(x, w, None, stats_fraction, 1, "exact")
    out, mean = _triton_forward(x.to(device), w.to(device), None, stats_fraction, 1, "exact")
    assert_matches_reference(out.cpu(), expected, expected, torch.float64)
    assert_matches_reference(mean.cpu(), expected_mean, expected_mean, torch.float64)
    if weight_layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@needs_triton
@on_each_device
@pytest.mark.parametrize(
    "shape",
    [(3, 40, 8, 8), (2, 3, 9, 9), (3, 2500)],
    ids=["two-channel-blocks", "two-tap-blocks", "linear-two-channel-blocks"],
)
@pytest.mark.parametrize("mode", ["single_pass", "exact"])
def test_rows_longer_than_one_tile_forward_and_backward(device, shape, mode):
    """Rows of more than one (channels x taps) tile: loops over channel blocks and tap blocks."""
    w = _weight(shape).requires_grad_()
    x = _input(shape, 1, batch=2, spatial=3).requires_grad_()
    gain = torch.linspace(0.5, 1.5, shape[0], dtype=torch.float64, requires_grad=True)
    probe = torch.randn(shape, generator=_generator(5), dtype=torch.float64)
    expected, _ = _reference_forward(x, w, gain, 1.0, 1, mode)
    expected_grads = torch.autograd.grad((expected * probe).sum(), (x, w, gain))
    inputs = [t.detach().to(device).requires_grad_() for t in (x, w, gain)]
    out, _ = _triton_forward(inputs[0], inputs[1], inputs[2], 1.0, 1, mode)
    grads = torch.autograd.grad((out * probe.to(device)).sum(), inputs)
    assert_matches_reference(out.detach().cpu(), expected, expected.detach(), torch.float64)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_matches_reference(grad.cpu(), expected_grad, expected_grad, torch.float64)


@needs_triton
@on_each_device
@pytest.mark.parametrize("case", ["3x3", "depthwise", "linear", "conv3d"])
@pytest.mark.parametrize("mode,stats_fraction", [("single_pass", 1.0), ("exact", 0.5)])
def test_backward_matches_reference_autograd(device, case, mode, stats_fraction):
    shape, groups = CASES[case]
    w = _weight(shape, layout="channels_last").requires_grad_()
    x = _input(shape, groups, batch=4).requires_grad_()
    gain = torch.linspace(0.5, 1.5, shape[0], dtype=torch.float64, requires_grad=True)
    probe = torch.randn(shape, generator=_generator(7), dtype=torch.float64)
    expected, _ = _reference_forward(x, w, gain, stats_fraction, groups, mode)
    expected_grads = torch.autograd.grad((expected * probe).sum(), (x, w, gain))
    inputs = [t.detach().to(device).requires_grad_() for t in (x, w, gain)]
    out, _ = _triton_forward(*inputs, stats_fraction, groups, mode)
    grads = torch.autograd.grad((out * probe.to(device)).sum(), inputs)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_matches_reference(grad.cpu(), expected_grad, expected_grad, torch.float64)


@needs_triton
@on_each_device
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_backward_in_low_precision(device, dtype):
    shape = (4, 3, 3, 3)
    w64, x64 = _weight(shape), _input(shape, 1)
    probe = torch.randn(shape, generator=_generator(7), dtype=torch.float64)

    def weight_grad(x, w, forward):
        w = w.detach().clone().requires_grad_()
        out, _ = forward(x, w, None, 1.0, 1, "single_pass")
        (grad,) = torch.autograd.grad((out * probe.to(out)).sum(), w)
        return grad

    expected = weight_grad(x64.to(dtype).double(), w64.to(dtype).double(), _reference_forward)
    same_precision = weight_grad(x64.to(dtype), w64.to(dtype), _reference_forward)
    grad = weight_grad(x64.to(dtype).to(device), w64.to(dtype).to(device), _triton_forward)
    assert grad.dtype == dtype
    assert_matches_reference(grad.cpu(), same_precision, expected, dtype)


# ---- launch paths: split channel sums, autotuning configurations, determinism ----

@needs_triton
@on_each_device
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "linear"])
@pytest.mark.parametrize("rows", [5, 3])
def test_channel_sums_split_over_programs(device, layout, rows):
    """The sums of one channel cut over several programs (over samples, over the plane, or both;
    fixed-order total) give the reference mean."""
    shape = (5, 3, 4, 6) if layout != "linear" else (5, 7)
    x = torch.rand(shape, generator=_generator(2), dtype=torch.float64)
    x = _layout(x, layout).to(device)
    expected = reference.equinorm.channel_mean_unchecked(x.cpu()[:rows], 1.0)
    readable, channels_last = triton_equinorm._channel_input(x, rows)
    assert channels_last == (layout != "contiguous")
    signed = readable - 0.5
    signed[:, 0] = signed[:, 0].abs()  # channel 0 has no negative value
    expected_abs = signed.cpu()[:rows].abs().transpose(0, 1).reshape(shape[1], -1).mean(dim=1)
    expected_negative = (signed.cpu()[:rows] < 0).transpose(0, 1).reshape(shape[1], -1).any(dim=1)
    split_counts = set()
    # 5 elements per program cut a 4x6 plane into 5 segments; 48 take two samples per split.
    for per_program in (None, 5, 13, 48):
        mean = torch.empty(shape[1], dtype=torch.float64, device=device)
        plan = triton_equinorm._launch_channel_means(readable, channels_last, rows, mean, per_program=per_program)
        split_counts.add(plan.splits)
        assert_matches_reference(mean.cpu(), expected, expected, torch.float64)
        negative = torch.zeros(shape[1], dtype=torch.uint8, device=device)
        triton_equinorm._launch_channel_means(signed, channels_last, rows, mean, per_program=per_program,
                                              negative=negative)
        assert_matches_reference(mean.cpu(), expected_abs, expected_abs, torch.float64)
        assert torch.equal(negative.cpu().bool(), expected_negative)
    assert 1 in split_counts and len(split_counts) >= 2, split_counts


@needs_triton
@on_each_device
def test_planar_sums_split_within_a_plane_and_over_samples(device):
    """A few large planes (a detection input) are cut over the plane as well as the samples."""
    x = torch.rand((3, 2, 17, 19), generator=_generator(4), dtype=torch.float64).to(device)
    expected = x.cpu().mean(dim=(0, 2, 3))
    for per_program, spatial_splits, rows_per_split in ((100, 4, 1), (700, 1, 2)):
        mean = torch.empty(2, dtype=torch.float64, device=device)
        plan = triton_equinorm._launch_channel_means(x, False, 3, mean, per_program=per_program)
        assert (plan.spatial_splits, plan.rows_per_split) == (spatial_splits, rows_per_split)
        assert_matches_reference(mean.cpu(), expected, expected, torch.float64)


@needs_triton
@on_each_device
def test_large_input_takes_the_split_path(device):
    x = torch.rand((3, 2, 80, 80), generator=_generator(4), dtype=torch.float32)  # 19200 values per channel
    plan = triton_equinorm.channel_sum_plan(x, False, 3)
    assert plan.splits > 1
    mean, _ = _op("channel_mean")(x.to(device), 3, "mean")
    assert_matches_reference(mean.cpu(), None, x.double().mean(dim=(0, 2, 3)), torch.float32)
    signed = x - 0.5
    signed[:, 1] = signed[:, 1].abs()  # channel 1 has no negative value
    mean, negative = _op("channel_mean")(signed.to(device), 3, "abs_mean")
    assert_matches_reference(mean.cpu(), None, signed.double().abs().mean(dim=(0, 2, 3)), torch.float32)
    assert negative.cpu().tolist() == [True, False]


@needs_triton
@on_each_device
def test_every_autotuning_configuration_computes_the_same_means(device):
    """Each configuration the autotuner may pick (not only the default) is a valid launch."""
    x = torch.rand((3, 5, 6, 7), generator=_generator(6), dtype=torch.float64).to(device)
    expected = x.cpu().mean(dim=(0, 2, 3))
    channels_last_x = x.contiguous(memory_format=torch.channels_last)
    for config in triton_equinorm._CHANNEL_SUM_CONFIGS:
        tile = config.kwargs["TILE"]
        mean = torch.empty(5, dtype=torch.float64, device=device)
        triton_equinorm._planar_channel_sums_kernel.fn[(5, 1)](
            x, mean, mean, 3, 5, 42, 3, 42, 1, 126, FINAL=True, ABS=False, BLOCK_S=64, TILE=tile, num_warps=config.num_warps)
        assert_matches_reference(mean.cpu(), expected, expected, torch.float64)
        triton_equinorm._channels_last_channel_sums_kernel.fn[(1, 1)](
            channels_last_x, mean, mean, 5, 126, 126, 126, FINAL=True, ABS=False, BLOCK_C=8, TILE=tile,
            num_warps=config.num_warps)
        assert_matches_reference(mean.cpu(), expected, expected, torch.float64)


@needs_triton
@on_each_device
def test_results_are_bit_identical_across_runs(device):
    shape = (4, 3, 3, 3)
    w = _weight(shape).float().to(device).requires_grad_()
    x = _input(shape, 1).float().to(device)
    probe = torch.randn(shape, generator=_generator(8)).to(device)
    runs = []
    for _ in range(2):
        out, mean = _triton_forward(x, w, None, 1.0, 1, "single_pass")
        (grad,) = torch.autograd.grad((out * probe).sum(), w)
        tensors, entries, sizes = _enorm_program(device)
        deviations = _op("enorm_cycle_")(tensors, entries, sizes, 2.0, 1.0)
        runs.append((out, mean, grad, deviations, *tensors))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@needs_triton
@on_each_device
def test_torch_compile_through_the_autograd_wrappers(device):
    shape = (4, 3, 3, 3)
    w = _weight(shape).float().to(device)
    x = _input(shape, 1).float().to(device)

    def step(x, w):
        out, mean = _triton_forward(x, w, None, 1.0, 1, "exact")
        return out, mean

    # The interpreter's ops are opaque custom ops; compiled Triton kernels are traced by inductor.
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    w_eager, w_compiled = w.clone().requires_grad_(), w.clone().requires_grad_()
    out_eager, mean_eager = step(x, w_eager)
    out_compiled, mean_compiled = compiled(x, w_compiled)
    torch.testing.assert_close(out_compiled, out_eager)
    torch.testing.assert_close(mean_compiled, mean_eager)
    out_eager.square().sum().backward()
    out_compiled.square().sum().backward()
    torch.testing.assert_close(w_compiled.grad, w_eager.grad)


# ---- ENorm ----

def _enorm_net(device: str) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(6, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
    )
    net[2].weight.data = net[2].weight.data.contiguous(memory_format=torch.channels_last)
    return net.to(device)


@needs_triton
@on_each_device
def test_enorm_with_the_triton_backend_matches_the_reference(device):
    fused, looped = _enorm_net(device), _enorm_net(device)
    fused_norm = equinorm_kernels.ENorm(fused, backend="triton")
    looped_norm = equinorm_kernels.ENorm(looped, backend="reference")
    assert len(fused_norm.groups) == 3  # conv -> grouped conv -> 1x1 conv -> flatten -> linear
    x = torch.randn(2, 3, 4, 4, device=device)
    before = fused(x)
    with RecordOps() as recorded:
        fused_norm.step()
    assert recorded.names.count("equinorm_kernels::triton_enorm_cycle_") == 1  # one op call per cycle
    looped_norm.step()
    for _ in range(2):
        fused_norm.step()
        looped_norm.step()
    for (name, a), (_, b) in zip(fused.named_parameters(), looped.named_parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(fused(x), before, rtol=1e-4, atol=1e-5)  # ReLU networks keep their function
    assert fused[2].weight.is_contiguous(memory_format=torch.channels_last)


@needs_triton
@on_each_device
@pytest.mark.parametrize("p", [2.0, 3.0])
def test_enorm_group_with_long_channels_and_many_channels(device, p):
    """Channels of more than one energy tile (inner > 256, channels > one block) in float64."""
    g = _generator(9)
    producer = torch.randn(40, 300, generator=g, dtype=torch.float64)  # rows of 300 values
    consumer = torch.randn(3, 40, 3, 3, generator=g, dtype=torch.float64)
    expected_d = reference.enorm.enorm_balance_pair_(producer.clone(), consumer.clone(), p=p, c=0.5)
    tensors = [producer.clone().to(device), consumer.clone().to(device)]
    d = _op("enorm_group_")(tensors, [0, 0, 1, 1, 1, 1, 1, 1, -1, 1, 1, 1], p, 0.5)
    assert_matches_reference(d.cpu(), expected_d, expected_d, torch.float64)
    torch.testing.assert_close(tensors[0].cpu(), producer * expected_d[:, None], rtol=1e-12, atol=0)
    torch.testing.assert_close(tensors[1].cpu(), consumer / expected_d[None, :, None, None], rtol=1e-12, atol=0)


# ---- import without Triton, and without anywhere to run it ----

def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env={**environment, **env},
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_package_imports_without_triton():
    result = _run(
        """
        import sys

        sys.modules["triton"] = None  # what an environment without Triton looks like to imports
        import equinorm_kernels as ek
        from equinorm_kernels import triton as backend
        assert not backend.is_available() and not backend.register()
        assert "triton" not in ek.available_backends("cpu")
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_gpu_or_interpreter_triton_is_not_even_imported():
    result = _run(
        """
        import sys, torch
        import equinorm_kernels as ek
        assert "triton" not in sys.modules
        assert "triton" not in ek.available_backends("cpu")
        try:
            ek.channel_mean(torch.rand(2, 3), backend="triton")
        except ValueError as error:
            assert "'triton'" in str(error), error
        else:
            raise AssertionError("backend='triton' ran without a GPU or the interpreter")
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


# ---- backend="auto" on a GPU: the measured choice between "cuda" and "triton" ----

class FakeTimer:
    """Stands for CUDA events: each timed block takes the next duration scripted for its backend."""

    def __init__(self, durations: dict[str, list[float]], log: list[str]) -> None:
        self.durations, self.log = durations, log

    def __call__(self, device):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        name = self.log[-1]
        self.elapsed = self.durations[name].pop(0)

    def elapsed_ms(self):
        return self.elapsed


class _ScriptedTimers:
    def __init__(self, durations: dict[str, list[float]], log: list[str]) -> None:
        self.durations, self.log = durations, log

    def __call__(self, device):
        return FakeTimer(self.durations, self.log)


def _fake_backend(name: str, log: list[str]) -> backends.Backend:
    def record(op):
        def call(*args):
            log.append(name)
            return f"{op} by {name}"
        return call

    return backends.Backend(
        name=name, device_types=frozenset({"cuda"}), is_usable=lambda: True,
        channel_mean=record("channel_mean"), equinorm_weight=record("equinorm_weight"),
        equinorm_forward=record("equinorm_forward"), enorm_cycle=record("enorm_cycle"),
    )


def _fastest(log, durations, **options) -> backends.FastestBackend:
    candidates = (_fake_backend("cuda", log), _fake_backend("triton", log))
    return backends.FastestBackend(candidates, timer_factory=_ScriptedTimers(durations, log), **options)


def test_auto_alternates_then_keeps_the_backend_with_the_smaller_median():
    log: list[str] = []
    # One warm-up call each (untimed), then three timed calls each; triton has the smaller median.
    chooser = _fastest(log, {"cuda": [1.0, 1.1, 5.0], "triton": [0.9, 9.0, 1.0]})
    x = torch.zeros(2, 3)
    device = torch.device("cuda")
    results = [chooser.run("channel_mean", device, x, 1.0) for _ in range(8)]
    assert log == ["cuda", "triton"] * 4
    assert results[:2] == ["channel_mean by cuda", "channel_mean by triton"]
    assert chooser.winner("channel_mean", device, x, 1.0) == "triton"
    log.clear()
    for _ in range(5):
        assert chooser.run("channel_mean", device, x, 1.0) == "channel_mean by triton"
    assert log == ["triton"] * 5


def test_auto_measures_each_op_and_signature_separately():
    log: list[str] = []
    chooser = _fastest(log, {"cuda": [1.0, 2.0], "triton": [2.0, 1.0]}, trials=1)
    device = torch.device("cuda")
    small, large = torch.zeros(2, 3), torch.zeros(4, 3)
    for _ in range(4):
        chooser.run("channel_mean", device, small, 1.0)
    assert chooser.winner("channel_mean", device, small, 1.0) == "cuda"
    assert chooser.winner("channel_mean", device, large, 1.0) is None
    assert chooser.winner("equinorm_weight", device, small, 1.0) is None
    assert chooser.winner("channel_mean", device, small.t(), 1.0) is None  # other strides
    for _ in range(4):
        chooser.run("channel_mean", device, large, 1.0)
    assert chooser.winner("channel_mean", device, large, 1.0) == "triton"


def test_auto_runs_an_in_place_op_exactly_once_per_call():
    log: list[str] = []
    chooser = _fastest(log, {"cuda": [1.0] * 3, "triton": [2.0] * 3})
    groups = (object(),)
    for calls in range(1, 12):
        chooser.run("enorm_cycle", torch.device("cuda"), groups, 2.0, 1.0, True, None)
        assert len(log) == calls


def test_auto_inside_torch_compile_uses_the_decided_backend_without_timing(monkeypatch):
    log: list[str] = []
    chooser = _fastest(log, {"cuda": [3.0] * 3, "triton": [1.0] * 3})
    device, x = torch.device("cuda"), torch.zeros(3)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert chooser.run("channel_mean", device, x, 1.0) == "channel_mean by cuda"  # undecided: the first
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    for _ in range(8):
        chooser.run("channel_mean", device, x, 1.0)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert chooser.run("channel_mean", device, x, 1.0) == "channel_mean by triton"


def test_auto_never_times_while_a_cuda_graph_is_being_captured(monkeypatch):
    def no_timer(device):
        raise AssertionError("a timer was created while capturing")

    log: list[str] = []
    candidates = (_fake_backend("cuda", log), _fake_backend("triton", log))
    chooser = backends.FastestBackend(candidates, timer_factory=no_timer)
    device, x = torch.device("cuda"), torch.zeros(3)
    monkeypatch.setattr(backends, "_capturing", lambda device: True)
    for _ in range(8):
        assert chooser.run("channel_mean", device, x, 1.0) == "channel_mean by cuda"  # undecided: the first
    assert log == ["cuda"] * 8
    assert chooser.winner("channel_mean", device, x, 1.0) is None


def test_auto_traces_into_the_chosen_backend_under_torch_compile():
    def scaling(name: str, factor: float) -> backends.Backend:
        def scale(x, stats_fraction):
            return x * factor

        return backends.Backend(
            name=name, device_types=frozenset({"cuda"}), is_usable=lambda: True,
            channel_mean=scale, equinorm_weight=scale, equinorm_forward=scale,
        )

    chooser = backends.FastestBackend((scaling("cuda", 2.0), scaling("triton", 3.0)))
    compiled = torch.compile(
        lambda x: chooser.run("channel_mean", torch.device("cuda"), x, 1.0), fullgraph=True, backend="eager"
    )
    assert torch.equal(compiled(torch.ones(2)), torch.full((2,), 2.0))  # undecided: the first candidate


@pytest.fixture
def fake_gpu_backends(monkeypatch):
    """Registers fake "cuda" and "triton" backends (restored afterwards) and returns their call log."""
    log: list[str] = []
    for name in ("cuda", "triton"):
        monkeypatch.setitem(backends._REGISTRY, name, _fake_backend(name, log))
    monkeypatch.delenv(backends.FORCE_ENV, raising=False)
    return log


def test_resolve_auto_on_a_gpu_takes_the_cuda_extension_without_measuring(fake_gpu_backends):
    # Deterministic by default: the same backend (and so the same summation order) in every run.
    assert backends.resolve_backend("auto", torch.device("cuda")).name == "cuda"
    assert backends.resolve_backend("auto", torch.device("cpu")).name in ("cpp", "reference")


def test_resolve_auto_measures_cuda_against_triton_when_asked(fake_gpu_backends, monkeypatch):
    monkeypatch.setenv(backends.FORCE_ENV, backends.MEASURE_CHOICE)
    chosen = backends.resolve_backend("auto", torch.device("cuda"))
    assert isinstance(chosen, backends.Backend) and chosen.name == "fastest(cuda,triton)"
    assert backends.resolve_backend("auto", torch.device("cuda")) is chosen  # one measuring state per process
    assert chosen.enorm_cycle is not None
    assert backends.resolve_backend("auto", torch.device("cpu")).name in ("cpp", "reference")


def test_environment_variable_forces_one_backend(fake_gpu_backends, monkeypatch):
    monkeypatch.setenv(backends.FORCE_ENV, "triton")
    assert backends.resolve_backend("auto", torch.device("cuda")).name == "triton"
    monkeypatch.setenv(backends.FORCE_ENV, "cuda")
    assert backends.resolve_backend("auto", torch.device("cuda")).name == "cuda"
    monkeypatch.setenv(backends.FORCE_ENV, "tpu")
    with pytest.raises(ValueError, match=backends.FORCE_ENV):
        backends.resolve_backend("auto", torch.device("cuda"))
    assert backends.resolve_backend("reference", torch.device("cuda")).name == "reference"


def test_auto_off_the_gpu_follows_the_registry_after_it_changes(monkeypatch):
    """"auto" off CUDA remembers its choice per device type, but not past a change of the registry."""
    cpu = torch.device("cpu")
    before = backends.resolve_backend("auto", cpu)
    preferred = dataclasses.replace(_fake_backend("cuda", []), device_types=None)  # first in AUTO_PREFERENCE
    with monkeypatch.context() as patch:
        patch.setitem(backends._REGISTRY, "cuda", preferred)
        assert backends.resolve_backend("auto", cpu) is preferred
    assert backends.resolve_backend("auto", cpu) is before
    assert backends.resolve_backend("auto", cpu) is before


def test_one_gpu_backend_is_used_without_measuring(monkeypatch):
    log: list[str] = []
    monkeypatch.setitem(backends._REGISTRY, "cuda", _fake_backend("cuda", log))
    monkeypatch.delitem(backends._REGISTRY, "triton", raising=False)
    assert backends.resolve_backend("auto", torch.device("cuda")).name == "cuda"


# ---- the compiled path, without a GPU ----

def test_kernels_compile_for_a_gpu_without_one():
    """Triton compiles to a cubin on any machine: the compiled path of one kernel family, here."""
    pytest.importorskip("triton")
    result = _run(
        "from equinorm_kernels.triton.compile_check import main\n"
        "raise SystemExit(main(['--arch', '80', '--only', 'channel means']))"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failure(s)" in result.stdout
