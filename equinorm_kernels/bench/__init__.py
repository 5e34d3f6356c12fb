"""Microbenchmarks of the EquiNorm and ENorm kernels (``equinorm-bench``).

Modules: ``cases`` (the case definitions and the providers that run them), ``networks`` (the
ResNet-18 ENorm rescales, the weight-standardised conv baseline), ``timing`` (medians and p20/p80
with torch.utils.benchmark or CUDA events), ``runner`` (check each provider against the reference,
then time it), ``report`` (tables, JSON, plots), ``cli`` (the command). The pytest-benchmark
suites in benchmarks/ reuse ``cases``.
"""
from .cli import main

__all__ = ["main"]
