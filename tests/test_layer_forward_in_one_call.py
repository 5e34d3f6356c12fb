"""Layers' training forward in one call (equinorm_conv_train_forward and
equinorm_linear_train_forward, eager CPU calls).

The same outputs, gradients and running statistics as the forward made step by step, bit for bit
(the same kernels in the same order), and the reference's within rounding; the layers fall back to
the steps wherever the one call does not apply, and a failed value screen tracks nothing.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import equinorm_kernels as ek
from equinorm_kernels import backends, reference

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.equinorm_kernels, "equinorm_conv_train_forward"), reason="the C++ extension is not built"
)

CPU = torch.device("cpu")


def _patch_one_call(monkeypatch, counting: bool) -> list:
    """Count the layers' one-call forwards (counting) or take the ops away (not counting)."""
    backend = backends.resolve_backend("auto", CPU)
    calls: list = []
    replaced = {}
    for field in ("conv_train_forward", "linear_train_forward"):
        run = getattr(backend, field)
        assert run is not None, f"the C++ backend serves CPU layers in one call ({field})"
        replaced[field] = (lambda *args, run=run: calls.append(args) or run(*args)) if counting else None
    monkeypatch.setitem(backends._REGISTRY, backend.name, dataclasses.replace(backend, **replaced))
    return calls


def _signed_input(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.25  # every channel has negatives
    return x.to(dtype)


def _steps(layer, x, steps=2):
    """Training steps of the layer on x: its outputs and everything they change."""
    x = x.detach().clone().requires_grad_()
    outputs = []
    for _ in range(steps):
        out = layer(x)
        F.relu(out).square().sum().backward()
        outputs.append(out.detach())
    state = [layer.running_mean.clone(), layer.num_batches_tracked.clone()]
    grads = [x.grad] + [p.grad for p in (layer.weight, layer.gain, layer.bias) if p is not None]
    return outputs + state + grads


LAYERS = {
    "conv2d": lambda: (ek.EquiNormConv2d(4, 6, 3, padding=1), (3, 4, 6, 5)),
    "conv2d_stride2_groups2_no_bias": lambda: (
        ek.EquiNormConv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False), (3, 4, 7, 6)
    ),
    "conv2d_dilation2_momentum_none_fraction": lambda: (
        ek.EquiNormConv2d(4, 5, 3, padding=2, dilation=2, momentum=None, stats_fraction=0.5), (4, 4, 6, 6)
    ),
    "conv2d_mean_exact": lambda: (ek.EquiNormConv2d(4, 6, 3, padding=1, statistic="mean", mode="exact"), (3, 4, 5, 5)),
    "conv1d_stride2": lambda: (ek.EquiNormConv1d(3, 5, 3, stride=2), (2, 3, 11)),
    "conv3d": lambda: (ek.EquiNormConv3d(2, 3, 3, padding=1), (2, 2, 4, 3, 4)),
    "conv2d_float64": lambda: (ek.EquiNormConv2d(4, 6, 3, padding=1, dtype=torch.float64), (3, 4, 6, 5)),
    "linear": lambda: (ek.EquiNormLinear(5, 7), (6, 5)),
    "linear_no_bias_momentum_none_fraction_exact": lambda: (
        ek.EquiNormLinear(5, 7, bias=False, momentum=None, stats_fraction=0.5, mode="exact"), (6, 5)
    ),
}


LAYOUT_CASES = [(name, "contiguous") for name in LAYERS] + [
    (name, "channels_last") for name in LAYERS if name.startswith("conv2d")
]


@pytest.mark.parametrize("name, layout", LAYOUT_CASES)
def test_one_call_equals_the_steps_bit_for_bit(name, layout, monkeypatch):
    torch.manual_seed(0)
    layer, shape = LAYERS[name]()
    x = _signed_input(shape, layer.weight.dtype)
    if layer.statistic == "mean":
        x = x.abs()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    steps_layer = copy.deepcopy(layer)
    calls = _patch_one_call(monkeypatch, counting=True)
    got = _steps(layer, x)
    assert len(calls) == 2
    _patch_one_call(monkeypatch, counting=False)
    expected = _steps(steps_layer, x)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and torch.equal(g, e)


def test_linear_in_one_call_matches_the_reference(monkeypatch):
    calls = _patch_one_call(monkeypatch, counting=True)
    torch.manual_seed(2)
    layer = ek.EquiNormLinear(5, 7, momentum=0.5, dtype=torch.float64)
    x = _signed_input((6, 5), torch.float64)
    mean = reference.channel_mean(x.abs())
    weight = reference.equinorm_weight(layer.weight, mean, gain=layer.gain)
    torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias))
    torch.testing.assert_close(layer.running_mean, 0.5 + 0.5 * mean)
    assert len(calls) == 1


def test_one_call_matches_the_reference(monkeypatch):
    calls = _patch_one_call(monkeypatch, counting=True)
    torch.manual_seed(1)
    layer = ek.EquiNormConv2d(4, 6, 3, stride=2, padding=1, momentum=0.25, dtype=torch.float64)
    x = _signed_input((3, 4, 7, 6), torch.float64)
    mean = reference.channel_mean(x.abs())
    ratio = (4 * 3) * 4 / (7 * 6)  # output positions x stride^2 / input positions
    weight = reference.equinorm_weight(layer.weight, mean, ratio=ratio, gain=layer.gain)
    torch.testing.assert_close(layer(x), F.conv2d(x, weight, layer.bias, stride=2, padding=1))
    torch.testing.assert_close(layer.running_mean, 0.75 + 0.25 * mean)
    assert int(layer.num_batches_tracked) == 1 and len(calls) == 1


def _bf16_layer():
    return ek.EquiNormConv2d(4, 6, 3, padding=1, dtype=torch.bfloat16), _signed_input((2, 4, 5, 5), torch.bfloat16)


def _parametrized_layer():
    layer = ek.EquiNormConv2d(4, 6, 3, padding=1)

    class Doubled(torch.nn.Module):
        def forward(self, weight):
            return 2 * weight

    parametrize.register_parametrization(layer, "weight", Doubled())
    return layer, _signed_input((2, 4, 5, 5))


# Where the one call does not apply: the layer makes the steps (and its results are the steps').
FALLBACKS = {
    "reflect_padding": lambda: (ek.EquiNormConv2d(4, 6, 3, padding=1, padding_mode="reflect"), _signed_input((2, 4, 5, 5))),
    "same_padding": lambda: (ek.EquiNormConv2d(4, 6, 3, padding="same"), _signed_input((2, 4, 5, 5))),
    "per_tap": lambda: (ek.EquiNormConv2d(4, 6, 3, padding=1, per_tap=True), _signed_input((2, 4, 5, 5))),
    "unbatched_input": lambda: (ek.EquiNormConv2d(4, 6, 3, padding=1), _signed_input((4, 5, 5))),
    "input_dtype_other_than_the_weight": lambda: (
        ek.EquiNormConv2d(4, 6, 3, padding=1), _signed_input((2, 4, 5, 5), torch.float64)
    ),
    "bfloat16_layer": _bf16_layer,
    "parametrized_weight": _parametrized_layer,
    "linear_on_sequences": lambda: (ek.EquiNormLinear(4, 6), _signed_input((3, 2, 4))),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_layers_make_the_steps_where_one_call_does_not_apply(name, monkeypatch):
    torch.manual_seed(0)
    layer, x = FALLBACKS[name]()
    steps_layer = copy.deepcopy(layer)
    calls = _patch_one_call(monkeypatch, counting=True)
    if name == "input_dtype_other_than_the_weight":
        with pytest.raises(RuntimeError, match="should be the same"):  # as nn.Conv2d on mixed dtypes
            layer(x)
        assert not calls
        return
    got = layer(x)
    assert not calls
    _patch_one_call(monkeypatch, counting=False)
    assert torch.equal(got, steps_layer(x))
    assert torch.equal(layer.running_mean, steps_layer.running_mean)


def test_the_parametrized_weight_is_the_one_applied(monkeypatch):
    layer, x = _parametrized_layer()
    plain = ek.EquiNormConv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        plain.weight.copy_(layer.weight)  # the parametrization's output, 2 x the original
        plain.bias.copy_(layer.bias)
    torch.testing.assert_close(layer(x), plain(x))


@pytest.mark.parametrize("bad", ["nan_in_x", "inf_in_weight", "negative_mean"])
def test_a_failed_screen_raises_as_the_steps_do_and_tracks_nothing(bad, monkeypatch):
    calls = _patch_one_call(monkeypatch, counting=True)
    layer = ek.EquiNormConv2d(4, 6, 3, padding=1, statistic="mean" if bad == "negative_mean" else "abs_mean")
    x = _signed_input((2, 4, 5, 5)).abs()
    if bad == "nan_in_x":
        x[1, 2, 3, 3] = float("nan")
    elif bad == "inf_in_weight":
        with torch.no_grad():
            layer.weight[2, 1, 0, 0] = float("inf")
    else:
        x[:, 3] = -x[:, 3]
    message = {"nan_in_x": "x contains NaN", "inf_in_weight": "weight contains NaN or Inf",
               "negative_mean": "mean must be non-negative"}
    with pytest.raises(ValueError, match=message[bad]):
        layer(x)
    assert len(calls) == 1  # the one call ran, failed its screen, and the steps named the culprit
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_mean, torch.ones(4))


OPCHECK_LAYERS = {
    "conv": lambda: (
        torch.ops.equinorm_kernels.equinorm_conv_train_forward.default,
        ek.EquiNormConv2d(4, 6, 3, stride=2, padding=1), (3, 4, 6, 5), ([2, 2], [1, 1], [1, 1], 1, 0.5),
    ),
    "linear": lambda: (torch.ops.equinorm_kernels.equinorm_linear_train_forward.default, ek.EquiNormLinear(4, 6), (3, 4), ()),
}


@pytest.mark.parametrize("kind", list(OPCHECK_LAYERS))
def test_opcheck(kind):
    torch.manual_seed(0)
    op, layer, shape, options = OPCHECK_LAYERS[kind]()
    x = _signed_input(shape)
    for requires_grad in (False, True):
        operands = [t.detach().clone().requires_grad_(requires_grad) for t in (x, layer.weight, layer.gain, layer.bias)]
        for momentum, screen in ((0.1, False), (None, False), (0.1, True)):
            running_mean, count = torch.ones(4), torch.tensor(0)
            args = (operands[0], 3, operands[1], operands[2], operands[3], running_mean, count, momentum, *options,
                    "single_pass", 1e-5, "abs_mean", screen)  # fmt: skip
            # The screen reads values: eager calls only (a trace would have to guard on its outcome).
            traced = () if screen else ("test_aot_dispatch_dynamic",)
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                        *traced))
