"""One training run: a method, a batch size and a seed, trained with SGD and evaluated every epoch."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..enorm import ENorm
from .data import Dataset
from .methods import Method

REFERENCE_BATCH_SIZE = 32
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
FIXUP_SCALAR_LR_FACTOR = 0.1
EVAL_BATCH_SIZE = 512

T = TypeVar("T")


@dataclass(frozen=True)
class TrainingSettings:
    """What every run of an experiment shares.

    The learning rate scales linearly with the batch size: ``lr = base_lr * batch_size / 32``.
    """

    arch: str
    epochs: int
    base_lr: float
    enorm_c: float = 1.0
    momentum: float = MOMENTUM
    weight_decay: float = WEIGHT_DECAY

    def learning_rate(self, batch_size: int) -> float:
        """The SGD learning rate used at ``batch_size``."""
        return self.base_lr * batch_size / REFERENCE_BATCH_SIZE


@dataclass
class RunResult:
    """Curves and bookkeeping of one run; curves hold one value per epoch, NaN after a divergence."""

    method: str
    batch_size: int
    seed: int
    learning_rate: float
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    diverged: bool = False
    diverged_epoch: int | None = None
    optimizer_steps: int = 0
    enorm_cycles: int = 0
    energy_at_init: dict[str, float] | None = None
    energy_after_training: dict[str, float] | None = None

    @property
    def final_test_accuracy(self) -> float:
        return self.test_accuracy[-1] if self.test_accuracy else math.nan

    @property
    def final_test_loss(self) -> float:
        return self.test_loss[-1] if self.test_loss else math.nan

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Diverged(Exception):
    """Training produced a non-finite loss or non-finite weights."""


def train_run(
    method: Method, dataset: Dataset, settings: TrainingSettings, batch_size: int, seed: int, *, progress: bool = True
) -> RunResult:
    """Train a fresh model for ``settings.epochs`` epochs and evaluate it on the test set after each.

    Everything random (initialisation, data order) follows ``seed``. A run whose loss or weights
    become non-finite stops there and is returned with ``diverged=True``.
    """
    torch.manual_seed(seed)
    model = method.build(settings.arch, dataset.in_shape, dataset.num_classes)
    lr = settings.learning_rate(batch_size)
    optimizer = make_optimizer(model, method, lr, settings)
    enorm = ENorm(model, optimizer, c=settings.enorm_c) if method.enorm else None
    result = RunResult(method.name, batch_size, seed, lr)
    if method.enorm_compatible:
        result.energy_at_init = layer_energies(model)
    loop = _TrainingLoop(model, optimizer, enorm, dataset, batch_size, torch.Generator().manual_seed(seed), result)
    start = time.perf_counter()
    label = f"{method.name} b{batch_size} s{seed}"
    for epoch in tqdm(range(settings.epochs), desc=label, unit="epoch", leave=False, disable=not progress):
        if not loop.run_epoch():
            result.diverged, result.diverged_epoch = True, epoch
            break
    result.wall_seconds = time.perf_counter() - start
    _pad_after_divergence(result, settings.epochs)
    if method.enorm_compatible and not result.diverged:
        result.energy_after_training = layer_energies(model)
    return result


def make_optimizer(model: nn.Module, method: Method, lr: float, settings: TrainingSettings) -> torch.optim.SGD:
    """SGD with momentum and weight decay; Fixup's scalar biases and multipliers get a 10x smaller lr."""
    groups: list[dict[str, object]] = [{"params": list(model.parameters())}]
    if method.scheme == "fixup":
        scalars = list(model.fixup_scalars())
        scalar_ids = {id(p) for p in scalars}
        groups = [
            {"params": [p for p in model.parameters() if id(p) not in scalar_ids]},
            {"params": scalars, "lr": lr * FIXUP_SCALAR_LR_FACTOR},
        ]
    return torch.optim.SGD(groups, lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


@dataclass
class _TrainingLoop:
    """The state one run carries from epoch to epoch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    enorm: ENorm | None
    dataset: Dataset
    batch_size: int
    order_generator: torch.Generator
    result: RunResult

    def run_epoch(self) -> bool:
        """Train one epoch, evaluate, append to the curves; False (nothing appended) when the run diverged."""
        start = time.perf_counter()
        try:
            train_loss = self.train_epoch()
            test_loss, test_accuracy = evaluate(self.model, self.dataset)
        except Diverged:
            return False
        if not math.isfinite(test_loss):
            return False
        self.result.train_loss.append(train_loss)
        self.result.test_loss.append(test_loss)
        self.result.test_accuracy.append(test_accuracy)
        self.result.epoch_seconds.append(time.perf_counter() - start)
        return True

    def train_epoch(self) -> float:
        """One pass over the shuffled training set; returns the mean training loss.

        The last incomplete batch is dropped: BatchNorm cannot train on a single sample.
        """
        self.model.train()
        order = torch.randperm(len(self.dataset.train_labels), generator=self.order_generator)
        batches = len(order) // self.batch_size
        if batches == 0:
            raise ValueError(f"batch size {self.batch_size} exceeds the {len(order)} training samples")
        total = 0.0
        for index in order[: batches * self.batch_size].view(batches, self.batch_size):
            total += self.train_step(self.dataset.train_images[index], self.dataset.train_labels[index])
        return total / batches

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One SGD step, then one ENorm cycle when ENorm is on; returns the batch loss."""
        loss = _guarded(lambda: F.cross_entropy(self.model(images), labels), self.model)
        if not torch.isfinite(loss):
            raise Diverged
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.result.optimizer_steps += 1
        if self.enorm is not None:
            _guarded(self.enorm.step, self.model)
            self.result.enorm_cycles += 1
        return loss.item()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on the test set, in eval mode."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(dataset.test_labels), EVAL_BATCH_SIZE):
        images = dataset.test_images[start : start + EVAL_BATCH_SIZE]
        labels = dataset.test_labels[start : start + EVAL_BATCH_SIZE]
        logits = _guarded(lambda: model(images), model)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == labels).sum())
    samples = len(dataset.test_labels)
    return loss_sum / samples, correct / samples


def _guarded(compute: Callable[[], T], model: nn.Module) -> T:
    """Run ``compute``; turn the errors that non-finite values cause into :class:`Diverged`.

    EquiNorm layers refuse NaN/Inf weights and activations with a ValueError instead of returning
    NaN, so a blown-up run can end in an exception rather than a NaN loss. Activations can overflow
    while the weights are still finite, hence the look at the message too.
    """
    try:
        return compute()
    except (ValueError, RuntimeError) as error:
        if _has_non_finite_state(model) or "NaN or Inf" in str(error):
            raise Diverged from error
        raise


def _has_non_finite_state(model: nn.Module) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors)


def layer_energies(model: nn.Module) -> dict[str, float]:
    """ENorm's per-layer energy of ``model``: sum |W|^2 + sum |bias|^2 for every conv/linear layer."""
    return ENorm(model).energy()


def _pad_after_divergence(result: RunResult, epochs: int) -> None:
    for curve in (result.train_loss, result.test_loss, result.test_accuracy, result.epoch_seconds):
        curve.extend([math.nan] * (epochs - len(curve)))


def energy_through_cycles(model: nn.Module, cycles: int, c: float) -> tuple[tuple[str, ...], list[list[float]]]:
    """Per-layer energy of ``model`` before ENorm and after each of ``cycles`` cycles, without training.

    Returns the layer names and one list of energies per state (``cycles + 1`` lists). ``model``
    is rescaled in place.
    """
    enorm = ENorm(model, c=c)
    energies = [list(enorm.energy().values())]
    for _ in range(cycles):
        enorm.step()
        energies.append(list(enorm.energy().values()))
    return enorm.layer_names, energies
