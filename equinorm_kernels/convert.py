"""Swap the Conv -> BatchNorm and Linear -> BatchNorm1d pairs of a model for EquiNorm layers.

The pairs are found by tracing the model with torch.fx, but the replacement happens in the model's
own module hierarchy: the conv's submodule becomes the EquiNorm layer and the BatchNorm's becomes
``nn.Identity()``, so the model keeps its class, its forward code and the rest of its state.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.lazy import LazyModuleMixin

from .layers import (
    EquiNormConv1d,
    EquiNormConv2d,
    EquiNormConv3d,
    EquiNormLayer,
    EquiNormLinear,
    _check_layer_options,
    balance_signs_,
)

__all__ = ["convert"]

MOMENTUM_FROM_BATCHNORM = "batchnorm"

_EQUINORM_CLASS: dict[type[nn.Module], type[EquiNormLayer]] = {
    nn.Conv1d: EquiNormConv1d,
    nn.Conv2d: EquiNormConv2d,
    nn.Conv3d: EquiNormConv3d,
    nn.Linear: EquiNormLinear,
}
_MATCHING_BATCHNORM: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
    nn.Linear: nn.BatchNorm1d,
}
_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FUNCTIONAL_BATCH_NORMS = (F.batch_norm, torch.batch_norm, torch.native_batch_norm)


@dataclass(frozen=True)
class _Pair:
    conv_name: str
    bn_name: str


@dataclass(frozen=True)
class _LeftInPlace:
    """A batch normalization that convert leaves as it is, and why."""

    where: str
    reason: str


@dataclass(frozen=True)
class _Options:
    mode: str
    momentum: float | None | str
    stats_fraction: float
    eps: float
    backend: str


def convert(
    model: nn.Module,
    *,
    mode: str = "single_pass",
    momentum: float | None | Literal["batchnorm"] = MOMENTUM_FROM_BATCHNORM,
    stats_fraction: float = 1.0,
    eps: float = 1e-5,
    backend: str = "auto",
    inplace: bool = False,
    strict: bool = False,
) -> nn.Module:
    """Replace every Conv -> BatchNorm pair of ``model`` with the matching EquiNorm layer.

    A pair is an ``nn.Conv1d/2d/3d`` whose output feeds only an ``nn.BatchNorm1d/2d/3d`` of the same
    dimensionality, or an ``nn.Linear`` feeding only an ``nn.BatchNorm1d``, each module called exactly
    once in ``forward``. The conv's submodule becomes an :class:`EquiNormConv1d`/``2d``/``3d`` or
    :class:`EquiNormLinear` with the conv's hyperparameters, device and dtype; the BatchNorm's
    becomes ``nn.Identity()``. The model's class, forward code and other state are untouched.

    The new layer's ``weight`` is the conv's, with the signs of one-signed output channels resampled
    (:func:`equinorm_kernels.layers.balance_signs_`, which uses the global RNG); ``gain`` and
    ``bias`` are the BatchNorm's weight and bias (1 and 0, frozen, when it is not affine); the conv's
    own bias is dropped, since the BatchNorm cancelled it. ``running_mean`` starts at ones: the
    BatchNorm's running statistics describe the conv's output, EquiNorm's the conv's input, so nothing
    carries over. The converted model is not numerically equivalent to the original: train or
    fine-tune it, and run training-mode forwards before evaluating it. Each layer keeps its conv's
    training/eval mode and ``requires_grad`` flags.

    Args:
        model: an ``nn.Module`` that ``torch.fx`` can trace symbolically.
        mode, stats_fraction, eps, backend: the EquiNorm layers' options (see
            :class:`equinorm_kernels.EquiNormConv2d`).
        momentum: running-mean update factor; ``"batchnorm"`` (default) takes each BatchNorm's own
            momentum (None there means a cumulative average, as in BatchNorm).
        inplace: modify ``model`` itself instead of a deep copy.
        strict: raise instead of warning when a batch normalization cannot be converted.

    Returns:
        The converted model: ``model`` itself when ``inplace``, else a converted deep copy.

    Raises:
        TypeError / ValueError: bad arguments.
        ValueError: ``torch.fx`` cannot trace ``model`` (data-dependent control flow, for example);
            or, with ``strict=True``, some batch normalization cannot be converted (then nothing is
            changed).

    Warns:
        UserWarning: one warning listing every batch normalization left in place, with its module
            path and the reason: a BatchNorm module whose input is not a conv/linear output, whose
            conv's output is also used elsewhere, that (or whose conv) is called more than once,
            whose dimensionality does not match its conv's, whose conv has a single weight per
            output channel (a depthwise 1x1 conv, say), and every functional ``batch_norm`` call.

    Limitations: ``nn.Linear`` -> ``nn.BatchNorm1d`` is assumed to see (N, features) inputs (on
    (N, L, features) inputs BatchNorm1d normalises dim 1, EquiNormLinear's channels are the last
    dim); forward hooks on the conv or BatchNorm (weight_norm, for example) block the conversion;
    only the exact classes above are converted, not subclasses or relatives (SyncBatchNorm, QAT or
    parametrized convs, lazy modules before their first forward); a BatchNorm with
    ``track_running_stats=False`` (batch statistics in eval too) is left in place, since an EquiNorm
    layer normalises with its running mean in eval.
    """
    options = _check_arguments(model, mode, momentum, stats_fraction, eps, backend, inplace, strict)
    graph = _trace(model)
    pairs, left_in_place = _plan(model, graph)
    if left_in_place:
        _report(left_in_place, strict)
    if not inplace:
        model = _deep_copy(model)
    for pair in pairs:
        _replace_pair(model, pair, options)
    return model


# --- arguments and tracing --------------------------------------------------------------------
def _check_arguments(
    model: object,
    mode: object,
    momentum: object,
    stats_fraction: object,
    eps: object,
    backend: object,
    inplace: object,
    strict: object,
) -> _Options:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for flag, name in ((inplace, "inplace"), (strict, "strict")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if isinstance(momentum, str) and momentum != MOMENTUM_FROM_BATCHNORM:
        raise ValueError(
            f"momentum must be a number in [0, 1], None (cumulative average) or {MOMENTUM_FROM_BATCHNORM!r} "
            f"(each BatchNorm's own momentum), got {momentum!r}"
        )
    # Validated here, not only by the layer constructors, so a bad option fails even when no pair is found.
    explicit_momentum = None if momentum == MOMENTUM_FROM_BATCHNORM else momentum
    _check_layer_options(mode, explicit_momentum, stats_fraction, eps, backend)
    return _Options(mode, momentum, float(stats_fraction), float(eps), backend)


class _PairTracer(fx.Tracer):
    """Records convs, linears, batch norms and EquiNorm layers (subclasses too) as single calls.

    Subclasses are leaves so that they are reported by name instead of being traced into.
    """

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, (EquiNormLayer, _ConvNd, nn.Linear, _BatchNorm)):
            return True
        return super().is_leaf_module(module, qualified_name)


def _trace(model: nn.Module) -> fx.Graph:
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(
            "convert needs a model that torch.fx can trace; TorchScript modules cannot be traced: "
            "convert the eager model, then script it"
        )
    try:
        return _PairTracer().trace(model)
    except Exception as err:
        raise ValueError(
            f"convert needs a model that torch.fx can trace symbolically (no Python control flow on tensor "
            f"values, no calls torch.fx cannot record): tracing {type(model).__name__} failed with "
            f"{type(err).__name__}: {err}"
        ) from err


def _deep_copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as err:
        raise ValueError(
            f"convert(inplace=False) converts a deep copy of the model, but copying {type(model).__name__} "
            f"failed with {type(err).__name__}: {err}; pass inplace=True to convert the model itself"
        ) from err


# --- finding the pairs ------------------------------------------------------------------------
def _plan(model: nn.Module, graph: fx.Graph) -> tuple[list[_Pair], list[_LeftInPlace]]:
    modules = dict(model.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    read_attributes: list[str] = []
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
        elif node.op == "get_attr":
            read_attributes.append(node.target)

    pairs, left_in_place = [], []
    for name, module in modules.items():
        if not name or not isinstance(module, _BatchNorm):
            continue
        found = _match_pair(name, module, modules, calls, read_attributes)
        if isinstance(found, _Pair):
            pairs.append(found)
        else:
            left_in_place.append(_LeftInPlace(f"`{name}` ({type(module).__name__})", found))
    left_in_place.extend(_functional_batch_norms(graph))
    return pairs, left_in_place


def _match_pair(
    bn_name: str,
    bn: nn.Module,
    modules: dict[str, nn.Module],
    calls: dict[str, list[fx.Node]],
    read_attributes: list[str],
) -> _Pair | str:
    """The pair ending in BatchNorm ``bn_name``, or why there is none."""
    if type(bn) not in _PLAIN_BATCHNORMS:
        return f"only plain nn.BatchNorm1d/2d/3d are converted, not {type(bn).__name__}{_lazy_hint(bn)}"
    if not bn.track_running_stats:
        return (
            "it has track_running_stats=False (batch statistics in eval too), while an EquiNorm layer "
            "normalises with its running mean in eval"
        )
    bn_calls = calls.get(bn_name, [])
    if len(bn_calls) != 1:
        return _call_count_reason("it", len(bn_calls))
    bn_node = bn_calls[0]
    source = bn_node.args[0] if bn_node.args else bn_node.kwargs.get("input")
    if not _is_convertible_conv_call(source, modules):
        return (
            f"its input is {_describe(source, modules)}, not the output of an nn.Conv1d/2d/3d or nn.Linear "
            f"module{_subclass_hint(source, modules)}"
        )
    conv_name = source.target
    conv = modules[conv_name]
    problem = _conv_problem(conv_name, conv, bn, source, bn_node, modules, calls)
    if problem is None:
        problem = _module_state_problem((conv_name, conv), (bn_name, bn), read_attributes)
    return _Pair(conv_name, bn_name) if problem is None else problem


def _conv_problem(
    conv_name: str,
    conv: nn.Module,
    bn: nn.Module,
    conv_node: fx.Node,
    bn_node: fx.Node,
    modules: dict[str, nn.Module],
    calls: dict[str, list[fx.Node]],
) -> str | None:
    expected_bn = _MATCHING_BATCHNORM[type(conv)]
    if type(bn) is not expected_bn:
        return (
            f"it follows `{conv_name}` ({type(conv).__name__}), whose output needs {expected_bn.__name__}, "
            f"not {type(bn).__name__}"
        )
    out_channels = conv.weight.shape[0]
    if bn.num_features != out_channels:
        return f"it has {bn.num_features} features but `{conv_name}` has {out_channels} output channels"
    conv_calls = len(calls[conv_name])
    if conv_calls != 1:
        return _call_count_reason(f"its input `{conv_name}`", conv_calls)
    other_users = [user for user in conv_node.users if user is not bn_node]
    if other_users:
        described = ", ".join(_describe(user, modules) for user in other_users)
        return f"the output of `{conv_name}` is also used by {described}"
    if conv.weight[0].numel() < 2:
        return (
            f"`{conv_name}` has a single weight per output channel (weight shape {tuple(conv.weight.shape)}), "
            f"and EquiNorm needs at least two to balance against each other"
        )
    return None


def _module_state_problem(
    conv: tuple[str, nn.Module], bn: tuple[str, nn.Module], read_attributes: list[str]
) -> str | None:
    for name, module in (conv, bn):
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
            return f"`{name}` has hooks (weight_norm, for example), which the replacement would drop"
        read_directly = [attribute for attribute in read_attributes if attribute.startswith(name + ".")]
        if read_directly:
            return f"forward reads `{read_directly[0]}` directly, which the replacement would change"
    return None


def _is_convertible_conv_call(node: object, modules: dict[str, nn.Module]) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and type(modules.get(node.target)) in _EQUINORM_CLASS
    )


def _functional_batch_norms(graph: fx.Graph) -> list[_LeftInPlace]:
    found = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _FUNCTIONAL_BATCH_NORMS:
            found.append(
                _LeftInPlace(
                    f"{_function_name(node.target)}(...) (graph node `{node.name}`) in {_caller(node)}",
                    "functional calls are not converted; use an nn.BatchNorm module right after the conv",
                )
            )
    return found


# --- describing what was found ----------------------------------------------------------------
def _call_count_reason(subject: str, count: int) -> str:
    if count == 0:
        return f"{subject} is never called in the traced forward"
    return f"{subject} is called {count} times in forward; a module called more than once is not converted"


def _describe(node: object, modules: dict[str, nn.Module]) -> str:
    if not isinstance(node, fx.Node):
        return f"the constant {node!r}"
    if node.op == "placeholder":
        return f"the model input `{node.target}`"
    if node.op == "call_module":
        return f"`{node.target}` ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return f"{_function_name(node.target)}(...)"
    if node.op == "call_method":
        return f"the tensor method .{node.target}(...)"
    if node.op == "get_attr":
        return f"the attribute `{node.target}`"
    return f"the graph {node.op}"


def _function_name(function: object) -> str:
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", None)
    if name is None:
        return repr(function)
    module = getattr(function, "__module__", None)
    # operator's functions report their C implementation's module, "_operator".
    if module == "_operator":
        module = "operator"
    return f"{module}.{name}" if module else name


def _caller(node: fx.Node) -> str:
    module_stack = node.meta.get("nn_module_stack")
    if not module_stack:
        return "the model's own forward"
    path, (_, module_type) = next(reversed(module_stack.items()))
    return f"`{path}` ({getattr(module_type, '__name__', module_type)})"


def _lazy_hint(module: nn.Module) -> str:
    if isinstance(module, LazyModuleMixin):
        return " (a lazy module: run one forward pass first to initialise it)"
    return ""


def _subclass_hint(node: object, modules: dict[str, nn.Module]) -> str:
    if not (isinstance(node, fx.Node) and node.op == "call_module"):
        return ""
    module = modules[node.target]
    if isinstance(module, EquiNormLayer):
        return " (it is an EquiNorm layer already)"
    plain = next((cls for cls in _EQUINORM_CLASS if isinstance(module, cls)), None)
    if plain is None:
        return ""
    return f" (only the plain class is converted, not subclasses of nn.{plain.__name__}){_lazy_hint(module)}"


def _report(left_in_place: list[_LeftInPlace], strict: bool) -> None:
    listing = "\n".join(f"  - {item.where}: {item.reason}" for item in left_in_place)
    count = len(left_in_place)
    if strict:
        raise ValueError(
            f"convert(strict=True): {count} batch normalization(s) cannot be converted to EquiNorm, so the "
            f"model was left unchanged:\n{listing}\nPass strict=False to convert the others and keep these."
        )
    warnings.warn(
        f"convert: {count} batch normalization(s) stay as they are (not converted to EquiNorm):\n{listing}",
        UserWarning,
        stacklevel=3,
    )


# --- replacing --------------------------------------------------------------------------------
def _replace_pair(model: nn.Module, pair: _Pair, options: _Options) -> None:
    conv = model.get_submodule(pair.conv_name)
    bn = model.get_submodule(pair.bn_name)
    _replace_everywhere(model, conv, _equinorm_layer(conv, bn, options))
    _replace_everywhere(model, bn, nn.Identity().train(bn.training))


def _replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    # The trace names a module by its first name only, but forward may call it through another
    # attribute that holds the same module: every name must see the replacement.
    names = [name for name, module in model.named_modules(remove_duplicate=False) if module is old]
    for name in names:
        model.set_submodule(name, new)


def _equinorm_layer(conv: nn.Module, bn: nn.Module, options: _Options) -> EquiNormLayer:
    momentum = bn.momentum if options.momentum == MOMENTUM_FROM_BATCHNORM else options.momentum
    layer_options = dict(
        mode=options.mode,
        momentum=momentum,
        stats_fraction=options.stats_fraction,
        eps=options.eps,
        backend=options.backend,
    )
    factory = dict(device=conv.weight.device, dtype=conv.weight.dtype)
    if isinstance(conv, nn.Linear):
        layer = EquiNormLinear(conv.in_features, conv.out_features, True, **factory, **layer_options)
    else:
        layer = _EQUINORM_CLASS[type(conv)](
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            True,
            conv.padding_mode,
            **factory,
            **layer_options,
        )
    _copy_parameters(layer, conv, bn)
    return layer.train(conv.training)


@torch.no_grad()
def _copy_parameters(layer: EquiNormLayer, conv: nn.Module, bn: nn.Module) -> None:
    # A clone keeps the conv weight's memory format (channels_last models stay channels_last).
    layer.weight = nn.Parameter(balance_signs_(conv.weight.detach().clone()), requires_grad=conv.weight.requires_grad)
    if bn.affine:
        layer.gain.copy_(bn.weight)
        layer.bias.copy_(bn.bias)
        layer.gain.requires_grad_(bn.weight.requires_grad)
        layer.bias.requires_grad_(bn.bias.requires_grad)
    else:
        # A BatchNorm without affine learns no scale or shift; the identity affine stays frozen to match.
        layer.gain.requires_grad_(False)
        layer.bias.requires_grad_(False)
