"""ENorm: one cycle, and balancing to convergence from the same weights every round."""
import pytest

pytest.importorskip("pytest_benchmark")

FAMILIES = ("enorm_cycle", "enorm_balance")


def test_enorm(run_provider, bench_case, provider_name):
    run_provider()
