"""equinorm_forward_autograd: the fused forward with its autograd in C++ (what eager calls on CPU
tensors take). Its outputs and gradients equal the Python autograd wrapper's bit for bit (the
same kernels), and the reference's within rounding; second-order gradients, opcheck, layers."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import equinorm_kernels as ek
from equinorm_kernels import reference
from equinorm_kernels.ops import equinorm as equinorm_ops

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.equinorm_kernels, "equinorm_forward_autograd"), reason="the C++ extension is not built"
)

MODE, EPS = "single_pass", 1e-5

# Input channels 0..3, and which of them hold negative values.
SIGNS = {"non_negative": [], "one_channel_signed": [2], "every_channel_signed": [0, 1, 2, 3]}


def _operands(signs, dtype=torch.float32, layout=torch.contiguous_format, groups=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 4, 5, 5, generator=generator, dtype=torch.float64)
    for channel in SIGNS[signs]:
        x[:, channel] -= 0.5
    x = x.to(dtype).contiguous(memory_format=layout)
    weight = torch.randn(6, 4 // groups, 3, 3, generator=generator, dtype=torch.float64).to(dtype)
    gain = torch.rand(6, generator=generator, dtype=torch.float64).add(0.5)
    gain = gain.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return x, weight, gain


def _run(forward, x, weight, gain, grad_out, x_requires_grad=True):
    """w'', the means and the gradients of <w'', grad_out> in (x, weight, gain) (None where not asked)."""
    needs = ((x, x_requires_grad), (weight, True), (gain, True))
    x, weight, gain = (t.detach().clone().requires_grad_(need) for t, need in needs)
    out, mean = forward(x, weight, gain)
    out.backward(grad_out)
    return out.detach(), mean, x.grad, weight.grad, gain.grad


def _cpp(rows, groups, statistic):
    op = torch.ops.equinorm_kernels.equinorm_forward_autograd

    def forward(x, weight, gain):
        out, mean, passed = op(x, rows, weight, gain, 1.0, groups, MODE, EPS, statistic)
        assert passed is True  # nothing screened unless asked
        return out, mean

    return forward


def _python(fraction, groups, statistic):
    def forward(x, weight, gain):
        out, mean, _, _ = equinorm_ops._EquiNormForward.apply(
            x, weight, gain, fraction, 1.0, groups, MODE, EPS, statistic, "compiled"
        )
        return out, mean

    return forward


def _reference(fraction, groups, statistic):
    def forward(x, weight, gain):
        mean = reference.channel_mean(x, stats_fraction=fraction, statistic=statistic)
        return reference.equinorm_weight(weight, mean, groups=groups, mode=MODE, gain=gain, eps=EPS), mean.detach()

    return forward


# "mean" takes non-negative inputs only.
STATISTIC_CASES = [("mean", "non_negative")] + [("abs_mean", signs) for signs in SIGNS]


@pytest.mark.parametrize("statistic,signs", STATISTIC_CASES)
@pytest.mark.parametrize("fraction,rows", [(1.0, 4), (0.5, 2)])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_equals_the_python_autograd_and_matches_the_reference(
    statistic, signs, fraction, rows, groups, layout, dtype, x_requires_grad
):
    x, weight, gain = _operands(signs, dtype, layout, groups)
    grad_out = torch.randn(weight.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    got = _run(_cpp(rows, groups, statistic), x, weight, gain, grad_out, x_requires_grad)
    wrapper = _run(_python(fraction, groups, statistic), x, weight, gain, grad_out, x_requires_grad)
    for name, g, w in zip(("out", "mean", "grad x", "grad weight", "grad gain"), got, wrapper):
        if w is None:
            assert g is None, name
        else:
            assert g.dtype == w.dtype and torch.equal(g, w), name
    if dtype == torch.bfloat16:
        return  # the reference in bfloat16 rounds differently; float32 and float64 pin the maths
    tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    expected = _run(_reference(fraction, groups, statistic), x, weight, gain, grad_out, x_requires_grad)
    for name, g, e in zip(("out", "mean", "grad x", "grad weight", "grad gain"), got, expected):
        if e is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, e.to(g.dtype), **tolerance, msg=name)


def test_the_input_gradient_carries_sign_x_only_in_flagged_channels():
    x, weight, gain = _operands("one_channel_signed", torch.float64)
    x[:, 2, 0, 0] = 0.0  # sign(0) counts as +1
    grad_out = torch.randn(weight.shape, dtype=torch.float64)
    _, _, grad_x, _, _ = _run(_cpp(4, 1, "abs_mean"), x, weight, gain, grad_out)
    magnitude = grad_x.abs()
    assert torch.equal(magnitude, magnitude[:1, :, :1, :1].expand_as(magnitude))  # one constant per channel
    expected_sign = torch.where(x < 0, -1.0, 1.0)
    constant_sign = grad_x[:, :, :1, :1].sign()  # per channel; the flagged channel's [0, 0] is at x = 0
    assert torch.equal(grad_x.sign()[:, [0, 1, 3]], constant_sign[:, [0, 1, 3]].expand(4, 3, 5, 5))
    assert torch.equal(grad_x.sign()[:, 2] * constant_sign[:, 2], expected_sign[:, 2])


def test_rows_past_the_fraction_get_no_input_gradient():
    x, weight, gain = _operands("one_channel_signed", torch.float64)
    _, _, grad_x, _, _ = _run(_cpp(2, 1, "abs_mean"), x, weight, gain, torch.randn(weight.shape, dtype=torch.float64))
    assert torch.count_nonzero(grad_x[2:]) == 0 and torch.count_nonzero(grad_x[:2]) == grad_x[:2].numel()


def test_the_means_are_constants_and_w_is_differentiable():
    x, weight, gain = (t.requires_grad_() for t in _operands("non_negative"))
    _, mean = _cpp(4, 1, "abs_mean")(x, weight, gain)
    assert not mean.requires_grad
    out, _ = _cpp(4, 1, "abs_mean")(x, weight, gain)
    out.sum().backward()
    assert x.grad is not None and weight.grad is not None and gain.grad is not None


@pytest.mark.parametrize("statistic", ["mean", "abs_mean"])
def test_gradgradcheck(statistic):
    x, weight, gain = _operands("non_negative" if statistic == "mean" else "one_channel_signed", torch.float64)
    x, weight, gain = (t.requires_grad_() for t in (x[:, :, :3, :3].clone(), weight[:, :, :2, :2].clone(), gain))
    forward = _cpp(2, 1, statistic)
    assert torch.autograd.gradcheck(lambda *a: forward(*a)[0], (x, weight, gain))
    assert torch.autograd.gradgradcheck(lambda *a: forward(*a)[0], (x, weight, gain))


def test_opcheck():
    op = torch.ops.equinorm_kernels.equinorm_forward_autograd.default
    x, weight, gain = _operands("one_channel_signed")
    for requires_grad in (False, True):
        operands = [t.detach().clone().requires_grad_(requires_grad) for t in (x, weight, gain)]
        for statistic in ("abs_mean", "mean"):
            sample = operands[0].abs() if statistic == "mean" else operands[0]
            torch.library.opcheck(op, (sample, 3, operands[1], operands[2], 1.0, 1, MODE, EPS, statistic))


# Where one bad value goes, and what it does: a NaN or Inf reaches w'' (x through its channel mean,
# the weight through its row's shift, the gain through its row's scale); a negative channel mean
# leaves w'' finite and matters only to the "mean" statistic.
SCREEN_CASES = {
    "valid": lambda x, weight, gain: None,
    "nan_in_x": lambda x, weight, gain: x[1, 2, 3, 0].fill_(float("nan")),
    "inf_in_weight": lambda x, weight, gain: weight[4, 1, 0, 2].fill_(float("inf")),
    "nan_in_gain": lambda x, weight, gain: gain[5].fill_(float("nan")),
    "inf_in_gain_of_a_zero_row": lambda x, weight, gain: (weight[3].zero_(), gain[3].fill_(-float("inf"))),
    "negative_channel": lambda x, weight, gain: x[:, 1].neg_(),
}


@pytest.mark.parametrize("statistic", ["abs_mean", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", list(SCREEN_CASES))
def test_the_screen_passes_exactly_the_outputs_the_value_checks_accept(case, dtype, statistic):
    x, weight, gain = _operands("non_negative", dtype)
    SCREEN_CASES[case](x, weight, gain)
    op = torch.ops.equinorm_kernels.equinorm_forward_autograd
    out, mean, passed = op(x, 4, weight, gain, 1.0, 1, MODE, EPS, statistic, True)
    acceptable = bool(torch.isfinite(out).all()) and (statistic != "mean" or bool((mean >= 0).all()))
    assert passed is acceptable
    assert passed is (case == "valid" or (case == "negative_channel" and statistic == "abs_mean"))
    assert op(x, 4, weight, gain, 1.0, 1, MODE, EPS, statistic, False)[2] is True  # not asked: nothing read


def _layer_step(monkeypatch, with_cpp_autograd: bool):
    ops = equinorm_ops._OP_SETS["compiled"]
    if not with_cpp_autograd:
        monkeypatch.setitem(equinorm_ops._OP_SETS, "compiled", dataclasses.replace(ops, equinorm_forward_autograd=None))
        # and not the layer's one-call forward, which calls the C++ autograd too
        cpp = ek.backends.resolve_backend("cpp", torch.device("cpu"))
        monkeypatch.setitem(ek.backends._REGISTRY, "cpp", dataclasses.replace(cpp, conv_train_forward=None))
    torch.manual_seed(0)
    layer = ek.EquiNormConv2d(4, 6, 3, padding=1, stats_fraction=0.5)
    x, _, _ = _operands("one_channel_signed")
    x.requires_grad_()
    F.relu(layer(x)).square().sum().backward()
    monkeypatch.undo()
    return x.grad, layer.weight.grad, layer.gain.grad, layer.bias.grad, layer.running_mean, layer.num_batches_tracked


def test_a_layer_step_is_the_same_with_either_autograd(monkeypatch):
    got = _layer_step(monkeypatch, with_cpp_autograd=True)
    expected = _layer_step(monkeypatch, with_cpp_autograd=False)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_the_layer_checks_its_input_before_the_unchecked_forward():
    layer = ek.EquiNormConv2d(4, 6, 3)
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64, got torch.int64"):
        layer(torch.ones(2, 4, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x has an empty batch \(N = 0\)"):
        layer(torch.ones(0, 4, 5, 5))
    assert int(layer.num_batches_tracked) == 0
