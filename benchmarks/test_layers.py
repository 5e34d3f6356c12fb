"""Whole layers: EquiNormConv2d per backend next to conv, conv + BatchNorm/GroupNorm, StdConv2d."""
import pytest

pytest.importorskip("pytest_benchmark")

FAMILIES = ("layer_train", "layer_eval")


def test_layer(run_provider, bench_case, provider_name):
    run_provider()
