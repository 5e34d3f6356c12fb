"""Small networks shared by the tests (tiny shapes keep the suite fast)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(widths: tuple[int, ...] = (6, 8, 7, 3), bias: bool = True) -> nn.Sequential:
    """Linear/ReLU chain; the last Linear has no activation after it."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out, bias=bias))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Convs with max/avg pooling, a flatten into a Linear and functional activations.

    Input (N, 3, 8, 8).
    """

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=bias)
        self.fc1 = nn.Linear(6 * 2 * 2, 5, bias=bias)
        self.fc2 = nn.Linear(5, 3, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.conv1(x)))
        x = F.avg_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: identity skip, or a strided 1x1 conv when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: str = "none") -> None:
        super().__init__()
        with_bn = norm == "batch"
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=not with_bn)
        self.bn1 = nn.BatchNorm2d(planes) if with_bn else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=not with_bn)
        self.bn2 = nn.BatchNorm2d(planes) if with_bn else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            layers: list[nn.Module] = [nn.Conv2d(in_planes, planes, 1, stride, bias=not with_bn)]
            if with_bn:
                layers.append(nn.BatchNorm2d(planes))
            self.shortcut = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class SmallResNet(nn.Module):
    """Stem conv, two stages of basic blocks (identity and 1x1-conv skips), pooled classifier.

    Input (N, 3, 8, 8). ``norm`` is "none" or "batch".
    """

    def __init__(self, widths: tuple[int, int] = (4, 6), num_classes: int = 3, norm: str = "none") -> None:
        super().__init__()
        with_bn = norm == "batch"
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1, bias=not with_bn)
        self.stem_bn = nn.BatchNorm2d(widths[0]) if with_bn else nn.Identity()
        self.layer1 = nn.Sequential(BasicBlock(widths[0], widths[0], 1, norm), BasicBlock(widths[0], widths[0], 1, norm))
        self.layer2 = nn.Sequential(BasicBlock(widths[0], widths[1], 2, norm), BasicBlock(widths[1], widths[1], 1, norm))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class PartlyConvertibleNet(nn.Module):
    """One convertible Conv -> BatchNorm pair, then batch norms that cannot be converted: two fed by
    one conv output, one after an add, one after a ReLU, one after a depthwise 1x1 conv (one weight
    per output channel), and a functional batch_norm.

    Input (N, 3, 6, 6), non-negative.
    """

    def __init__(self) -> None:
        super().__init__()
        self.convertible = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.convertible_bn = nn.BatchNorm2d(4)
        self.shared = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.shared_bn_a = nn.BatchNorm2d(4)
        self.shared_bn_b = nn.BatchNorm2d(4)
        self.after_add_bn = nn.BatchNorm2d(4)
        self.after_relu_bn = nn.BatchNorm2d(4)
        self.depthwise = nn.Conv2d(4, 4, 1, groups=4, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.convertible_bn(self.convertible(x)))
        shared = self.shared(x)
        summed = self.shared_bn_a(shared) + self.shared_bn_b(shared)
        x = self.after_relu_bn(F.relu(self.after_add_bn(summed)))
        x = F.relu(self.depthwise_bn(self.depthwise(F.relu(x))))
        return F.batch_norm(x, None, None, training=True)


class ReusedModulesNet(nn.Module):
    """A conv called twice (each call followed by its own BatchNorm) and a BatchNorm called twice
    (after two different convs). Input (N, 3, 6, 6), non-negative.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reused_conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.first_bn = nn.BatchNorm2d(3)
        self.second_bn = nn.BatchNorm2d(3)
        self.conv_a = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.reused_bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.first_bn(self.reused_conv(x)))
        x = F.relu(self.second_bn(self.reused_conv(x)))
        x = F.relu(self.reused_bn(self.conv_a(x)))
        return self.reused_bn(self.conv_b(x))


class DataDependentNet(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return x


class GroupedConvNet(nn.Module):
    """Grouped and depthwise convolutions (channel multiplier 2), global pooling, classifier.

    Input (N, 4, 6, 6).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(16, 8, 1, groups=4)
        self.pool = nn.AdaptiveMaxPool2d(2)
        self.fc = nn.Linear(8 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.leaky_relu(self.depthwise(x), 0.1)
        x = self.pool(self.grouped(x).relu())
        return self.fc(x.view(x.size(0), -1))


class FunctionalNet(nn.Module):
    """Layers called functionally on bare parameters, dropout, a learnable 1-element scale.

    Input (N, 2, 5, 5); the output is log-probabilities.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv_weight = nn.Parameter(torch.randn(3, 2, 3, 3) * 0.5)
        self.conv_bias = nn.Parameter(torch.randn(3) * 0.1)
        self.scale = nn.Parameter(torch.tensor([1.7]))
        self.hidden = nn.Linear(3 * 3 * 3, 4)
        self.out_weight = nn.Parameter(torch.randn(2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(F.conv2d(x, self.conv_weight, self.conv_bias)) * self.scale
        x = F.dropout(x.reshape(x.shape[0], -1), 0.2, self.training)
        x = F.linear(x, self.hidden.weight, self.hidden.bias).relu_() / 2
        return F.log_softmax(F.linear(x, self.out_weight), dim=1)
