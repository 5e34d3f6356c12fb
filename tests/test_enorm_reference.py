"""The ENorm per-channel math on hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch

from equinorm_kernels.reference.enorm import (
    enorm_balance_pair_,
    enorm_coefficients,
    enorm_column_energy,
    enorm_row_energy,
    enorm_scale_columns_,
    enorm_scale_rows_,
)

SQRT2 = math.sqrt(2.0)


def test_coefficients_hand_computed_p2():
    rows = torch.tensor([4.0, 1.0, 2.0], dtype=torch.float64)
    cols = torch.tensor([1.0, 16.0, 2.0], dtype=torch.float64)
    # d = (C / R)^(1/4)
    expected = torch.tensor([0.5**0.5, 2.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(enorm_coefficients(rows, cols, 2.0), expected)


def test_coefficients_hand_computed_with_c_and_p1():
    rows = torch.tensor([1.0, 2.0], dtype=torch.float64)
    cols = torch.tensor([8.0, 1.0], dtype=torch.float64)
    # p = 1, c = 2: d = (C / (2 R))^(1/2) = (4, 1/4)^(1/2)
    expected = torch.tensor([2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(enorm_coefficients(rows, cols, 1.0, c=2.0), expected)


def test_coefficients_zero_energy_keeps_one():
    rows = torch.tensor([0.0, 3.0, 0.0, 1e-30])
    cols = torch.tensor([5.0, 0.0, 0.0, 1e30])
    d = enorm_coefficients(rows, cols, 2.0)
    assert torch.isfinite(d).all()
    assert d[:3].tolist() == [1.0, 1.0, 1.0]
    # a tiny but non-zero energy still gets the exact coefficient: (1e60)^(1/4) = 1e15
    assert d[3].item() == pytest.approx(1e15, rel=1e-4)


def test_row_energy_with_and_without_bias():
    weight = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    bias = torch.tensor([2.0, -1.0])
    assert enorm_row_energy(weight, 2.0).tolist() == [5.0, 9.0]
    assert enorm_row_energy(weight, 2.0, bias).tolist() == [9.0, 10.0]
    assert enorm_row_energy(weight, 1.0, bias).tolist() == [5.0, 4.0]
    gamma = torch.tensor([-2.0, 0.5])
    assert enorm_row_energy(gamma, 2.0, torch.tensor([1.0, 0.0])).tolist() == [5.0, 0.25]


def test_column_energy_grouped_conv_matches_explicit_loop():
    torch.manual_seed(0)
    groups, out_channels, per_group = 2, 6, 3
    weight = torch.randn(out_channels, per_group, 2, 2, dtype=torch.float64)
    expected = []
    for channel in range(groups * per_group):
        g, j = divmod(channel, per_group)
        block = weight[g * out_channels // groups : (g + 1) * out_channels // groups, j]
        expected.append(float((block**2).sum()))
    got = enorm_column_energy(weight, 2.0, groups=groups)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_column_energy_after_flatten():
    weight = torch.arange(16.0).reshape(2, 8)  # 2 channels x 4 positions each
    got = enorm_column_energy(weight, 1.0, columns_per_channel=4)
    left = sum(range(0, 4)) + sum(range(8, 12))
    right = sum(range(4, 8)) + sum(range(12, 16))
    assert got.tolist() == [left, right]


def test_scale_columns_grouped_and_channels_last_agree():
    torch.manual_seed(1)
    weight = torch.randn(8, 2, 3, 3)
    factor = torch.rand(4) + 0.5
    expected = weight.clone()
    for channel in range(4):
        g, j = divmod(channel, 2)
        expected[g * 4 : (g + 1) * 4, j] *= factor[channel]
    contiguous = weight.clone()
    enorm_scale_columns_(contiguous, factor, groups=2)
    strided = weight.clone().contiguous(memory_format=torch.channels_last)
    enorm_scale_columns_(strided, factor, groups=2)
    torch.testing.assert_close(contiguous, expected)
    torch.testing.assert_close(strided, expected)
    assert strided.is_contiguous(memory_format=torch.channels_last)


def test_scale_rows_weight_and_bias():
    weight = torch.ones(2, 3)
    bias = torch.tensor([1.0, 2.0])
    d = torch.tensor([2.0, 0.5])
    enorm_scale_rows_(weight, d)
    enorm_scale_rows_(bias, d)
    assert weight.tolist() == [[2.0] * 3, [0.5] * 3]
    assert bias.tolist() == [2.0, 1.0]


def test_balance_pair_hand_computed():
    producer = torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    consumer = torch.tensor([[2.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    # R = (2, 4), C = (8, 1): d = (4, 1/4)^(1/4) = (sqrt 2, 1/sqrt 2)
    d = enorm_balance_pair_(producer, consumer, p=2.0)
    torch.testing.assert_close(d, torch.tensor([SQRT2, 1 / SQRT2], dtype=torch.float64))
    torch.testing.assert_close(producer, torch.tensor([[SQRT2, SQRT2], [SQRT2, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(consumer, torch.tensor([[SQRT2, 0.0], [SQRT2, SQRT2]], dtype=torch.float64))


def test_balance_pair_bias_counted_or_not():
    for include_bias, expected in ((True, 1 / math.sqrt(5.0)), (False, 1 / math.sqrt(3.0))):
        producer = torch.tensor([[3.0]], dtype=torch.float64)
        bias = torch.tensor([4.0], dtype=torch.float64)
        consumer = torch.tensor([[1.0]], dtype=torch.float64)
        # R = 9 (+16 with the bias), C = 1: d = (1/25)^(1/4) or (1/9)^(1/4)
        d = enorm_balance_pair_(producer, consumer, producer_bias=bias, include_bias=include_bias)
        assert d.item() == pytest.approx(expected)
        assert bias.item() == pytest.approx(4.0 * expected)  # rescaled either way
        assert consumer.item() == pytest.approx(1.0 / expected)


def test_balance_pair_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="3 output channels"):
        enorm_balance_pair_(torch.ones(3, 2), torch.ones(2, 4))
