"""The fused EquiNorm ops of every backend against the pure-PyTorch reference.

Forward and backward, fp64 (tight), fp32, fp16 and bf16 (within twice the error of the reference
run at the same precision, the flash-attention rule), odd shapes and layouts, gradcheck,
torch.library.opcheck, torch.compile, determinism and bad input. The reference itself is checked
against the paper's equations in test_reference_equinorm.py.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import equinorm_kernels
from equinorm_kernels import reference

from kernel_backends import fused_backend_params, op

pytestmark = pytest.mark.parametrize("backend,device", fused_backend_params())

# (weight shape, groups): C = 1 and 3, 1x1 to 7x7, depthwise, grouped, Linear, 1-D and 3-D convs.
WEIGHT_CASES = {
    "3x3": ((4, 3, 3, 3), 1),
    "C1": ((5, 1, 3, 3), 1),
    "1x1": ((6, 4, 1, 1), 1),
    "5x5": ((3, 2, 5, 5), 1),
    "7x7": ((4, 3, 7, 7), 1),
    "depthwise": ((6, 1, 3, 3), 6),
    "grouped": ((8, 2, 3, 3), 2),
    "linear": ((7, 5), 1),
    "conv1d": ((4, 3, 3), 1),
    "conv3d": ((4, 2, 3, 3, 3), 1),
}
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(shape, layout: str = "contiguous", *, special_rows: bool = True, seed: int = 0) -> torch.Tensor:
    """Random weight in float64 on the CPU; with ``special_rows`` row 0 is one-signed (the single_pass
    fallback) and, where a row has 4 or more values, row 1 is constant (no positive mass)."""
    w = torch.randn(shape, generator=_generator(seed), dtype=torch.float64)
    if special_rows:
        w[0] = w[0].abs() + 0.1
        if w[1].numel() >= 4 and shape[0] > 2:
            w[1] = 0.3
    return _layout(w, layout)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and t.dim() in (4, 5):
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    if layout == "strided":  # a non-contiguous view of the same values
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    return t


def _input(weight_shape, groups, *, batch=3, layout="contiguous", seed=1) -> torch.Tensor:
    channels = weight_shape[1] * groups
    spatial = {2: (), 3: (6,), 4: (5, 6), 5: (3, 4, 3)}[len(weight_shape)]
    x = torch.rand((batch, channels, *spatial), generator=_generator(seed), dtype=torch.float64)
    x[:, 0] *= 0.25  # unequal channel means
    return _layout(x, layout)


def _max_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return (value.double().cpu() - truth.double().cpu()).abs().max().item()


def assert_matches_reference(
    kernel: torch.Tensor, same_precision_reference: torch.Tensor, reference64: torch.Tensor, precision: torch.dtype
):
    """Inputs in ``precision`` fp64/fp32: close to the float64 reference; fp16/bf16: at most twice
    the error of the reference run on the same inputs (plus a tiny floor for outputs it rounds exactly)."""
    scale = max(reference64.abs().max().item(), 1e-30)
    if precision == torch.float64:
        tolerance = 1e-12 * scale
    elif precision == torch.float32:
        tolerance = 2e-6 * scale
    else:
        tolerance = 2 * _max_error(same_precision_reference, reference64) + 1e-6 * scale
    assert _max_error(kernel, reference64) <= tolerance, (_max_error(kernel, reference64), tolerance)


def _reference_forward(x, weight, gain, ratio, groups, mode, stats_fraction):
    mean = reference.channel_mean(x, stats_fraction=stats_fraction)
    out = reference.equinorm_weight(weight, mean, ratio=ratio, groups=groups, mode=mode, gain=gain)
    return out, mean


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["single_pass", "exact"])
@pytest.mark.parametrize("case", list(WEIGHT_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_fused_forward_matches_reference(backend, device, case, mode, dtype):
    shape, groups = WEIGHT_CASES[case]
    weight64, x64 = _weight(shape), _input(shape, groups)
    gain64 = torch.linspace(0.5, 1.5, shape[0], dtype=torch.float64)
    out64, mean64 = _reference_forward(x64, weight64, gain64, 0.7, groups, mode, 1.0)

    weight, x = weight64.to(device, dtype), x64.to(device, dtype)
    gain = gain64.to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    out, mean = equinorm_kernels.equinorm_forward(
        x, weight, ratio=0.7, groups=groups, mode=mode, gain=gain, backend=backend
    )
    assert out.dtype == dtype and out.shape == weight.shape and out.device.type == device
    assert mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    same_out, same_mean = _reference_forward(x.cpu(), weight.cpu(), gain.cpu(), 0.7, groups, mode, 1.0)
    assert_matches_reference(mean, same_mean, mean64, dtype)
    assert_matches_reference(out, same_out, out64, dtype)


@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stats_fraction", [1.0, 0.5])
@pytest.mark.parametrize("case", ["3x3", "1x1", "grouped", "conv3d"])
def test_layouts_and_stats_fraction(backend, device, case, weight_layout, x_layout, stats_fraction):
    shape, groups = WEIGHT_CASES[case]
    weight = _weight(shape, weight_layout).float().to(device)
    x = _input(shape, groups, batch=4, layout=x_layout).float().to(device)
    out, mean = equinorm_kernels.equinorm_forward(
        x, weight, stats_fraction=stats_fraction, ratio=1.3, groups=groups, backend=backend
    )
    expected, expected_mean = _reference_forward(x.double().cpu(), weight.double().cpu(), None, 1.3, groups, "single_pass", stats_fraction)
    torch.testing.assert_close(mean.cpu(), expected_mean.float(), rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(out.cpu(), expected.float(), rtol=2e-5, atol=2e-6)
    keeps_channels_last = weight_layout == "channels_last" and weight.dim() >= 4
    layout = torch.channels_last if weight.dim() == 4 else torch.channels_last_3d
    assert out.is_contiguous(memory_format=layout) if keeps_channels_last else out.is_contiguous()


@pytest.mark.parametrize("mode", ["single_pass", "exact"])
def test_weight_op_alone_and_channel_mean_alone_match_reference(backend, device, mode):
    shape, groups = WEIGHT_CASES["grouped"]
    weight, x = _weight(shape).to(device), _input(shape, groups).to(device)
    mean = equinorm_kernels.channel_mean(x, backend=backend)
    torch.testing.assert_close(mean.cpu(), reference.channel_mean(x.cpu()), rtol=1e-13, atol=0)
    gain = torch.linspace(-1.0, 2.0, shape[0], dtype=torch.float64, device=device)  # negative gains are allowed
    out = equinorm_kernels.equinorm_weight(weight, mean, groups=groups, mode=mode, gain=gain, backend=backend)
    expected = reference.equinorm_weight(weight.cpu(), mean.cpu(), groups=groups, mode=mode, gain=gain.cpu())
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "shape",
    [(3, 300, 4, 4), (5, 3, 24, 24), (4, 6, 3, 3), (4, 40, 14, 14), (1, 20, 14, 14), (5, 7, 22, 22), (2, 5000)],
    ids=["wide-rows", "large-planes", "small-planes", "14x14-batch", "14x14-sample", "22x22-batch", "linear"],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_channel_mean_on_every_reduction_path(backend, device, shape, layout):
    x = _layout(torch.rand(shape, generator=_generator(2), dtype=torch.float64), layout)
    for rows in (shape[0], 1):
        expected = x[:rows].mean(dim=[0, *range(2, x.dim())])
        torch.testing.assert_close(op(backend, "channel_mean")(x.float().to(device), rows, "mean")[0].cpu(), expected.float(), rtol=2e-6, atol=0)
        torch.testing.assert_close(op(backend, "channel_mean")(x.to(device), rows, "mean")[0].cpu(), expected, rtol=1e-13, atol=0)


def test_channel_mean_without_a_graph_gives_the_same_means_and_no_grad_fn(backend, device):
    x = torch.randn((3, 5, 4, 4), generator=_generator(3)).to(device)
    leaf = x.clone().requires_grad_(True)
    recorded = equinorm_kernels.channel_mean(leaf, statistic="abs_mean", backend=backend)
    assert recorded.grad_fn is not None
    plain = equinorm_kernels.channel_mean(x, statistic="abs_mean", backend=backend)
    with torch.no_grad():
        under_no_grad = equinorm_kernels.channel_mean(leaf, statistic="abs_mean", backend=backend)
    for got in (plain, under_no_grad):
        assert got.grad_fn is None and not got.requires_grad
        assert torch.equal(got, recorded.detach())


def test_degenerate_channels_get_zero_weight_not_nan(backend, device):
    weight = _weight((4, 3, 3, 3)).to(device)
    weight[2] = -0.5  # constant: no positive mass in either mode
    x = _input((4, 3, 3, 3), 1).to(device)
    x[:, 1:] = 0  # only channel 0 seen
    for mode in ("single_pass", "exact"):
        out, _ = equinorm_kernels.equinorm_forward(x, weight, mode=mode, backend=backend)
        assert torch.isfinite(out).all()
        assert (out[2] == 0).all() and (out[1] == 0).all()
        expected, _ = _reference_forward(x.cpu(), weight.cpu(), None, 1.0, 1, mode, 1.0)
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-12, atol=1e-14)


def test_all_zero_input_gives_zero_weight(backend, device):
    weight = _weight((3, 2, 3, 3)).to(device)
    out, mean = equinorm_kernels.equinorm_forward(torch.zeros(2, 2, 4, 4, dtype=torch.float64, device=device), weight, backend=backend)
    assert (mean == 0).all() and (out == 0).all()


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


def _grads(fn, tensors, seed=5):
    out = fn(*tensors)
    upstream = torch.randn(out.shape, generator=_generator(seed), dtype=torch.float64).to(out.device, out.dtype)
    return torch.autograd.grad(out, tensors, upstream)


@pytest.mark.parametrize("mode", ["single_pass", "exact"])
@pytest.mark.parametrize("case", ["3x3", "C1", "1x1", "7x7", "depthwise", "grouped", "linear", "conv3d"])
@pytest.mark.parametrize("stats_fraction", [1.0, 0.5])
def test_fused_backward_matches_reference_autograd(backend, device, case, mode, stats_fraction):
    shape, groups = WEIGHT_CASES[case]
    weight, x = _weight(shape), _input(shape, groups, batch=4)
    gain = torch.linspace(0.5, 1.5, shape[0], dtype=torch.float64)

    def fused(x, weight, gain):
        return equinorm_kernels.equinorm_forward(
            x, weight, stats_fraction=stats_fraction, ratio=0.8, groups=groups, mode=mode, gain=gain, backend=backend
        )[0]

    def expected(x, weight, gain):
        return _reference_forward(x, weight, gain, 0.8, groups, mode, stats_fraction)[0]

    on_device = [t.to(device).requires_grad_() for t in (x, weight, gain)]
    got = _grads(fused, on_device)
    want = _grads(expected, [t.clone().requires_grad_() for t in (x, weight, gain)])
    for g, w, name in zip(got, want, ("x", "weight", "gain")):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-12, msg=lambda m: f"d/d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backward_in_low_precision(backend, device, dtype):
    shape, groups = WEIGHT_CASES["3x3"]
    weight64, x64 = _weight(shape, special_rows=False), _input(shape, groups)

    def grads(x, weight, fn):
        x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
        return _grads(fn, [x, weight])

    def fused(x, weight):
        return equinorm_kernels.equinorm_forward(x, weight, backend=backend)[0]

    def expected(x, weight):
        return _reference_forward(x, weight, None, 1.0, 1, "single_pass", 1.0)[0]

    truth = grads(x64, weight64, expected)
    same_precision = grads(x64.to(dtype), weight64.to(dtype), expected)
    got = grads(x64.to(device, dtype), weight64.to(device, dtype), fused)
    for g, s, t in zip(got, same_precision, truth):
        assert g.dtype == dtype
        assert_matches_reference(g, s, t, dtype)


def test_weight_op_backward_reaches_the_mean(backend, device):
    shape, groups = WEIGHT_CASES["grouped"]
    weight, gain = _weight(shape), torch.linspace(0.5, 1.5, shape[0], dtype=torch.float64)
    mean = reference.channel_mean(_input(shape, groups))

    def fused(weight, mean, gain):
        return equinorm_kernels.equinorm_weight(weight, mean, groups=groups, gain=gain, ratio=0.9, backend=backend)

    def expected(weight, mean, gain):
        return reference.equinorm_weight(weight, mean, groups=groups, gain=gain, ratio=0.9)

    got = _grads(fused, [t.to(device).requires_grad_() for t in (weight, mean, gain)])
    want = _grads(expected, [t.clone().requires_grad_() for t in (weight, mean, gain)])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("per_tap", [False, True], ids=["channel_means", "per_tap_means"])
@pytest.mark.parametrize("groups", [1, 3])
def test_backward_of_a_weight_split_over_several_row_chunks(backend, device, groups, per_tap, layout):
    """20736 values: the CPU backward sums dL/dmu over several chunks of rows, whose bounds fall
    inside groups when groups=3 (32 outputs per group, 24 rows per chunk)."""
    shape = (96, 24, 3, 3)
    weight, gain = _weight(shape, layout), torch.linspace(0.5, 1.5, shape[0], dtype=torch.float64)
    channels = shape[1] * groups
    mean = torch.rand((channels, 3, 3) if per_tap else (channels,), generator=_generator(3), dtype=torch.float64)
    ratio = 1.0 if per_tap else 0.9  # per-tap means take no ratio

    def fused(weight, mean, gain):
        return equinorm_kernels.equinorm_weight(weight, mean, groups=groups, gain=gain, ratio=ratio, backend=backend)

    def expected(weight, mean, gain):
        return reference.equinorm_weight(weight, mean, groups=groups, gain=gain, ratio=ratio)

    got = _grads(fused, [t.to(device).requires_grad_() for t in (weight, mean, gain)])
    want = _grads(expected, [t.clone().requires_grad_() for t in (weight, mean, gain)])
    for g, w, name in zip(got, want, ("weight", "mean", "gain")):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-12, msg=lambda m: f"d/d{name}: {m}")


@pytest.mark.parametrize("mode", ["single_pass", "exact"])
def test_gradcheck(backend, device, mode):
    shape, groups = (4, 2, 3, 3), 2
    weight = _weight(shape, special_rows=False).to(device).requires_grad_()
    x = _input(shape, groups).to(device).requires_grad_()
    gain = torch.linspace(0.5, 1.5, 4, dtype=torch.float64, device=device).requires_grad_()

    def fused(x, weight, gain):
        return equinorm_kernels.equinorm_forward(x, weight, groups=groups, mode=mode, gain=gain, ratio=0.6, backend=backend)[0]

    # Triton's CPU interpreter costs about half a millisecond per kernel call: there the random
    # projection of fast_mode keeps the check to a few calls.
    fast_mode = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(fused, (x, weight, gain), fast_mode=fast_mode)
    mean = reference.channel_mean(x.detach()).requires_grad_()

    def weight_only(weight, mean, gain):
        return equinorm_kernels.equinorm_weight(weight, mean, groups=groups, mode=mode, gain=gain, backend=backend)

    assert torch.autograd.gradcheck(weight_only, (weight, mean, gain), fast_mode=fast_mode)


def test_input_gradient_is_a_broadcast_not_a_copy(backend, device):
    x = _input((4, 3, 3, 3), 1).to(device).requires_grad_()
    weight = _weight((4, 3, 3, 3)).to(device)
    out, _ = equinorm_kernels.equinorm_forward(x, weight, backend=backend)
    (grad_x,) = torch.autograd.grad(out.sum(), [x])
    torch.testing.assert_close(grad_x, grad_x[:1, :, :1, :1].expand_as(grad_x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Op registration: opcheck, torch.compile, determinism
# ---------------------------------------------------------------------------------------------


def _op_samples(device):
    weight = _weight((4, 3, 3, 3)).float().to(device)
    x = _input((4, 3, 3, 3), 1).float().to(device)
    mean = reference.channel_mean(x)
    gain = torch.ones(4, device=device)
    return weight, x, mean, gain


@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
def test_opcheck_every_equinorm_op(backend, device, weight_layout):
    weight, x, mean, gain = _op_samples(device)
    weight = _layout(weight, weight_layout)
    _, stats = op(backend, "equinorm_weight")(weight, mean, gain, 1.0, 1, "exact", 1e-5)
    signed = x - 0.5
    samples = [
        ("channel_mean", (x, 3, "mean")),
        ("channel_mean", (signed, 3, "abs_mean")),
        ("equinorm_weight", (weight, mean, gain, 1.0, 1, "single_pass", 1e-5)),
        ("equinorm_forward", (x, 2, weight, gain, 0.5, 1, "exact", 1e-5, "mean")),
        ("equinorm_forward", (signed, 2, weight, gain, 0.5, 1, "exact", 1e-5, "abs_mean")),
        ("equinorm_backward", (torch.randn_like(weight), weight, mean, gain, stats, 1)),
    ]
    for name, args in samples:
        torch.library.opcheck(op(backend, name), args)


def test_compiled_model_matches_eager_without_graph_breaks(backend, device):
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(
            equinorm_kernels.EquiNormConv2d(3, 6, 3, padding=1, backend=backend),
            nn.ReLU(),
            equinorm_kernels.EquiNormConv2d(6, 6, 3, stride=2, padding=1, mode="exact", backend=backend),
            nn.ReLU(),
            nn.Flatten(),
            equinorm_kernels.EquiNormLinear(6 * 4 * 4, 5, backend=backend),
        ).to(device)

    eager, compiled_source = model(), model()
    compiled = torch.compile(compiled_source, fullgraph=True)  # fullgraph: any graph break is an error
    x = torch.rand(4, 3, 8, 8, device=device)
    for net in (eager, compiled):
        net(x).square().sum().backward()
    torch.testing.assert_close(compiled(x), eager(x))
    for a, b in zip(eager.parameters(), compiled_source.parameters()):
        torch.testing.assert_close(b.grad, a.grad)
    torch.testing.assert_close(compiled_source[0].running_mean, eager[0].running_mean)
    eager.eval(), compiled.eval()
    torch.testing.assert_close(compiled(x), eager(x))


@pytest.mark.parametrize("shape", [(5, 43, 7, 7), (6, 43, 14, 14), (4, 43, 16, 16)], ids=["7x7", "14x14", "16x16"])
def test_channel_mean_of_a_channel_does_not_depend_on_its_neighbours(backend, device, shape):
    # Blocks of channels, eight running sums at a time, a channel alone: one order of additions
    # (with few enough samples that the rows are summed in one run whatever the row width).
    x = torch.randn(shape, generator=_generator(4)).to(device)
    for statistic in ("mean", "abs_mean"):
        together = op(backend, "channel_mean")(x, shape[0], statistic)[0]
        for c in (0, 7, 8, 40, 42):
            alone = op(backend, "channel_mean")(x[:, c : c + 1].contiguous(), shape[0], statistic)[0]
            assert torch.equal(together[c : c + 1], alone), (statistic, c)


@pytest.mark.parametrize("plane", [24, 20, 7], ids=["planes", "blocks-20x20", "blocks"])
def test_bit_identical_across_runs_and_thread_counts(backend, device, plane):
    weight = _weight((16, 40, 3, 3)).float().to(device).requires_grad_()
    x = torch.rand(8, 40, plane, plane, device=device).requires_grad_()
    threads = torch.get_num_threads()

    def run(num_threads):
        torch.set_num_threads(num_threads)
        out, mean = equinorm_kernels.equinorm_forward(x, weight, backend=backend)
        grads = torch.autograd.grad(out, [x, weight], torch.ones_like(out))
        return out, mean, *grads

    try:
        first = run(threads)
        for again in (run(threads), run(1), run(max(2, threads))):
            for a, b in zip(first, again):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Bad input to the raw ops: clear errors, never a crash
# ---------------------------------------------------------------------------------------------


def test_ops_reject_bad_arguments(backend, device):
    weight, x, mean, gain = _op_samples(device)
    forward, weight_op = op(backend, "equinorm_forward"), op(backend, "equinorm_weight")
    with pytest.raises(RuntimeError, match="rows"):
        forward(x, 0, weight, gain, 1.0, 1, "exact", 1e-5)
    with pytest.raises(RuntimeError, match="mode"):
        forward(x, 4, weight, gain, 1.0, 1, "fast", 1e-5)
    with pytest.raises(RuntimeError, match="mean"):
        weight_op(weight, mean[:2], gain, 1.0, 1, "exact", 1e-5)
    with pytest.raises(RuntimeError, match="gain"):
        weight_op(weight, mean, gain.double(), 1.0, 1, "exact", 1e-5)
    with pytest.raises(RuntimeError, match="groups"):
        weight_op(weight, mean, gain, 1.0, 5, "exact", 1e-5)
    with pytest.raises(RuntimeError, match="ratio"):
        weight_op(weight, mean, gain, -1.0, 1, "exact", 1e-5)
    with pytest.raises(RuntimeError, match="stats"):
        op(backend, "equinorm_backward")(weight, weight, mean, gain, torch.zeros(4, 2, device=device), 1)
    with pytest.raises(RuntimeError, match="x"):
        op(backend, "channel_mean")(x.long(), 1)


@pytest.mark.parametrize("in_one_call", [True, False], ids=["one_call", "steps"])
def test_layers_use_the_fused_op(backend, device, in_one_call, monkeypatch):
    # Conv layers take the backend's whole-layer op where it has one (the C++ backend on CPU
    # tensors), and otherwise the fused forward: never the statistics and the weight op apart.
    calls = []
    ops = equinorm_kernels.ops.equinorm._OP_SETS
    name = "triton" if backend == "triton" else "compiled"
    original = ops[name]
    counting = type(original)(
        lambda *args: calls.append("channel_mean") or original.channel_mean(*args),
        lambda *args: calls.append("weight") or original.equinorm_weight(*args),
        lambda *args: calls.append("forward") or original.equinorm_forward(*args),
        original.equinorm_backward,
    )
    monkeypatch.setitem(ops, name, counting)
    layer_backend = equinorm_kernels.backends.resolve_backend(backend, torch.device(device))
    whole_layer = layer_backend.conv_train_forward
    if whole_layer is not None:
        replaced = (lambda *args: calls.append("layer") or whole_layer(*args)) if in_one_call else None
        monkeypatch.setitem(
            equinorm_kernels.backends._REGISTRY, layer_backend.name,
            dataclasses.replace(layer_backend, conv_train_forward=replaced),
        )
    elif in_one_call:
        pytest.skip(f"backend {backend!r} has no whole-layer op for {device} tensors")
    layer = equinorm_kernels.EquiNormConv2d(3, 4, 3, padding=1, backend=backend).to(device)  # ratio 1
    x = torch.rand(2, 3, 6, 6, device=device)
    expected = F.conv2d(
        x, reference.equinorm_weight(layer.weight, reference.channel_mean(x), gain=layer.gain), layer.bias, padding=1
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert calls == (["layer"] if in_one_call else ["forward"])
