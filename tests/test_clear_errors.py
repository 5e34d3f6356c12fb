"""Construction on the meta device, layers without output channels, and errors that say what is wrong."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import equinorm_kernels as ek


@pytest.mark.parametrize("factory", [lambda d: ek.EquiNormConv2d(4, 8, 3, device=d), lambda d: ek.EquiNormLinear(5, 6, device=d)])
def test_meta_construction_then_materialisation_gives_balanced_signs(factory):
    layer = factory("meta")
    assert layer.weight.is_meta
    torch.manual_seed(0)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.weight.fill_(0.5)  # every row one-signed: only the reset can balance them
        layer.running_mean.fill_(math.nan)
    layer.reset_parameters()
    rows = layer.weight.detach().flatten(1)
    assert ((rows > 0).any(dim=1) & (rows < 0).any(dim=1)).all()
    assert torch.equal(layer.running_mean, torch.ones_like(layer.running_mean))
    assert int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.gain.detach(), torch.ones(rows.shape[0]))


def test_linear_without_output_features_behaves_as_nn_linear():
    layer, plain = ek.EquiNormLinear(4, 0), nn.Linear(4, 0)
    x = torch.rand(3, 4)
    for mode in (True, False):
        assert layer.train(mode)(x).shape == plain(x).shape == (3, 0)
    assert layer.fold().weight.shape == (0, 4)


def test_conv_without_output_channels_behaves_as_nn_conv2d():
    layer, plain = ek.EquiNormConv2d(4, 0, 3), nn.Conv2d(4, 0, 3)
    assert layer.weight.shape == plain.weight.shape == (0, 4, 3, 3)
    x = torch.rand(2, 4, 5, 5)
    with pytest.raises(RuntimeError) as expected:
        plain(x)
    for mode in (True, False):
        with pytest.raises(RuntimeError) as got:
            layer.train(mode)(x)
        assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("call", ["channel_mean", "equinorm_forward"])
def test_a_finite_input_whose_channel_mean_overflows_is_reported_as_such(call):
    x = torch.rand(2, 3, 4, 4)
    x[:, 1] = 3e38  # finite, but the mean's float32 sum overflows
    run = {"channel_mean": lambda: ek.channel_mean(x), "equinorm_forward": lambda: ek.equinorm_forward(x, torch.randn(4, 3, 3, 3))}
    with pytest.raises(ValueError, match=r"^x is finite, but the mean of its input channel 1 overflows float32"):
        run[call]()


@pytest.mark.parametrize("call", ["channel_mean", "equinorm_forward"])
def test_non_finite_input_is_reported_at_its_first_position_in_x(call):
    x = torch.rand(4, 3, 4, 4)
    x[3, 0, 0, 0] = math.nan  # outside the statistics samples with stats_fraction=0.5
    x[1, 2, 3, 1] = math.inf
    x[1, 2, 0, 2] = math.nan
    run = {
        "channel_mean": lambda: ek.channel_mean(x, stats_fraction=0.5),
        "equinorm_forward": lambda: ek.equinorm_forward(x, torch.randn(4, 3, 3, 3), stats_fraction=0.5),
    }
    with pytest.raises(ValueError, match=r"^x contains NaN or Inf .*first at index \(1, 2, 0, 2\)\)$"):
        run[call]()


def test_raw_enorm_ops_without_tensors_say_so():
    ops = torch.ops.equinorm_kernels
    with pytest.raises(ValueError, match=r"^enorm_group_: tensors must not be empty"):
        ops.enorm_group_([], [], 2.0, 1.0)
    with pytest.raises(ValueError, match=r"^enorm_cycle_: tensors must not be empty"):
        ops.enorm_cycle_([], [], [], 2.0, 1.0)


def test_fake_enorm_kernels_reject_an_empty_program():
    ops = torch.ops.equinorm_kernels
    with FakeTensorMode():
        weight = torch.randn(3, 4)
        with pytest.raises(ValueError, match=r"^enorm_group_: entries must hold whole records of 6 ints.*got 0"):
            ops.enorm_group_([weight], [], 2.0, 1.0)
        with pytest.raises(ValueError, match=r"^enorm_cycle_: group_sizes must not be empty"):
            ops.enorm_cycle_([weight], [0, 0, 1, 1, 1, 1], [], 2.0, 1.0)


# Every stats_fraction outside (0, 1], and every value that is not a finite real number, is refused
# by name; the floats inside it, and the int 1, are taken.
BAD_FRACTIONS = [
    (0.0, ValueError), (-0.25, ValueError), (1.0000001, ValueError), (math.inf, TypeError), (-math.inf, TypeError),
    (math.nan, TypeError), (True, TypeError), ("0.5", TypeError), (None, TypeError),
]


@pytest.mark.parametrize("function", ["channel_mean", "tap_mean"])
@pytest.mark.parametrize("fraction,error", BAD_FRACTIONS, ids=[repr(value) for value, _ in BAD_FRACTIONS])
def test_a_stats_fraction_outside_its_range_is_refused_by_name(function, fraction, error):
    x = torch.rand(4, 3, 5, 5)
    call = {"channel_mean": lambda: ek.channel_mean(x, stats_fraction=fraction),
            "tap_mean": lambda: ek.tap_mean(x, 3, padding=1, stats_fraction=fraction)}[function]
    with pytest.raises(error, match="stats_fraction"):
        call()


@pytest.mark.parametrize("fraction,rows", [(1.0, 4), (0.5, 2), (1e-9, 1), (1, 4)])
def test_a_stats_fraction_in_its_range_averages_that_many_samples(fraction, rows):
    x = torch.rand(4, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(ek.channel_mean(x, stats_fraction=fraction), x[:rows].mean(dim=(0, 2, 3)))
    want = ek.reference.tap_mean(x[:rows], 3, padding=1)  # the pure-PyTorch reference on those samples
    torch.testing.assert_close(ek.tap_mean(x, 3, padding=1, stats_fraction=fraction), want)
