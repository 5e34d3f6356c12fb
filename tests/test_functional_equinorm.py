"""The public functional API: backend selection, data (value) checks and argument validation.

Argument errors are checked for both ``equinorm_kernels.reference.*`` and ``equinorm_kernels.*``:
each must raise and name the offending argument.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import equinorm_kernels
from equinorm_kernels import _checks, reference

import equinorm_oracle as oracle


@pytest.fixture(params=["reference", "functional"])
def api(request):
    return reference if request.param == "reference" else equinorm_kernels


@pytest.fixture
def value_checks_off():
    equinorm_kernels.set_value_checks(False)
    try:
        yield
    finally:
        equinorm_kernels.set_value_checks(True)


def _weight(shape=(4, 3, 3, 3), seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _means(channels=3, dtype=torch.float32):
    return torch.linspace(0.2, 1.0, channels, dtype=torch.float64).to(dtype)


def _x(shape=(4, 3, 5, 5), dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


def test_available_backends_on_cpu_contains_reference():
    names = equinorm_kernels.available_backends("cpu")
    assert "reference" in names
    assert names == equinorm_kernels.available_backends(torch.device("cpu"))
    assert names == equinorm_kernels.available_backends(torch.zeros(1))
    assert equinorm_kernels.available_backends() == names


def test_available_backends_rejects_a_non_device():
    with pytest.raises(ValueError, match="device"):
        equinorm_kernels.available_backends("not-a-device")


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("mode", ["single_pass", "exact"])
def test_functional_backends_match_oracle(backend, mode):
    w = _weight((6, 2, 3, 3), 2, torch.float64)
    mu = _means(4, torch.float64)
    gain = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    out = equinorm_kernels.equinorm_weight(w, mu, ratio=0.8, groups=2, mode=mode, gain=gain, backend=backend)
    expected = oracle.equinorm_weight(w, mu, ratio=0.8, groups=2, mode=mode, gain=gain)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)
    x = _x((3, 4, 2, 2), torch.float64)
    np.testing.assert_allclose(
        equinorm_kernels.channel_mean(x, stats_fraction=0.5, backend=backend).numpy(),
        oracle.channel_mean(x, 0.5),
        rtol=1e-13,
    )


def test_unknown_backend_lists_the_valid_ones():
    w, mu, x = _weight(), _means(), _x()
    for call in (
        lambda: equinorm_kernels.equinorm_weight(w, mu, backend="no-such-backend"),
        lambda: equinorm_kernels.channel_mean(x, backend="no-such-backend"),
    ):
        with pytest.raises(ValueError, match="backend") as info:
            call()
        message = str(info.value)
        assert "no-such-backend" in message
        assert "'auto'" in message and "'reference'" in message


def test_backend_must_be_a_string():
    with pytest.raises(TypeError, match="backend"):
        equinorm_kernels.equinorm_weight(_weight(), _means(), backend=None)


# ---------------------------------------------------------------------------------------------
# Value checks (functional API only)
# ---------------------------------------------------------------------------------------------


def test_negative_mean_is_rejected():
    mu = _means()
    mu[1] = -0.25
    with pytest.raises(ValueError, match="non-negative") as info:
        equinorm_kernels.equinorm_weight(_weight(), mu)
    assert "mean" in str(info.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_mean_is_rejected(bad):
    mu = _means()
    mu[2] = bad
    with pytest.raises(ValueError, match="mean"):
        equinorm_kernels.equinorm_weight(_weight(), mu)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weight_is_rejected(bad):
    w = _weight()
    w[1, 2, 0, 1] = bad
    with pytest.raises(ValueError, match="weight"):
        equinorm_kernels.equinorm_weight(w, _means())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_non_finite_weight_error_names_the_first_bad_index(dtype):
    w = _weight(dtype=dtype)
    w[2, 0, 1, 1] = math.inf
    w[1, 2, 0, 1] = math.nan
    with pytest.raises(ValueError, match=r"^weight contains NaN or Inf .*first at index \(1, 2, 0, 1\)"):
        equinorm_kernels.equinorm_weight(w, _means())


def test_finite_weights_whose_sum_overflows_pass_the_value_checks():
    # The checks screen a tensor by its sum; an overflowing sum of finite values is not an error.
    huge = torch.full((4, 3, 2, 2), 3e38)
    huge[:, :, 0, 0] = -3e38
    _checks.check_equinorm_weight_values(huge, _means(), None)
    half = torch.full((8, 64, 3, 3), 60000.0, dtype=torch.float16)  # sums past float16's 65504
    half[:, :, 0, 0] = -1.0
    out = equinorm_kernels.equinorm_weight(half, torch.rand(64))
    assert torch.isfinite(out).all()


def test_non_finite_gain_is_rejected():
    gain = torch.ones(4)
    gain[3] = math.nan
    with pytest.raises(ValueError, match="gain"):
        equinorm_kernels.equinorm_weight(_weight(), _means(), gain=gain)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_finite_input_is_rejected_by_channel_mean(bad, dtype):
    x = _x(dtype=dtype)
    x[2, 1, 3, 0] = bad
    with pytest.raises(ValueError, match=r"\bx\b"):
        equinorm_kernels.channel_mean(x)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_is_rejected_by_the_fused_forward_naming_x(bad):
    x = _x()
    x[2, 1, 3, 0] = bad
    with pytest.raises(ValueError, match=r"^x contains NaN or Inf \(its channel means are not finite"):
        equinorm_kernels.equinorm_forward(x, _weight())
    w = _weight()
    w[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"^weight contains NaN or Inf"):
        equinorm_kernels.equinorm_forward(_x(), w)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("mode", ["single_pass", "exact"])
@pytest.mark.parametrize("zero_input", [False, True], ids=["input", "zero-input"])
@pytest.mark.parametrize(
    "operand, bad",
    [("weight", math.nan), ("weight", math.inf), ("weight", -math.inf), ("gain", math.nan), ("gain", math.inf),
     ("gain on a zero row", -math.inf)],
)
def test_the_fused_forward_rejects_every_non_finite_weight_or_gain(backend, mode, zero_input, operand, bad):
    # The fused forward screens w'' rather than its operands: each of them must still be named,
    # also where the means are all zero or the bad gain multiplies a zero weight row.
    x = torch.zeros(2, 3, 4, 4) if zero_input else _x()
    w, gain = _weight(), torch.ones(4)
    if operand == "weight":
        w[1, 2, 0, 1] = bad
    else:
        gain[1] = bad
        if operand == "gain on a zero row":
            w[1] = 0.0
    name = operand.split()[0]
    with pytest.raises(ValueError, match=rf"^{name} contains NaN or Inf"):
        equinorm_kernels.equinorm_forward(x, w, gain=gain, mode=mode, backend=backend)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_the_fused_forward_with_the_mean_statistic_rejects_a_negative_channel_mean(backend):
    x = _x()
    x[:, 1] = -x[:, 1]
    with pytest.raises(ValueError, match=r"must be non-negative.*input channel 1 has mean"):
        equinorm_kernels.equinorm_forward(x, _weight(), statistic="mean", backend=backend)
    out, _ = equinorm_kernels.equinorm_forward(x, _weight(), statistic="abs_mean", backend=backend)
    assert torch.isfinite(out).all()


def test_non_finite_input_outside_the_statistics_samples_is_harmless():
    # Only the first ceil(f * N) samples feed the means.
    x = _x((4, 3, 2, 2))
    x[3] = math.nan
    mean = equinorm_kernels.channel_mean(x, stats_fraction=0.5)
    assert torch.isfinite(mean).all()


def test_value_checks_can_be_turned_off(value_checks_off):
    mu = _means()
    mu[0] = -0.5
    equinorm_kernels.equinorm_weight(_weight(), mu)  # negative mean: no error
    w = _weight()
    w[0, 0, 0, 0] = math.nan
    equinorm_kernels.equinorm_weight(w, _means())  # NaN weight: no error
    gain = torch.ones(4)
    gain[0] = math.inf
    equinorm_kernels.equinorm_weight(_weight(), _means(), gain=gain)  # Inf gain: no error
    x = _x()
    x[0, 0, 0, 0] = math.nan
    mean = equinorm_kernels.channel_mean(x)  # NaN input: no error
    assert torch.isnan(mean[0]) and torch.isfinite(mean[1:]).all()


def test_value_checks_are_back_on_after_being_turned_off():
    equinorm_kernels.set_value_checks(False)
    try:
        equinorm_kernels.equinorm_weight(_weight(), -_means())
    finally:
        equinorm_kernels.set_value_checks(True)
    with pytest.raises(ValueError, match="non-negative"):
        equinorm_kernels.equinorm_weight(_weight(), -_means())


def test_zero_means_pass_the_value_checks():
    out = equinorm_kernels.equinorm_weight(_weight(), torch.tensor([0.0, 0.5, 0.0]))
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# Argument validation, both APIs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"weight": torch.ones(4)}, "weight"),  # 1-D weight
        ({"mean": torch.ones(1, 3)}, "mean"),  # 2-D mean
        ({"mean": torch.ones(())}, "mean"),  # 0-D mean
        ({"mean": torch.ones(4)}, "mean"),  # C + 1 means
        ({"mean": torch.ones(2)}, "mean"),  # C - 1 means
        ({"groups": 3}, "groups"),  # D = 4 not divisible by 3
        ({"groups": 0}, "groups"),
        ({"groups": -1}, "groups"),
        ({"groups": 2}, "mean"),  # weight (4, 3, ...) with groups 2 needs C = 6 means
        ({"gain": torch.ones(5)}, "gain"),
        ({"gain": torch.ones(4, 1)}, "gain"),
        ({"gain": torch.ones(3)}, "gain"),
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": -1.0}, "ratio"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-5}, "eps"),
        ({"mode": "two_pass"}, "mode"),
        ({"mode": "Exact"}, "mode"),
        ({"weight": torch.ones(0, 3, 3, 3)}, "weight"),  # no output channels
        ({"weight": torch.ones(4, 3, 0, 3)}, "weight"),  # empty kernel
    ],
)
def test_equinorm_weight_bad_values(api, kwargs, name):
    args = {"weight": _weight(), "mean": _means()}
    args.update(kwargs)
    weight, mean = args.pop("weight"), args.pop("mean")
    with pytest.raises(ValueError, match=name):
        api.equinorm_weight(weight, mean, **args)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"weight": torch.ones(4, 3, 3, 3, dtype=torch.int64)}, "weight"),
        ({"weight": torch.ones(4, 3, 3, 3, dtype=torch.int32)}, "weight"),
        ({"weight": torch.ones(4, 3, 3, 3, dtype=torch.bool)}, "weight"),
        ({"weight": torch.ones(4, 3, 3, 3, dtype=torch.complex64)}, "weight"),
        ({"mean": torch.ones(3, dtype=torch.int64)}, "mean"),
        ({"gain": torch.ones(4, dtype=torch.int64)}, "gain"),
        ({"weight": [[1.0, -1.0]]}, "weight"),  # not a tensor
        ({"mean": [0.5, 0.5, 0.5]}, "mean"),
        ({"gain": [1.0] * 4}, "gain"),
        ({"ratio": math.nan}, "ratio"),
        ({"ratio": "1"}, "ratio"),
        ({"eps": math.inf}, "eps"),
        ({"groups": 1.0}, "groups"),
        ({"groups": True}, "groups"),
    ],
)
def test_equinorm_weight_bad_types(api, kwargs, name):
    args = {"weight": _weight(), "mean": _means()}
    args.update(kwargs)
    weight, mean = args.pop("weight"), args.pop("mean")
    with pytest.raises((TypeError, ValueError), match=name):
        api.equinorm_weight(weight, mean, **args)


def test_int_dtype_raises_type_error(api):
    with pytest.raises(TypeError, match="weight"):
        api.equinorm_weight(torch.ones(4, 3, 3, 3, dtype=torch.int64), _means())
    with pytest.raises(TypeError, match=r"\bx\b"):
        api.channel_mean(torch.ones(2, 3, 4, 4, dtype=torch.int64))


@pytest.mark.parametrize("which", ["mean", "gain"])
def test_device_mismatch(api, which):
    weight, mean, gain = _weight(), _means(), torch.ones(4)
    if which == "mean":
        mean = mean.to("meta")
    else:
        gain = gain.to("meta")
    with pytest.raises(ValueError, match=which) as info:
        api.equinorm_weight(weight, mean, gain=gain)
    assert "meta" in str(info.value) and "cpu" in str(info.value)


def test_device_mismatch_weight_on_meta(api):
    with pytest.raises(ValueError, match="mean") as info:
        api.equinorm_weight(_weight().to("meta"), _means())
    assert "meta" in str(info.value)


@pytest.mark.parametrize(
    "x,kwargs,name",
    [
        (torch.ones(5), {}, r"\bx\b"),  # 1-D
        (torch.ones(()), {}, r"\bx\b"),  # 0-D
        (torch.ones(0, 3, 4, 4), {}, r"\bx\b"),  # empty batch
        (torch.ones(0, 3), {}, r"\bx\b"),  # empty batch, 2-D
        (torch.ones(2, 0, 4, 4), {}, r"\bx\b"),  # no channels
        (torch.ones(2, 3, 0, 4), {}, r"\bx\b"),  # empty spatial extent
        (torch.ones(2, 3, 4, 4), {"stats_fraction": 0.0}, "stats_fraction"),
        (torch.ones(2, 3, 4, 4), {"stats_fraction": 1.5}, "stats_fraction"),
        (torch.ones(2, 3, 4, 4), {"stats_fraction": -0.5}, "stats_fraction"),
    ],
)
def test_channel_mean_bad_values(api, x, kwargs, name):
    with pytest.raises(ValueError, match=name):
        api.channel_mean(x, **kwargs)


def test_channel_mean_empty_batch_message(api):
    with pytest.raises(ValueError, match="empty batch"):
        api.channel_mean(torch.ones(0, 3, 4, 4))


@pytest.mark.parametrize(
    "x,kwargs,name",
    [
        (torch.ones(2, 3, 4, 4, dtype=torch.int32), {}, r"\bx\b"),
        (torch.ones(2, 3, 4, 4, dtype=torch.bool), {}, r"\bx\b"),
        ([[1.0, 2.0]], {}, r"\bx\b"),
        (torch.ones(2, 3, 4, 4), {"stats_fraction": math.nan}, "stats_fraction"),
        (torch.ones(2, 3, 4, 4), {"stats_fraction": None}, "stats_fraction"),
        (torch.ones(2, 3, 4, 4), {"stats_fraction": True}, "stats_fraction"),
    ],
)
def test_channel_mean_bad_types(api, x, kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        api.channel_mean(x, **kwargs)


def test_stats_fraction_one_is_accepted(api):
    x = _x((3, 2, 2, 2), torch.float64)
    np.testing.assert_allclose(api.channel_mean(x, stats_fraction=1).numpy(), oracle.channel_mean(x), rtol=1e-13)


def test_one_weight_per_output_channel_message(api):
    with pytest.raises(ValueError, match="weight") as info:
        api.equinorm_weight(torch.randn(4, 1, 1, 1), torch.ones(1))
    assert "(4, 1, 1, 1)" in str(info.value)
