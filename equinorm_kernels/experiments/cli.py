"""``equinorm-experiments`` (or ``python -m equinorm_kernels.experiments``): the normalization comparison.

Trains every selected method at every batch size with several seeds, then writes to ``--out``:
results.json (settings, environment, every run's curves), results.md (median [p25, p75] tables),
test accuracy/loss curves and ENorm energy plots as PNG.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from .. import __version__
from .._cli import finite_or_null, parsed, positive_float, positive_int
from .data import (
    SPLIT_SEED,
    Dataset,
    DatasetError,
    load_cifar10,
    load_digits_dataset,
    take_train_subset,
)
from .methods import METHOD_NAMES, Method, method_by_name
from .report import (
    plot_curves,
    plot_energy_cycles,
    plot_energy_training,
    results_tables,
)
from .training import (
    FIXUP_SCALAR_LR_FACTOR,
    REFERENCE_BATCH_SIZE,
    RunResult,
    TrainingSettings,
    energy_through_cycles,
    train_run,
)

PROGRAM = "equinorm-experiments"
DEFAULTS = {"methods": METHOD_NAMES, "seeds": 3, "batch_sizes": (2, 16, 128), "epochs": 8, "arch": "mlp"}
QUICK = {"methods": ("batchnorm", "equinorm", "none", "enorm"), "seeds": 1, "batch_sizes": (16,), "epochs": 1}
DEFAULT_BASE_LR = 0.01
ENERGY_SEED = 0


@dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of one invocation, defaults and ``--quick`` resolved."""

    data: str | None
    train_subset: int | None
    arch: str
    methods: tuple[str, ...]
    seeds: int
    batch_sizes: tuple[int, ...]
    epochs: int
    base_lr: float
    enorm_c: float
    energy_cycles: int
    threads: int
    out: Path
    quick: bool

    def training_settings(self) -> TrainingSettings:
        return TrainingSettings(self.arch, self.epochs, self.base_lr, self.enorm_c)


@dataclass(frozen=True)
class Experiment:
    """What one invocation produced, ready to be written out."""

    config: ExperimentConfig
    command: str
    dataset: Dataset
    methods: tuple[Method, ...]
    runs: tuple[RunResult, ...]
    energy_layers: tuple[str, ...]
    cycle_energies: tuple[tuple[float, ...], ...]

    @property
    def method_names(self) -> list[str]:
        return [method.name for method in self.methods]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment; returns the process exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    config = resolve_config(parser.parse_args(arguments))
    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    dataset = load_dataset_or_exit(parser, config)
    methods = [method_by_name(name) for name in config.methods]
    runs = run_all(config, methods, dataset)
    energy_layers, cycle_energies = fresh_model_energy(config, dataset)
    experiment = Experiment(
        config, shlex.join([PROGRAM, *arguments]), dataset, tuple(methods), tuple(runs),
        tuple(energy_layers), tuple(map(tuple, cycle_energies)),
    )  # fmt: skip
    plots = write_plots(experiment)
    tables = results_tables(runs, experiment.method_names, config.batch_sizes)
    wall_seconds = time.perf_counter() - start
    write_json(experiment, wall_seconds)
    write_markdown(experiment, tables, plots, wall_seconds)
    print(f"{experiment.command}\n\n{tables}\n\nwall time {wall_seconds:.0f} s; results in {config.out}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Compare normalizations (BatchNorm, GroupNorm, EquiNorm, ENorm) and normalization-free "
        "residual schemes over batch sizes and seeds; write tables and plots.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="PATH", help="CIFAR-10 python-format directory (or its parent); default: "
                      "scikit-learn's digits, a fixed stratified 80/20 split")  # fmt: skip
    data.add_argument("--train-subset", type=positive_int, metavar="N", help="use at most N training samples")
    runs = parser.add_argument_group("runs (defaults in brackets; --quick changes the unset ones)")
    runs.add_argument("--arch", choices=("mlp", "resnet"), help=f"model [{DEFAULTS['arch']}]")
    runs.add_argument("--methods", nargs="+", choices=METHOD_NAMES, metavar="NAME",
                      help=f"methods to compare, from: {', '.join(METHOD_NAMES)} [all]")  # fmt: skip
    runs.add_argument("--seeds", type=positive_int, help=f"seeds 0..N-1 per setting [{DEFAULTS['seeds']}]")
    runs.add_argument("--batch-sizes", nargs="+", type=_batch_size, metavar="B",
                      help=f"batch sizes [{' '.join(map(str, DEFAULTS['batch_sizes']))}]")  # fmt: skip
    runs.add_argument("--epochs", type=positive_int, help=f"epochs per run [{DEFAULTS['epochs']}]")
    runs.add_argument("--lr", type=positive_float, default=DEFAULT_BASE_LR, metavar="LR",
                      help=f"SGD learning rate at batch size {REFERENCE_BATCH_SIZE}, scaled linearly with the "
                      f"batch size (momentum 0.9, weight decay 5e-4) [{DEFAULT_BASE_LR}]")  # fmt: skip
    runs.add_argument("--enorm-c", type=positive_float, default=1.0, metavar="C",
                      help="ENorm's asymmetric scaling c [1.0]")  # fmt: skip
    runs.add_argument("--energy-cycles", type=positive_int, default=10, metavar="K",
                      help="ENorm cycles in the energy plot of an untrained model [10]")  # fmt: skip
    runs.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch, batch 16, 4 methods")
    system = parser.add_argument_group("output and system")
    system.add_argument("--threads", type=positive_int, help=f"torch CPU threads [{torch.get_num_threads()}]")
    system.add_argument("--out", type=Path, metavar="DIR", help="output directory [experiments/results/<dataset>]")
    return parser


def resolve_config(args: argparse.Namespace) -> ExperimentConfig:
    """Fill what the command line left unset from ``--quick`` or the defaults."""
    preset = {**DEFAULTS, **QUICK} if args.quick else DEFAULTS
    chosen = {name: getattr(args, name) for name in DEFAULTS}
    values = {name: tuple(v) if isinstance(v, list) else v for name, v in chosen.items()}
    values = {name: preset[name] if v is None else v for name, v in values.items()}
    dataset_name = "cifar10" if args.data else "digits"
    return ExperimentConfig(
        data=args.data,
        train_subset=args.train_subset,
        arch=values["arch"],
        methods=tuple(dict.fromkeys(values["methods"])),
        seeds=values["seeds"],
        batch_sizes=tuple(dict.fromkeys(values["batch_sizes"])),
        epochs=values["epochs"],
        base_lr=args.lr,
        enorm_c=args.enorm_c,
        energy_cycles=args.energy_cycles,
        threads=args.threads or torch.get_num_threads(),
        out=args.out or Path("experiments") / "results" / dataset_name,
        quick=args.quick,
    )


def load_dataset(path: str | None) -> Dataset:
    """CIFAR-10 from ``path``, or the bundled digits when ``path`` is None."""
    return load_digits_dataset() if path is None else load_cifar10(path)


def load_dataset_or_exit(parser: argparse.ArgumentParser, config: ExperimentConfig) -> Dataset:
    """The configured dataset; a usage error (exit status 2) when it is unusable."""
    try:
        dataset = take_train_subset(load_dataset(config.data), config.train_subset)
    except DatasetError as error:
        parser.exit(2, f"{PROGRAM}: error: {error}\n")
    if max(config.batch_sizes) > len(dataset.train_labels):
        parser.error(f"batch size {max(config.batch_sizes)} exceeds the {len(dataset.train_labels)} training samples")
    return dataset


def run_all(config: ExperimentConfig, methods: Sequence[Method], dataset: Dataset) -> list[RunResult]:
    """Every (method, batch size, seed) run, with a progress bar on stderr."""
    settings = config.training_settings()
    plan = [(m, b, s) for m in methods for b in config.batch_sizes for s in range(config.seeds)]
    runs = []
    for method, batch_size, seed in tqdm(plan, desc="runs", unit="run", file=sys.stderr):
        result = train_run(method, dataset, settings, batch_size, seed)
        if result.diverged:
            tqdm.write(f"{method.name} batch {batch_size} seed {seed}: diverged in epoch {result.diverged_epoch + 1}",
                       file=sys.stderr)  # fmt: skip
        runs.append(result)
    return runs


def fresh_model_energy(config: ExperimentConfig, dataset: Dataset) -> tuple[tuple[str, ...], list[list[float]]]:
    """Per-layer energy of an untrained plain model (norm none, standard) through ENorm cycles."""
    torch.manual_seed(ENERGY_SEED)
    model = method_by_name("none").build(config.arch, dataset.in_shape, dataset.num_classes)
    return energy_through_cycles(model, config.energy_cycles, config.enorm_c)


def write_plots(experiment: Experiment) -> list[str]:
    """Every PNG into the output directory; returns their file names."""
    out, runs, batch_sizes = experiment.config.out, experiment.runs, experiment.config.batch_sizes
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for metric in ("test_accuracy", "test_loss", "train_loss"):
        plot_curves(runs, experiment.method_names, batch_sizes, metric, out / f"{metric}.png")
        names.append(f"{metric}.png")
    plot_energy_cycles(experiment.energy_layers, experiment.cycle_energies, out / "enorm_energy_cycles.png")
    names.append("enorm_energy_cycles.png")
    if plot_energy_training(runs, batch_sizes, out / "enorm_energy_training.png"):
        names.append("enorm_energy_training.png")
    return names


def settings_record(config: ExperimentConfig) -> dict[str, object]:
    """The settings as written to results.json and results.md."""
    record = asdict(config)
    record.update(
        data=config.data or "digits (scikit-learn's bundled copy)",
        methods=list(config.methods),
        batch_sizes=list(config.batch_sizes),
        out=str(config.out),
        learning_rate=f"lr = {config.base_lr} * batch_size / {REFERENCE_BATCH_SIZE} (linear scaling), constant",
        learning_rates={str(b): config.training_settings().learning_rate(b) for b in config.batch_sizes},
        optimizer="SGD, momentum 0.9, weight decay 5e-4 on every parameter; "
        f"Fixup scalars at {FIXUP_SCALAR_LR_FACTOR} x lr",
        enorm="one cycle (sequential schedule, p = 2) after every optimizer step",
        data_split=f"digits: stratified 80/20, seed {SPLIT_SEED}; training subset: fixed seed {SPLIT_SEED}",
        seeding="torch.manual_seed(seed) before building each model; data order from a generator seeded with the seed",
    )
    return record


def write_json(experiment: Experiment, wall_seconds: float) -> None:
    """results.json: command, settings, environment, dataset, every run's curves, the energy trace."""
    record = {
        "command": experiment.command,
        "settings": settings_record(experiment.config),
        "environment": {
            "equinorm_kernels": __version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "dataset": experiment.dataset.describe(),
        "wall_seconds": wall_seconds,
        "enorm_energy_cycles": {"layers": experiment.energy_layers, "energy_per_cycle": experiment.cycle_energies},
        "runs": [run.to_dict() for run in experiment.runs],
    }
    text = json.dumps(finite_or_null(record), indent=1)
    (experiment.config.out / "results.json").write_text(text + "\n")


def write_markdown(experiment: Experiment, tables: str, plots: Sequence[str], wall_seconds: float) -> None:
    """results.md: the command, the measured wall time, the tables, the methods, the settings, the plots."""
    config, dataset = experiment.config, experiment.dataset
    lines = [
        f"# Normalization comparison on {dataset.name}",
        "",
        f"Command: `{experiment.command}` (same as `python -m equinorm_kernels.experiments ...`)",
        "",
        f"Measured wall time: {wall_seconds:.0f} s for {len(experiment.runs)} runs, from loading the data to the "
        f"last plot, on {torch.get_num_threads()} CPU threads ({platform.machine()}, torch {torch.__version__}).",
        "",
        f"Data: {len(dataset.train_labels)} training and {len(dataset.test_labels)} test images of shape "
        f"{dataset.in_shape}, {dataset.num_classes} classes. Model: {config.arch}. "
        f"{config.epochs} epochs, seeds 0..{config.seeds - 1}.",
        "",
        "Final numbers are taken after the last epoch; median and inter-quartile range over seeds use numpy's "
        "linear interpolation; diverged runs (non-finite loss or weights) are left out of them and counted.",
        "",
        tables,
        "",
        "## Methods",
        "",
        *[f"- **{m.name}**: {m.summary} (norm={m.norm}, scheme={m.scheme})" for m in experiment.methods],
        "",
        "## Settings",
        "",
        *[f"- {key}: {_markdown_value(value)}" for key, value in settings_record(config).items()],
        "",
        "## Plots",
        "",
        *[f"![{name}]({name})" for name in plots],
        "",
    ]
    (config.out / "results.md").write_text("\n".join(lines))


def _markdown_value(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{key}: {_markdown_value(item)}" for key, item in value.items())
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _batch_size(text: str) -> int:
    return parsed(int, text, "a batch size of at least 2 (BatchNorm cannot train on one sample)", lambda v: v >= 2)
