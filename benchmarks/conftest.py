"""pytest-benchmark suites over the cases of :mod:`equinorm_kernels.bench.cases`.

Every test is one (case, provider) pair: the provider is first checked against the reference (a
wrong result fails the test instead of recording a time), then timed by pytest-benchmark, grouped
by case so the providers of one case sit side by side. Options (or the environment variables in
brackets):

    --bench-preset tiny|quick|full   the case list [EQUINORM_BENCH_PRESET, default quick]
    --bench-device cpu|cuda|cuda:N   [EQUINORM_BENCH_DEVICE, default cuda when available]
    --bench-threads N                torch CPU threads [torch's default]
    --bench-no-compile               leave out torch.compile of the reference
    --bench-allocator reuse|default  host memory freed between calls kept in the process (see
                                     equinorm_kernels.bench.allocator) or the C library's default [reuse]
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch

from equinorm_kernels.bench.allocator import keep_freed_memory
from equinorm_kernels.bench.cases import REFERENCE, BuildContext, Case, ProviderFactory, cases_for
from equinorm_kernels.bench.cli import benchmarked_backends
from equinorm_kernels.bench.runner import AGREEMENT_TOLERANCE, first_outputs, relative_error
from equinorm_kernels.bench.timing import synchronize

# Rounds of a provider whose every call starts from a restored state (pytest-benchmark's pedantic mode).
RESTORED_ROUNDS = 5


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("equinorm benchmarks")
    group.addoption("--bench-preset", default=os.environ.get("EQUINORM_BENCH_PRESET", "quick"),
                    choices=("tiny", "quick", "full"), help="case list [quick]")  # fmt: skip
    group.addoption("--bench-device", default=os.environ.get("EQUINORM_BENCH_DEVICE"), help="device [cuda if available]")
    group.addoption("--bench-threads", type=int, default=None, help="torch CPU threads")
    group.addoption("--bench-no-compile", action="store_true", help="leave out torch.compile of the reference")
    group.addoption("--bench-allocator", choices=("reuse", "default"), default="reuse",
                    help="keep freed host memory in the process between calls, or the C library's default [reuse]")  # fmt: skip


def bench_context(config: pytest.Config) -> BuildContext:
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    return BuildContext(device, benchmarked_backends(device), compile_reference=not config.getoption("--bench-no-compile"))


def pytest_configure(config: pytest.Config) -> None:
    threads = config.getoption("--bench-threads", default=None)
    if threads:
        torch.set_num_threads(threads)
    if config.getoption("--bench-allocator", default="default") == "reuse":
        keep_freed_memory()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise over every (case, provider) of the module's FAMILIES in the chosen preset."""
    if "bench_case" not in metafunc.fixturenames:
        return
    context = bench_context(metafunc.config)
    selected = cases_for(metafunc.config.getoption("--bench-preset"), metafunc.module.FAMILIES)
    params = [
        pytest.param(case, name, id=f"{case.id}-{name}".replace(" ", "_"))
        for case in selected
        for name in case.provider_names(context)
    ]
    metafunc.parametrize(("bench_case", "provider_name"), params)


@dataclass
class CurrentCase:
    """The tensors and reference outputs of the case under test; one case alive at a time."""

    context: BuildContext
    case_id: str | None = None
    factories: dict[str, ProviderFactory] = field(default_factory=dict)
    expected: tuple[torch.Tensor, ...] | None = None

    def switch_to(self, case: Case) -> None:
        if case.id == self.case_id:
            return
        self.factories, self.expected = {}, None  # free the previous case first
        self.factories = case.build(self.context)
        self.case_id = case.id
        if REFERENCE in self.factories:
            self.expected, _ = first_outputs(self.factories[REFERENCE](), self.context.device)


@pytest.fixture(scope="session")
def current_case(pytestconfig: pytest.Config) -> CurrentCase:
    torch.set_num_threads(pytestconfig.getoption("--bench-threads") or torch.get_num_threads())
    return CurrentCase(bench_context(pytestconfig))


@pytest.fixture
def run_provider(benchmark, current_case: CurrentCase, bench_case: Case, provider_name: str):
    """Check the provider against the reference, then hand it to pytest-benchmark."""

    def run() -> None:
        current_case.switch_to(bench_case)
        device = current_case.context.device
        provider = current_case.factories[provider_name]()
        outputs, _ = first_outputs(provider, device)
        if provider.comparable and provider_name != REFERENCE and current_case.expected is not None:
            error = relative_error(outputs, current_case.expected)
            assert error <= AGREEMENT_TOLERANCE, f"{provider_name} differs from the reference: relative error {error:.3g}"
        benchmark.group = bench_case.id
        benchmark.extra_info.update(
            family=bench_case.family, provider=provider_name, device=str(device), threads=torch.get_num_threads(),
            bytes_moved=bench_case.bytes_moved, params={k: str(v) for k, v in bench_case.params.items()},
        )  # fmt: skip
        if provider.restore_every_run:
            benchmark.pedantic(provider.run, setup=provider.restore, rounds=RESTORED_ROUNDS, warmup_rounds=0)
        else:
            benchmark(_synchronised(provider.run, device))

    return run


def _synchronised(function, device: torch.device):
    """pytest-benchmark reads a host clock: wait for the device inside the timed call."""
    if device.type == "cpu":
        return function

    def call() -> None:
        function()
        synchronize(device)

    return call
