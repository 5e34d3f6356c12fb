"""The experiment command: outputs of a real run, the statistics, CIFAR-10 loading, divergence,
ENorm interleaving and determinism."""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from equinorm_kernels.enorm import ENorm
from equinorm_kernels.experiments import main
from equinorm_kernels.experiments.cli import QUICK
from equinorm_kernels.experiments.data import DatasetError, load_cifar10, load_digits_dataset, take_train_subset
from equinorm_kernels.experiments.methods import METHOD_NAMES, method_by_name
from equinorm_kernels.experiments.report import median_iqr
from equinorm_kernels.experiments.training import TrainingSettings, train_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL = ["--train-subset", "160", "--energy-cycles", "3"]


@pytest.fixture(scope="module")
def digits():
    return take_train_subset(load_digits_dataset(), 96)


def _run_main(out: Path, *arguments: str) -> dict:
    assert main(["--quick", "--out", str(out), *SMALL, *arguments]) == 0
    return json.loads((out / "results.json").read_text())


def test_quick_run_writes_every_output_with_finite_numbers(tmp_path):
    results = _run_main(tmp_path)
    methods = [run["method"] for run in results["runs"]]
    assert methods == list(QUICK["methods"])
    for run in results["runs"]:
        assert not run["diverged"]
        curves = run["train_loss"] + run["test_loss"] + run["test_accuracy"]
        assert len(curves) == 3 and all(isinstance(v, float) and math.isfinite(v) for v in curves)
        assert run["wall_seconds"] > 0 and run["optimizer_steps"] == 160 // 16
    assert results["environment"]["torch"] == torch.__version__
    assert results["settings"]["epochs"] == 1 and results["settings"]["batch_sizes"] == [16]
    report = (tmp_path / "results.md").read_text()
    assert "equinorm-experiments --quick" in report and "median [p25, p75]" in report
    assert all(f"| {method} |" in report for method in methods)
    for name in ("test_accuracy", "test_loss", "train_loss", "enorm_energy_cycles", "enorm_energy_training"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE


def test_every_method_trains(tmp_path):
    results = _run_main(tmp_path, "--methods", *METHOD_NAMES)
    trained = {run["method"] for run in results["runs"]}
    assert trained == set(METHOD_NAMES)
    for run in results["runs"]:
        assert not run["diverged"], run["method"]
        assert 0.0 <= run["test_accuracy"][0] <= 1.0 and math.isfinite(run["test_loss"][0])


def test_median_iqr_uses_linear_interpolation():
    # numpy's default percentile: position q/100 * (n - 1) in the sorted values, linear in between.
    spread = median_iqr([4.0, 1.0, 3.0, 2.0])
    assert (spread.median, spread.p25, spread.p75, spread.count) == (2.5, 1.75, 3.25, 4)
    odd = median_iqr([10.0, 0.0, 5.0, math.nan])  # non-finite values (diverged runs) are left out
    assert (odd.median, odd.p25, odd.p75, odd.count) == (5.0, 2.5, 7.5, 3)
    assert median_iqr([7.0]).format() == "7.0 [7.0, 7.0]"
    with pytest.raises(ValueError, match="finite"):
        median_iqr([math.nan])


def _write_cifar_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    with path.open("wb") as handle:
        pickle.dump({b"batch_label": b"fake", b"data": data, b"labels": labels}, handle)


def _fake_cifar(root: Path, rows: int = 3) -> np.ndarray:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    batches = [generator.integers(0, 256, (rows, 3072), dtype=np.uint8) for _ in range(6)]
    for i, data in enumerate(batches[:5], start=1):
        _write_cifar_batch(folder / f"data_batch_{i}", data, [(i + r) % 10 for r in range(rows)])
    _write_cifar_batch(folder / "test_batch", batches[5], list(range(rows)))
    return np.concatenate(batches[:5])


def test_cifar_loader_reads_the_pickle_format(tmp_path):
    train_data = _fake_cifar(tmp_path)
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the parent or the folder itself
        dataset = load_cifar10(path)
        assert dataset.train_images.shape == (15, 3, 32, 32) and dataset.test_images.shape == (3, 3, 32, 32)
        assert dataset.train_images.dtype == torch.float32 and dataset.num_classes == 10
        assert dataset.train_labels.tolist()[:3] == [1, 2, 3] and dataset.test_labels.tolist() == [0, 1, 2]
        # Rows hold 1024 red, then green, then blue values, each image row-major.
        expected = torch.from_numpy(train_data.reshape(15, 3, 32, 32) / 255.0).float()
        torch.testing.assert_close(dataset.train_images, expected, rtol=0, atol=0)


def test_the_command_trains_on_a_cifar_directory(tmp_path):
    _fake_cifar(tmp_path / "data", rows=4)
    data = ["--data", str(tmp_path / "data"), "--arch", "resnet", "--batch-sizes", "4"]
    results = _run_main(tmp_path / "out", *data, "--methods", "equinorm", "enorm")
    assert results["dataset"]["name"] == "cifar10" and results["dataset"]["in_shape"] == [3, 32, 32]
    assert [run["optimizer_steps"] for run in results["runs"]] == [20 // 4, 20 // 4]
    assert all(math.isfinite(run["test_loss"][0]) for run in results["runs"])


def test_cifar_loader_errors_are_clear(tmp_path, capsys):
    with pytest.raises(DatasetError, match="not found"):
        load_cifar10(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="data_batch_1.*test_batch"):
        load_cifar10(tmp_path)
    _fake_cifar(tmp_path)
    _write_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch", np.zeros((2, 100), np.uint8), [0, 1])
    with pytest.raises(DatasetError, match=r"test_batch.*\(N, 3072\)"):
        load_cifar10(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "CIFAR-10 directory not found" in capsys.readouterr().err


def test_a_diverging_run_is_recorded_not_raised(tmp_path):
    results = _run_main(tmp_path, "--lr", "1e6", "--methods", "none", "equinorm")
    for run in results["runs"]:
        assert run["diverged"] and run["diverged_epoch"] == 0, run["method"]
        assert run["test_accuracy"] == [None] and run["energy_after_training"] is None
    report = (tmp_path / "results.md").read_text()
    assert "| none | diverged (1/1 div.) |" in report and "| equinorm | 1/1 |" in report


def test_enorm_runs_one_cycle_after_every_sgd_step(digits, monkeypatch):
    cycles = []
    original_step = ENorm.step
    monkeypatch.setattr(ENorm, "step", lambda self: (cycles.append(1), original_step(self))[1])
    settings = TrainingSettings("mlp", epochs=2, base_lr=0.05)
    result = train_run(method_by_name("enorm"), digits, settings, batch_size=16, seed=0, progress=False)
    assert result.optimizer_steps == 2 * (96 // 16) == len(cycles) == result.enorm_cycles
    cycles.clear()
    plain = train_run(method_by_name("none"), digits, settings, batch_size=16, seed=0, progress=False)
    assert cycles == [] and plain.enorm_cycles == 0
    # Same seed, same data order: only ENorm's rescaling tells the two runs apart.
    assert result.energy_at_init == plain.energy_at_init
    assert sum(result.energy_after_training.values()) < sum(plain.energy_after_training.values())


@pytest.mark.parametrize("method", ["batchnorm", "enorm"])
def test_runs_are_deterministic_given_the_seed(digits, method):
    settings = TrainingSettings("mlp", epochs=2, base_lr=0.05)
    first, again, other = (
        train_run(method_by_name(method), digits, settings, batch_size=8, seed=seed, progress=False)
        for seed in (1, 1, 2)
    )
    for curve in ("train_loss", "test_loss", "test_accuracy"):
        assert getattr(first, curve) == getattr(again, curve)
    assert first.train_loss != other.train_loss


def test_equinorm_quarter_takes_statistics_from_a_quarter_of_the_batch():
    from equinorm_kernels.experiments.methods import method_by_name
    from equinorm_kernels.layers import EquiNormLayer

    model = method_by_name("equinorm-quarter").build("mlp", (1, 8, 8), 10)
    fractions = {m.stats_fraction for m in model.modules() if isinstance(m, EquiNormLayer)}
    assert fractions == {0.25}
