"""The EquiNorm ops: channel statistics, the weight transform, both fused, and the read ceiling."""
import pytest

pytest.importorskip("pytest_benchmark")

FAMILIES = (
    "read_ceiling",
    "channel_mean",
    "weight_forward",
    "weight_backward",
    "weight_forward_backward",
    "stats_weight_forward_backward",
)


def test_equinorm_op(run_provider, bench_case, provider_name):
    run_provider()
