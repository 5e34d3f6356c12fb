"""Which values of a torch.fx graph are provably non-negative (>= 0 or NaN, never < 0).

convert() uses it to choose each EquiNorm layer's statistic: the paper's "mean" where the layer's
input is provably non-negative, "abs_mean" (valid for any sign) everywhere else. The analysis is
conservative: a value counts as non-negative only when a rule below proves it, so anything not
recognised (an unknown module or function, a constant, the model input unless the caller vouches
for it) counts as possibly signed.

Non-negative sources: ReLU, ReLU6, Hardtanh with min_val >= 0, Sigmoid, Hardsigmoid, Softplus,
Softmax (modules, functions and tensor methods), clamp with a minimum >= 0, and norm layers with
their activation inside (a BatchNorm subclass with an ``act`` module) when that activation is one of
these. Operations that keep non-negativity when all their tensor operands are non-negative (and
their numeric operands >= 0): pooling, concatenation, addition, multiplication, division by a
positive number, mean and sum, dropout, identity, and reshaping or indexing ops.
"""
from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

_NON_NEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.Softmax)
_PRESERVING_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
)
_NON_NEGATIVE_FUNCTIONS = {
    F.relu, torch.relu, torch.relu_, F.relu_, F.relu6, torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus,
    F.softmax, torch.softmax,
}
# Functions whose result is non-negative when every tensor and number they are given is.
_PRESERVING_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.interpolate, F.pixel_shuffle, F.pixel_unshuffle,
    torch.cat, torch.concat, torch.stack, torch.flatten, torch.reshape, torch.transpose, torch.permute,
    torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, torch.channel_shuffle, torch.mean, torch.sum,
    torch.add, torch.mul, torch.max, torch.maximum, torch.amax, torch.narrow,
    operator.add, operator.iadd, operator.mul, operator.imul, operator.getitem,
}
_NON_NEGATIVE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "softmax", "abs", "abs_"}
# Methods (and functions) whose other arguments are shapes, dims, indices or dtypes, possibly computed
# in the graph from sizes: only the tensor they rearrange or reduce counts.
_SELF_ONLY_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "chunk", "split", "squeeze", "unsqueeze",
    "expand", "expand_as", "view_as", "reshape_as", "mean", "sum", "amax", "narrow", "repeat", "clone", "detach",
    "float", "half", "double", "bfloat16", "to", "type_as",
}
_SELF_ONLY_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.chunk,
    torch.split, torch.channel_shuffle, torch.mean, torch.sum, torch.amax, torch.narrow, operator.getitem,
}
_PRESERVING_METHODS = _SELF_ONLY_METHODS | {"add", "add_", "mul", "mul_", "max"}


def is_norm_with_activation(module: nn.Module) -> bool:
    """A BatchNorm subclass that applies ``drop`` (optional) and then ``act`` after normalising
    (timm's BatchNormAct2d and its relatives)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    drop = getattr(module, "drop", None)
    return (
        isinstance(module, _BatchNorm)
        and isinstance(getattr(module, "act", None), nn.Module)
        and (drop is None or isinstance(drop, nn.Module))
    )


def non_negative_activation(module: nn.Module) -> bool:
    """Whether ``module``'s output is non-negative for any input."""
    if isinstance(module, _NON_NEGATIVE_MODULES):
        return True
    if isinstance(module, nn.Hardtanh):  # ReLU6 is one; any Hardtanh with min_val >= 0 too
        return module.min_val >= 0
    if isinstance(module, nn.Sequential) and len(module) > 0:
        return non_negative_activation(module[-1]) or (
            all(_preserves(m) for m in module[1:]) and non_negative_activation(module[0])
        )
    return False


def _preserves(module: nn.Module) -> bool:
    return isinstance(module, _PRESERVING_MODULES)


def _number_at_least_zero(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _operands_non_negative(node: fx.Node, known: dict[fx.Node, bool]) -> bool:
    """Every tensor operand (graph node) is non-negative, and every numeric operand >= 0."""
    found_node = False
    for value in _flatten(list(node.args) + list(node.kwargs.values())):
        if isinstance(value, fx.Node):
            found_node = True
            if not known.get(value, False):
                return False
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if node.target in (operator.add, operator.iadd, torch.add, "add", "add_", operator.mul, operator.imul,
                               torch.mul, "mul", "mul_") and value < 0:
                return False
    return found_node


def _flatten(values: list) -> list:
    flat = []
    for value in values:
        if isinstance(value, (list, tuple)):
            flat.extend(_flatten(list(value)))
        elif isinstance(value, dict):
            flat.extend(_flatten(list(value.values())))
        else:
            flat.append(value)
    return flat


def _clamp_minimum(node: fx.Node) -> object:
    if len(node.args) > 1:
        return node.args[1]
    return node.kwargs.get("min")


def _hardtanh_minimum(node: fx.Node) -> object:
    if len(node.args) > 1:
        return node.args[1]
    return node.kwargs.get("min_val", -1.0)


def non_negative_nodes(
    graph: fx.Graph, modules: dict[str, nn.Module], input_non_negative: bool
) -> dict[fx.Node, bool]:
    """For every node of ``graph``: True if its value is provably non-negative."""
    known: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        known[node] = _node_non_negative(node, modules, input_non_negative, known)
    return known


def _node_non_negative(
    node: fx.Node, modules: dict[str, nn.Module], input_non_negative: bool, known: dict[fx.Node, bool]
) -> bool:
    if node.op == "placeholder":
        return input_non_negative
    if node.op == "call_module":
        module = modules.get(node.target)
        if module is None:
            return False
        if is_norm_with_activation(module):
            return non_negative_activation(module.act)
        if non_negative_activation(module):
            return True
        return _preserves(module) and _operands_non_negative(node, known)
    if node.op == "call_function":
        return _function_non_negative(node, known)
    if node.op == "call_method":
        return _method_non_negative(node, known)
    return False


def _function_non_negative(node: fx.Node, known: dict[fx.Node, bool]) -> bool:
    target: Callable = node.target
    if target in _NON_NEGATIVE_FUNCTIONS or target is torch.abs:
        return True
    if target in (F.hardtanh, F.hardtanh_):
        return _number_at_least_zero(_hardtanh_minimum(node))
    if target in (torch.clamp, torch.clip, torch.clamp_min):
        return _number_at_least_zero(_clamp_minimum(node)) or _operands_non_negative(node, known)
    if target in (operator.truediv, torch.div, torch.true_divide):
        divisor = node.args[1] if len(node.args) > 1 else None
        first = node.args[0] if node.args else None
        return (
            isinstance(first, fx.Node) and known.get(first, False)
            and ((isinstance(divisor, (int, float)) and divisor > 0) or (isinstance(divisor, fx.Node) and known.get(divisor, False)))
        )
    if target in _SELF_ONLY_FUNCTIONS:
        return _first_operand_non_negative(node, known)
    if target in _PRESERVING_FUNCTIONS:
        return _operands_non_negative(node, known)
    return False


def _first_operand_non_negative(node: fx.Node, known: dict[fx.Node, bool]) -> bool:
    first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return isinstance(first, fx.Node) and known.get(first, False)


def _method_non_negative(node: fx.Node, known: dict[fx.Node, bool]) -> bool:
    name = node.target
    if name in _NON_NEGATIVE_METHODS:
        return True
    if name in ("clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_"):
        return _number_at_least_zero(_clamp_minimum(node)) or _operands_non_negative(node, known)
    if name in ("div", "div_", "__truediv__"):
        divisor = node.args[1] if len(node.args) > 1 else None
        return known.get(node.args[0], False) and (
            (isinstance(divisor, (int, float)) and divisor > 0) or (isinstance(divisor, fx.Node) and known.get(divisor, False))
        )
    if name in _SELF_ONLY_METHODS:
        return _first_operand_non_negative(node, known)
    if name in _PRESERVING_METHODS:
        return _tensor_operands_non_negative(node, known, check_numbers=True)
    return False


def _tensor_operands_non_negative(node: fx.Node, known: dict[fx.Node, bool], check_numbers: bool) -> bool:
    for value in _flatten(list(node.args) + list(node.kwargs.values())):
        if isinstance(value, fx.Node):
            if not known.get(value, False):
                return False
        elif check_numbers and isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            return False
    return True
