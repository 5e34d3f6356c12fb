"""The benchmarks at tiny sizes: every case runs with every provider, the providers that compute the
same thing agree (so a broken kernel cannot report a fast time), and the command writes its table,
JSON record, markdown and plots. Speed is never asserted here."""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import platform
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from equinorm_kernels import EquiNormConv2d, _checks
from equinorm_kernels.bench import allocator, cases, cli, report, runner, timing
from equinorm_kernels.bench.cases import REFERENCE, Case, Provider
from equinorm_kernels.bench.networks import ImageNetResNet, ImageNetResNet18, StdConv2d, parameter_count

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
CPU = torch.device("cpu")
# torch.compile with the "eager" backend: the compiled provider's code path (Dynamo capture, graph
# breaks, the backward through the captured graph) without Inductor's code generation time.
TINY_CONTEXT = cases.BuildContext(CPU, cli.benchmarked_backends(CPU), compile_backend="eager")
ONE_SAMPLE = timing.TimingSettings(min_run_time=0.0, min_samples=1, max_run_time=1.0, warmup_calls=0)


@pytest.mark.parametrize("case", cases.tiny_cases(), ids=lambda case: case.id)
def test_every_provider_runs_and_agrees_with_the_reference(case):
    result = runner.run_case(case, TINY_CONTEXT, settings=None)
    assert tuple(result.providers) == case.provider_names(TINY_CONTEXT)
    for name, provider in result.providers.items():
        assert provider.error is None, f"{name}: {provider.error}"
        if provider.comparable and name != REFERENCE:
            assert provider.agrees_with_reference, f"{name}: relative error {provider.max_relative_error}"


def test_a_wrong_or_failing_provider_is_reported_and_never_passes_as_fast():
    x = torch.rand(2, 3, 4, 4)

    def fail() -> None:
        raise RuntimeError("kernel exploded")

    def build(context: cases.BuildContext) -> dict:
        return {
            "wrong": lambda: Provider(run=lambda: x.mean(dim=(0, 2, 3)) * 1.01),
            REFERENCE: lambda: Provider(run=lambda: x.mean(dim=(0, 2, 3))),
            "failing": lambda: Provider(run=fail),
        }

    target = cases.Target("any speedup", min_speedup_over_reference=1e-9)
    case = Case("channel_mean", "synthetic", {}, build, bytes_moved=x.numel() * 4, target=target)
    result = runner.run_case(case, TINY_CONTEXT, ONE_SAMPLE)
    wrong, failing = result.providers["wrong"], result.providers["failing"]
    assert wrong.agrees_with_reference is False and wrong.max_relative_error == pytest.approx(0.01, rel=1e-3)
    assert failing.error == "RuntimeError: kernel exploded" and failing.timing is None
    assert result.speedup("failing") is None
    table = report.text_report([result], None, "header")
    assert "MISMATCH" in table and "FAILED: RuntimeError: kernel exploded" in table
    checks = {check.provider: check for check in report.target_checks([result], None)}
    assert checks["wrong"].met is False and checks["wrong"].invalid_because == "result differs from the reference"
    assert checks["failing"].met is False


def test_relative_error_compares_every_output_at_its_own_scale():
    a = (torch.tensor([1.0, 2.0]), torch.tensor([1e-6, 0.0]))
    assert runner.relative_error(a, a) == 0.0
    assert runner.relative_error((a[0], a[1] * 2), a) == pytest.approx(1.0)
    assert runner.relative_error((a[0] * 1.5, a[1]), a) == pytest.approx(0.5)
    assert runner.relative_error(a[:1], a) == math.inf
    assert runner.relative_error((torch.zeros(3), a[1]), a) == math.inf


def test_timing_summarises_blocks_into_median_and_percentiles():
    assert timing.percentile([4.0, 1.0, 3.0, 2.0, 5.0], 0.5) == 3.0
    assert timing.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)
    settings = timing.TimingSettings(min_run_time=0.01, min_samples=3, max_run_time=1.0, warmup_calls=1)
    x = torch.rand(1000)
    measured = timing.measure(lambda: x.sum(), CPU, settings)
    assert measured.samples >= 3 and 0 < measured.p20 <= measured.median <= measured.p80
    restored = []
    measured = timing.measure(lambda: x.sum(), CPU, settings, restore=lambda: restored.append(1))
    assert measured.samples >= 3 and len(restored) == measured.samples


def test_cpu_providers_are_timed_in_interleaved_rounds():
    calls = []
    x = torch.rand(100)

    def build(context: cases.BuildContext) -> dict:
        return {
            REFERENCE: lambda: Provider(run=lambda: calls.append(REFERENCE) or x.sum()),
            "other": lambda: Provider(run=lambda: calls.append("other") or x.sum()),
        }

    case = Case("channel_mean", "synthetic", {}, build, bytes_moved=400)
    settings = timing.TimingSettings(min_run_time=0.003, min_samples=6, max_run_time=1.0, warmup_calls=0, rounds=3)
    result = runner.run_case(case, TINY_CONTEXT, settings)
    runs = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]  # consecutive calls merged
    assert runs[:2] == [REFERENCE, "other"]  # the checks, then three rounds of both
    assert runs[2:] == [REFERENCE, "other"] * 3
    for name in (REFERENCE, "other"):
        assert result.providers[name].timing.samples >= 6 and "3 interleaved rounds" in result.providers[name].timing.method


def test_std_conv_standardises_each_output_channel():
    torch.manual_seed(0)
    conv = StdConv2d(3, 5, 3, padding=1)
    x = torch.rand(2, 3, 6, 6)
    rows = conv.weight.reshape(5, -1)
    standardised = (rows - rows.mean(dim=1, keepdim=True)) / torch.sqrt(rows.var(dim=1, unbiased=False, keepdim=True) + 1e-6)
    expected = F.conv2d(x, standardised.reshape_as(conv.weight), padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-4, atol=1e-5)


def test_resnet18_has_the_imagenet_layout_size():
    with torch.device("meta"):
        model = ImageNetResNet18()
    assert 11_000_000 < parameter_count(model) < 12_000_000
    assert len([m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]) == 20


@pytest.mark.parametrize("channels, groups", [(64, 32), (2048, 32), (6, 6), (48, 24), (7, 7)])
def test_group_norm_uses_at_most_32_groups_dividing_the_channels(channels, groups):
    assert cases.group_norm_groups(channels) == groups


def test_quick_and_full_runs_hold_every_target_case():
    for preset in ("quick", "full"):
        selected = cases.cases_for(preset)
        targets = {case.id for case in selected if case.target is not None}
        for shape, batch in cases.STATS_WEIGHT_TARGETS:
            assert f"stats_weight_forward_backward/N{batch} {shape.label}" in targets
        assert "enorm_cycle/resnet18" in targets
        bandwidth = [c for c in selected if c.family == "channel_mean" and c.target is not None]
        assert bandwidth and all(c.bytes_moved >= 64 * 2**20 for c in bandwidth)
        assert any(c.family == "read_ceiling" and c.bytes_moved >= 256 * 2**20 for c in selected)
        assert {case.family for case in selected} == set(cases.FAMILIES)


def test_command_writes_the_table_json_markdown_and_plots(tmp_path, capsys):
    checks_before = _checks.value_check_mode()
    families = ["read_ceiling", "channel_mean", "stats_weight_forward_backward", "enorm_cycle"]
    status = cli.main(["--smoke", "--no-compile", "--families", *families, "--json", str(tmp_path / "r.json"),
                       "--markdown", str(tmp_path / "r.md"), "--plot", str(tmp_path / "plots")])  # fmt: skip
    assert status == 0
    assert _checks.value_check_mode() == checks_before
    printed = capsys.readouterr().out
    assert "== targets" in printed and "== channel_mean" in printed and "read ceiling:" in printed

    record = json.loads((tmp_path / "r.json").read_text())
    environment = record["environment"]
    for key in ("device", "device_name", "torch", "triton", "git_commit", "threads", "timestamp", "fused_backends"):
        assert key in environment
    assert environment["threads"] == torch.get_num_threads() and environment["git_commit"]
    assert environment["fresh_page_us"] > 0
    if GLIBC:
        assert record["settings"]["host_allocator"].startswith("glibc malloc keeps freed memory")
    assert record["read_ceiling_gbps"] > 0 and record["targets"]
    assert {case["family"] for case in record["cases"]} == set(families)
    statistics = next(case for case in record["cases"] if case["family"] == "channel_mean")
    reference = statistics["providers"][REFERENCE]
    assert reference["median_s"] > 0 and reference["p20_s"] <= reference["median_s"] <= reference["p80_s"]
    for provider in statistics["providers"].values():
        for key in ("median_s", "p20_s", "p80_s", "ratio_to_reference", "ratio_to_compiled_reference", "gbps",
                    "percent_of_read_ceiling", "agrees_with_reference", "error"):  # fmt: skip
            assert key in provider
        assert provider["error"] is None
    for name in TINY_CONTEXT.fused_backends:
        assert statistics["providers"][name]["agrees_with_reference"] is True

    assert "| case | provider |" in (tmp_path / "r.md").read_text()
    plots = sorted((tmp_path / "plots").glob("*.png"))
    assert {p.name for p in plots} >= {"channel_mean.png", "channel_mean_bandwidth.png", "enorm_cycle.png"}
    assert all(p.read_bytes().startswith(PNG_SIGNATURE) for p in plots)


class _MallocInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def _free_bytes_held_by_malloc() -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc without mallinfo2 (before 2.33)")
    libc.mallinfo2.restype = _MallocInfo
    return libc.mallinfo2().fordblks


@pytest.mark.skipif(not GLIBC, reason="the allocator setting is for glibc")
def test_kept_memory_stays_in_the_process_after_it_is_freed():
    # 80 MiB in 8 MiB blocks, freed together: more than glibc's largest automatic trim threshold
    # (64 MiB), so by default the heap top goes back to the OS and the next use faults it in again.
    assert allocator.keep_freed_memory().startswith("glibc malloc keeps freed memory")
    held = [torch.ones(2 * 2**20) for _ in range(10)]
    del held
    assert _free_bytes_held_by_malloc() >= 80 * 2**20


def test_fresh_page_cost_is_measured():
    assert 0 < allocator.fresh_page_microseconds(repeats=3) < 1e4


def test_command_lists_cases_without_running_them(capsys):
    assert cli.main(["--quick", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == len(cases.quick_cases()) and any(line.endswith("[target]") for line in listed)


@pytest.mark.parametrize("depth, parameters", [(18, 11_689_512), (50, 25_557_032)])
def test_imagenet_resnets_have_the_torchvision_sizes(depth, parameters):
    # torchvision's resnet18 / resnet50 parameter counts (BatchNorm affine included, no conv bias).
    with torch.device("meta"):
        model = ImageNetResNet(depth, "batch")
    assert parameter_count(model) == parameters


@pytest.mark.parametrize("norm", ["batch", "group", "equinorm", "none"])
def test_imagenet_resnet50_runs_in_every_norm(norm):
    model = ImageNetResNet(50, norm, width=2, num_classes=3)
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 53 and all(isinstance(m, EquiNormConv2d) for m in convs) == (norm == "equinorm")


def test_model_cases_compare_eager_with_eager_and_compiled_with_compiled():
    medians = {"batchnorm": 4.0, "none": 2.0, "equinorm": 2.5, "batchnorm_compiled": 3.0, "none_compiled": 1.0,
               "equinorm_compiled": 1.5}  # fmt: skip

    def build(context: cases.BuildContext) -> dict:
        return {name: partial(Provider, run=lambda: None, comparable=False) for name in medians}

    case = Case("model_train", "synthetic", {}, build, target=cases.MODEL_TARGET, provider_set=cases.MODEL_PROVIDERS,
                ratio_baselines=cases.MODEL_RATIO_BASELINES)  # fmt: skip
    result = runner.run_case(case, TINY_CONTEXT, settings=None)
    for name, median in medians.items():
        result.providers[name].timing = timing.Timing(median, median, median, 1, "synthetic")
    assert result.ratio_to("equinorm", "batchnorm") == pytest.approx(1.6)
    assert result.ratio_to("equinorm", "none") == pytest.approx(0.8)
    assert result.ratio_to("equinorm_compiled", "batchnorm") == pytest.approx(2.0)
    assert result.ratio_to("equinorm_compiled", "none") == pytest.approx(2 / 3)
    assert result.ratio_to("none", "none") is None
    checks = {(c.provider, c.metric): c for c in report.target_checks([result], None)}
    assert {provider for provider, _ in checks} == {"equinorm", "equinorm_compiled"}
    assert checks["equinorm", "speedup over batchnorm"].met is True
    assert checks["equinorm", "speedup over none"].met is False
    table = report.text_report([result], None, "header")
    assert "x batchnorm" in table and "x none" in table and "x ref" not in table.split("== model_train")[1]


def test_model_cases_train_cifar_resnet20_on_cpu_and_imagenet_resnets_on_cuda(capsys):
    for preset in ("quick", "full"):
        cpu = [c for c in cases.cases_for(preset, ["model_train", "model_eval"]) if c.family == "model_train"]
        batches = (32,) if preset == "quick" else (32, 128)
        assert [c.label for c in cpu] == [f"CifarResNet-20 N{b}" for b in batches]
        compiled = preset == "full"
        names = cpu[0].provider_names(TINY_CONTEXT)
        assert names[:4] == ("batchnorm", "groupnorm", "equinorm", "none")
        assert len(names) == (8 if compiled else 4) and all(n.endswith("_compiled") for n in names[4:])
    assert cli.main(["--list", "--device", "cuda", "--families", "model_train"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in listed] == [
        f"model_train/ResNet-{depth} bfloat16 N{batch}" for depth in (18, 50) for batch in (32, 128)
    ]


def test_tiny_model_steps_keep_the_loss_finite():
    # The timed steps repeat one batch; they must stay finite (a NaN would stop EquiNorm's value checks).
    case = next(c for c in cases.tiny_cases() if c.family == "model_train")
    factories = case.build(TINY_CONTEXT)
    for name in ("batchnorm", "equinorm", "none"):
        provider = factories[name]()
        losses = [float(provider.run()) for _ in range(3)]
        assert all(math.isfinite(loss) for loss in losses), name
