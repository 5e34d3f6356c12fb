"""Correctness of ``channel_mean`` (the per-channel input statistics of EquiNorm).

Runs through both ``equinorm_kernels.reference`` and the public functional API; expected values
come from hand computations or the correctly rounded float64 oracle.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import equinorm_kernels
from equinorm_kernels import reference

import equinorm_oracle as oracle


@pytest.fixture(params=["reference", "functional"])
def api(request):
    return reference if request.param == "reference" else equinorm_kernels


def _x(shape, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)


def _check(got, x, stats_fraction=1.0, rtol=1e-13):
    expected = oracle.channel_mean(x, stats_fraction)
    assert got.shape == (x.shape[1],)
    np.testing.assert_allclose(oracle.to_numpy(got), expected, rtol=rtol, atol=0)


@pytest.mark.parametrize(
    "shape",
    [(4, 3), (5, 2, 7), (3, 4, 5, 6), (2, 3, 4, 3, 2), (1, 1, 1, 1), (2, 5, 1, 1)],
    ids=["2d", "3d", "4d", "5d", "single", "1x1"],
)
def test_float64_matches_oracle(api, shape):
    x = _x(shape, 1)
    mean = api.channel_mean(x)
    assert mean.dtype == torch.float64
    _check(mean, x)


def test_hand_computed(api):
    # x[n, c, h, w]: channel 0 holds 1..8, channel 1 holds 10 * (1..8), channel 2 is zero.
    x = torch.zeros((2, 3, 2, 2), dtype=torch.float64)
    x[:, 0] = torch.arange(1, 9, dtype=torch.float64).reshape(2, 2, 2)
    x[:, 1] = 10 * x[:, 0]
    torch.testing.assert_close(api.channel_mean(x), torch.tensor([4.5, 45.0, 0.0], dtype=torch.float64))
    # first half of the batch only: 1..4
    torch.testing.assert_close(
        api.channel_mean(x, stats_fraction=0.5), torch.tensor([2.5, 25.0, 0.0], dtype=torch.float64)
    )


def test_float32_input_gives_float32(api):
    x = _x((4, 3, 5, 5), 2, torch.float32)
    mean = api.channel_mean(x)
    assert mean.dtype == torch.float32
    _check(mean, x, rtol=1e-6)


def test_float64_stays_float64_precision(api):
    # Deviations of 1e-10 around 1: invisible in float32, exact enough in float64.
    gen = torch.Generator().manual_seed(3)
    x = 1.0 + 1e-9 * torch.randn((4, 2, 6, 6), generator=gen, dtype=torch.float64)
    mean = api.channel_mean(x)
    assert mean.dtype == torch.float64
    expected = oracle.channel_mean(x)
    assert np.abs(expected - 1.0).max() > 1e-11
    np.testing.assert_allclose(oracle.to_numpy(mean), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(api, dtype):
    # 64 * 32 * 32 = 65536 elements per channel in [0, 1). Summing them in the input dtype stalls
    # once the running sum's spacing exceeds the summands (relative error of tens of percent), and
    # even a correctly accumulated mean rounded to the input dtype is off by up to 2^-9 (fp16) /
    # 2^-8 (bf16). A float32 result accumulated in float32 is within a few 1e-7.
    x = _x((64, 2, 32, 32), 4, dtype)
    x[:, 1] *= 0.25
    mean = api.channel_mean(x)
    assert mean.dtype == torch.float32
    expected = oracle.channel_mean(x)
    np.testing.assert_allclose(oracle.to_numpy(mean), expected, rtol=1e-5, atol=0)
    # what sequential fp16 accumulation gives (for contrast; not the code under test)
    naive = x[:, 0].reshape(-1)[:8192].double().numpy().astype(np.float16).cumsum(dtype=np.float16)[-1] / 8192
    assert abs(float(naive) - oracle.channel_mean(x[:, :1].reshape(-1, 1)[:8192])[0]) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_channels_last(api, dtype):
    x = _x((3, 4, 5, 6), 5, dtype).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    mean = api.channel_mean(x)
    assert mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _check(mean, x, rtol=1e-13 if dtype == torch.float64 else 1e-6)


def test_channels_last_3d(api):
    x = _x((2, 3, 4, 3, 5), 6).contiguous(memory_format=torch.channels_last_3d)
    _check(api.channel_mean(x), x)


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x[:, :, ::2],  # strided spatial slice
        lambda x: x[::2],  # every other sample
        lambda x: x.transpose(2, 3),  # transposed spatial dims
        lambda x: x[:, 1:3],  # channel slice
        lambda x: x[:1, :, :1, :1].expand(4, 4, 5, 2),  # zero strides
        lambda x: x.permute(0, 2, 1, 3)[:, :, :3].permute(0, 2, 1, 3),  # permuted
    ],
    ids=["spatial-slice", "batch-slice", "transposed", "channel-slice", "expanded", "permuted"],
)
def test_non_contiguous(api, make):
    x = make(_x((6, 4, 5, 4), 7))
    assert not x.is_contiguous()
    _check(api.channel_mean(x), x)
    _check(api.channel_mean(x, stats_fraction=0.5), x, 0.5)


def test_non_contiguous_2d(api):
    x = _x((6, 5), 8).T  # (5, 6) with transposed strides
    _check(api.channel_mean(x), x)


@pytest.mark.parametrize(
    "batch,stats_fraction,rows",
    [
        (8, 0.25, 2),
        (30, 0.1, 3),
        (8, 0.3, 3),
        (7, 0.5, 4),
        (8, 1e-3, 1),
        (8, 1.0, 8),
        (10, 0.7, 7),
        (3, 1 / 3, 1),
        (50, 0.14, 7),  # 0.14 * 50 evaluates to 7.000000000000001 in floating point
        (25, 0.28, 7),  # likewise 7.000000000000001
    ],
)
@pytest.mark.parametrize("ndim", [2, 4])
def test_stats_fraction_uses_first_samples(api, batch, stats_fraction, rows, ndim):
    # Sample n holds the value (n + 1) * (c + 1) everywhere, so the mean over the first `rows`
    # samples is (rows + 1) / 2 * (c + 1) and identifies how many samples (and which) were used.
    spatial = (3, 2) if ndim == 4 else ()
    n = torch.arange(1, batch + 1, dtype=torch.float64).reshape(batch, 1, *([1] * len(spatial)))
    c = torch.arange(1, 4, dtype=torch.float64).reshape(1, 3, *([1] * len(spatial)))
    x = (n * c).expand(batch, 3, *spatial).contiguous()
    assert oracle.stats_rows(batch, stats_fraction) == rows
    mean = api.channel_mean(x, stats_fraction=stats_fraction)
    torch.testing.assert_close(mean, (rows + 1) / 2 * torch.arange(1, 4, dtype=torch.float64))


def test_stats_fraction_random_against_oracle(api):
    x = _x((10, 3, 4, 4), 9, torch.float32)
    for f in (0.1, 0.25, 0.55, 0.99):
        _check(api.channel_mean(x, stats_fraction=f), x, f, rtol=1e-6)


@pytest.mark.parametrize("stats_fraction,rows", [(1.0, 5), (0.4, 2)])
def test_gradient_is_uniform_over_used_samples(api, stats_fraction, rows):
    x = _x((5, 3, 4, 2), 10).requires_grad_()
    mean = api.channel_mean(x, stats_fraction=stats_fraction)
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    (mean * weights).sum().backward()
    expected = torch.zeros_like(x)
    expected[:rows] = weights.reshape(1, 3, 1, 1) / (rows * 4 * 2)
    torch.testing.assert_close(x.grad, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("stats_fraction", [1.0, 0.5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck(stats_fraction, channels_last):
    x = _x((4, 3, 2, 3), 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: reference.channel_mean(t, stats_fraction=stats_fraction), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradient_reaches_input(api, dtype):
    x = _x((4, 2, 3, 3), 12, dtype).requires_grad_()
    api.channel_mean(x).sum().backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), torch.full(x.shape, 1 / 36, dtype=torch.float64), rtol=2.0**-8, atol=0)
