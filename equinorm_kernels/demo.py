"""A one-minute tour: ``python -m equinorm_kernels.demo`` (or ``equinorm-demo``).

1. Trains the same small CNN with BatchNorm and with EquiNorm at batch sizes 2 and 16 on a synthetic
   task (which quadrant of a noisy non-negative image holds a bright blob) and reports test accuracy.
2. Folds the trained EquiNorm layers into plain convolutions and checks the outputs agree.
3. Balances a small ReLU network with ENorm and shows its weight energy falling while its outputs stay put.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import equinorm_kernels as ek


def quadrant_task(samples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples, 1, 12, 12) images in [0, 1] and the index of the quadrant holding a 3x3 blob."""
    images = 0.5 * torch.rand(samples, 1, 12, 12, generator=generator)
    labels = torch.randint(0, 4, (samples,), generator=generator)
    for i, label in enumerate(labels.tolist()):
        row = (label // 2) * 6 + int(torch.randint(0, 4, (1,), generator=generator))
        col = (label % 2) * 6 + int(torch.randint(0, 4, (1,), generator=generator))
        images[i, 0, row : row + 3, col : col + 3] += 0.5
    return images, labels


def small_cnn(norm: str) -> nn.Module:
    def conv(cin: int, cout: int) -> list[nn.Module]:
        if norm == "equinorm":
            return [ek.EquiNormConv2d(cin, cout, 3, padding=1)]
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]

    return nn.Sequential(
        *conv(1, 8), nn.ReLU(), nn.MaxPool2d(2),
        *conv(8, 16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip


def train(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], steps: int, batch: int, seed: int) -> None:
    images, labels = data
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    model.train()
    for step in range(steps):
        index = order[(step * batch) % len(order) :][:batch]
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    images, labels = data
    return (model(images).argmax(dim=1) == labels).float().mean().item()


def compare_normalizations(steps: int) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    train_data, test_data = quadrant_task(2048, generator), quadrant_task(512, generator)
    print(f"[1] {steps} SGD steps (lr 0.05, momentum 0.9), test accuracy on 512 held-out images (chance 25%)")
    for batch in (2, 16):
        for norm in ("batchnorm", "equinorm"):
            torch.manual_seed(0)
            model = small_cnn(norm)
            start = time.perf_counter()
            train(model, train_data, steps, batch=batch, seed=0)
            seconds = time.perf_counter() - start
            print(f"    batch {batch:>2}  {norm:<10} {100 * accuracy(model, test_data):5.1f}%   ({seconds:.1f} s)")
    return model


@torch.no_grad()
def fold_model(model: nn.Module) -> None:
    model.eval()
    folded = nn.Sequential(*(m.fold() if isinstance(m, ek.EquiNormConv2d) else m for m in model))
    x = torch.rand(16, 1, 12, 12)
    error = (folded(x) - model(x)).abs().max().item()
    print(f"[2] fold(): EquiNorm layers -> plain nn.Conv2d, max |difference| of the logits {error:.2e}")


@torch.no_grad()
def balance_with_enorm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip
    with torch.no_grad():  # an unbalanced start: some layers much larger than others
        model[0].weight.mul_(8.0)
        model[6].weight.mul_(0.1)
    x = torch.rand(8, 3, 8, 8)
    before = model(x)
    enorm = ek.ENorm(model)
    energies = [sum(enorm.energy().values())]
    for _ in range(5):
        enorm.step()
        energies.append(sum(enorm.energy().values()))
    cycles = enorm.balance()
    change = (model(x) - before).abs().max().item() / before.abs().max().item()
    trace = " -> ".join(f"{e:.1f}" for e in energies)
    print(f"[3] ENorm: weight energy {trace} over 5 cycles, {sum(enorm.energy().values()):.1f} at the fixed point "
          f"(+{cycles} cycles); outputs changed by {change:.1e} (relative)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="SGD steps per model in part 1")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"equinorm-kernels {ek.__version__}, torch {torch.__version__}, backends on cpu: {ek.available_backends('cpu')}")
    model = compare_normalizations(args.steps)
    fold_model(model)
    balance_with_enorm()


if __name__ == "__main__":
    main()
