"""Swap the Conv -> BatchNorm and Linear -> BatchNorm1d pairs of a model for EquiNorm layers.

The pairs are found by tracing the model with torch.fx, but the replacement happens in the model's
own module hierarchy: the conv's submodule becomes the EquiNorm layer and the BatchNorm's becomes
``nn.Identity()`` (or, for a norm layer with its activation inside, that activation), so the model
keeps its class, its forward code and the rest of its state. Each layer's statistic follows from
the traced graph (:mod:`equinorm_kernels._non_negative`): "mean" where its input is provably
non-negative, "abs_mean" elsewhere.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.lazy import LazyModuleMixin

from . import _checks
from ._non_negative import is_norm_with_activation, non_negative_nodes
from .layers import (
    ChannelAffine,
    EquiNormConv1d,
    EquiNormConv2d,
    EquiNormConv3d,
    EquiNormLayer,
    EquiNormLinear,
    _check_layer_options,
    balance_signs_,
)

__all__ = ["convert", "ConversionReport", "ConvertedLayer", "LeftInPlace"]

MOMENTUM_FROM_BATCHNORM = "batchnorm"
STATISTIC_FROM_GRAPH = "auto"

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
_ELEMENTWISE_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
)
_ELEMENTWISE_ACTIVATION_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, torch.selu, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softplus,
}
_ELEMENTWISE_ACTIVATION_METHODS = {"relu", "sigmoid", "tanh"}


@dataclass(frozen=True)
class _Pair:
    conv_name: str
    bn_name: str
    # Whether the conv's input is provably non-negative in the traced graph.
    input_non_negative: bool = False
    # The elementwise activation between the conv and the BatchNorm, described; None when adjacent.
    activation: str | None = None


@dataclass(frozen=True)
class LeftInPlace:
    """A batch normalization that convert leaves as it is, and why."""

    where: str
    reason: str


_LeftInPlace = LeftInPlace


@dataclass(frozen=True)
class ConvertedLayer:
    """One Conv -> BatchNorm pair that convert replaced."""

    conv: str  # module path of the conv, now the EquiNorm layer
    norm: str  # module path of the BatchNorm, now nn.Identity() or the activation it applied
    layer: str  # class of the new EquiNorm layer
    statistic: str  # "mean" or "abs_mean"
    why: str  # why that statistic
    kept_activation: str | None = None  # the activation (and drop) a norm-with-activation applied
    # The elementwise activation between the conv and the norm (conv -> activation -> BatchNorm):
    # the conv is normalised before it, and the norm's affine stays after it as a ChannelAffine.
    activation_before_norm: str | None = None


@dataclass
class ConversionReport:
    """What :func:`convert` did: the layers it converted (with their statistic) and what it left.

    ``str(report)`` is a table, one line per BatchNorm.
    """

    converted: list[ConvertedLayer]
    left_in_place: list[LeftInPlace]

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s), left {len(self.left_in_place)} in place"]
        for item in self.converted:
            kept = f", keeps {item.kept_activation}" if item.kept_activation else ""
            if item.activation_before_norm:
                kept += f", the norm read {item.activation_before_norm}'s output: its affine stays after it"
            lines.append(f"  {item.conv} + {item.norm} -> {item.layer}(statistic={item.statistic!r}): {item.why}{kept}")
        for item in self.left_in_place:
            lines.append(f"  left {item.where}: {item.reason}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Options:
    mode: str
    momentum: float | None | str
    stats_fraction: float
    eps: float
    backend: str
    statistic: str = STATISTIC_FROM_GRAPH


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
    statistic: str = STATISTIC_FROM_GRAPH,
    input_non_negative: bool = False,
    return_report: bool = False,
) -> Union[nn.Module, tuple[nn.Module, ConversionReport]]:
    """Replace every Conv -> BatchNorm pair of ``model`` with the matching EquiNorm layer.

    A pair is an ``nn.Conv1d/2d/3d`` whose output feeds only an ``nn.BatchNorm1d/2d/3d`` of the same
    dimensionality, or an ``nn.Linear`` feeding only an ``nn.BatchNorm1d``, each module called exactly
    once in ``forward``. The conv's submodule becomes an :class:`EquiNormConv1d`/``2d``/``3d`` or
    :class:`EquiNormLinear` with the conv's hyperparameters, device and dtype; the BatchNorm's
    becomes ``nn.Identity()``. The model's class, forward code and other state are untouched.

    A BatchNorm that normalises an elementwise activation of a conv's output (conv -> GELU ->
    BatchNorm, as in ConvMixer) is converted too: the conv becomes the EquiNorm layer (identity
    gain and bias, so it normalises what the activation reads), the activation stays, and the
    BatchNorm becomes a :class:`equinorm_kernels.ChannelAffine` holding its weight and bias.

    Norm layers with their activation inside, BatchNorm subclasses with an ``act`` module applied
    after normalising (and an optional ``drop`` module before it; timm's ``BatchNormAct2d``), are
    converted too: their submodule becomes ``nn.Sequential(drop, act)``, so the activation stays.

    Each layer's statistic (see :class:`equinorm_kernels.EquiNormConv2d`) is chosen from the traced
    graph when ``statistic="auto"``: "mean" (the paper's) where the conv's input is provably
    non-negative (a ReLU, ReLU6, Hardtanh with min >= 0, Sigmoid or Softmax output, or pooling,
    concatenation, addition, multiplication, dropout or reshaping of such values; the model input
    only with ``input_non_negative=True``), "abs_mean" (valid for any sign) everywhere else. When
    ``torch.fx`` cannot trace the model, its submodules are traced one by one and convs whose input
    cannot be followed get "abs_mean".

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
        statistic: "auto" (default: per layer, from the graph), or "mean" / "abs_mean" for every layer.
        input_non_negative: the model's input is non-negative (raw pixels in [0, 1], for example);
            only then can a layer reading it directly get "mean".
        return_report: also return a :class:`ConversionReport`.

    Returns:
        The converted model: ``model`` itself when ``inplace``, else a converted deep copy; with
        ``return_report``, ``(model, report)``.

    Raises:
        TypeError / ValueError: bad arguments.
        ValueError: with ``strict=True``, some batch normalization cannot be converted (then nothing
            is changed).

    Warns:
        UserWarning: one warning listing every batch normalization left in place, with its module
            path and the reason: a BatchNorm module whose input is not a conv/linear output, whose
            conv's output is also used elsewhere, that (or whose conv) is called more than once,
            whose dimensionality does not match its conv's, whose conv has a single weight per
            output channel (a depthwise 1x1 conv, say), and every functional ``batch_norm`` call.

    Limitations: ``nn.Linear`` -> ``nn.BatchNorm1d`` is assumed to see (N, features) inputs (on
    (N, L, features) inputs BatchNorm1d normalises dim 1, EquiNormLinear's channels are the last
    dim); forward hooks on the conv or BatchNorm (weight_norm, for example) block the conversion;
    only the exact classes above (and BatchNorm subclasses with an ``act`` module) are converted, not
    other subclasses or relatives (SyncBatchNorm, QAT or parametrized convs, lazy modules before
    their first forward); a BatchNorm with
    ``track_running_stats=False`` (batch statistics in eval too) is left in place, since an EquiNorm
    layer normalises with its running mean in eval.
    """
    options = _check_arguments(model, mode, momentum, stats_fraction, eps, backend, inplace, strict, statistic)
    for flag, name in ((input_non_negative, "input_non_negative"), (return_report, "return_report")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    pairs, left_in_place = _plan_traceable(model, model, "", input_non_negative)
    if left_in_place:
        _report(left_in_place, strict)
    if not inplace:
        model = _deep_copy(model)
    converted = [_replace_pair(model, pair, options) for pair in pairs]
    if return_report:
        return model, ConversionReport(converted, left_in_place)
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
    statistic: object = STATISTIC_FROM_GRAPH,
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
    if statistic != STATISTIC_FROM_GRAPH:
        try:
            _checks.check_statistic(statistic)
        except ValueError:
            raise ValueError(
                f'statistic must be "auto" (chosen per layer from the graph), "mean" or "abs_mean", got {statistic!r}'
            ) from None
    return _Options(mode, momentum, float(stats_fraction), float(eps), backend, statistic)


class _PairTracer(fx.Tracer):
    """Records convs, linears, batch norms and EquiNorm layers (subclasses too) as single calls.

    Subclasses are leaves so that they are reported by name instead of being traced into.
    """

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, (EquiNormLayer, _ConvNd, nn.Linear, _BatchNorm)):
            return True
        return super().is_leaf_module(module, qualified_name)


def _trace(model: nn.Module) -> fx.Graph | str:
    """The traced graph of ``model``, or why torch.fx cannot trace it."""
    if isinstance(model, torch.jit.ScriptModule):
        return "TorchScript modules cannot be traced (convert the eager model, then script it)"
    try:
        return _PairTracer().trace(model)
    except Exception as err:
        return f"torch.fx could not trace {type(model).__name__}: {type(err).__name__}: {err}"


def _plan_traceable(
    root: nn.Module, module: nn.Module, prefix: str, input_non_negative: bool
) -> tuple[list[_Pair], list[_LeftInPlace]]:
    """The pairs inside ``module`` (at path ``prefix`` of ``root``) from its traced graph; when it
    cannot be traced, from its children's graphs, each child's input counted as signed."""
    graph = _trace(module)
    if isinstance(graph, fx.Graph):
        return _plan(module, graph, prefix, input_non_negative)
    pairs, left_in_place = [], []
    for child_name, child in module.named_children():
        path = f"{prefix}.{child_name}" if prefix else child_name
        if isinstance(child, _BatchNorm):
            left_in_place.append(
                _LeftInPlace(f"`{path}` ({type(child).__name__})", f"its parent could not be traced ({graph})")
            )
        elif not isinstance(child, (_ConvNd, nn.Linear, EquiNormLayer)):
            child_pairs, child_left = _plan_traceable(root, child, path, False)
            pairs += child_pairs
            left_in_place += child_left
    return pairs, left_in_place


def _deep_copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as err:
        raise ValueError(
            f"convert(inplace=False) converts a deep copy of the model, but copying {type(model).__name__} "
            f"failed with {type(err).__name__}: {err}; pass inplace=True to convert the model itself"
        ) from err


# --- finding the pairs ------------------------------------------------------------------------
def _plan(
    model: nn.Module, graph: fx.Graph, prefix: str = "", input_non_negative: bool = False
) -> tuple[list[_Pair], list[_LeftInPlace]]:
    modules = dict(model.named_modules())
    non_negative = non_negative_nodes(graph, modules, input_non_negative)
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
        path = f"{prefix}.{name}" if prefix else name
        found = _match_pair(name, module, modules, calls, read_attributes)
        if isinstance(found, _Pair):
            conv_input = calls[found.conv_name][0].args[0] if calls[found.conv_name][0].args else None
            from_input = isinstance(conv_input, fx.Node) and non_negative.get(conv_input, False)
            pairs.append(_Pair(_join(prefix, found.conv_name), path, from_input, found.activation))
        else:
            left_in_place.append(_LeftInPlace(f"`{path}` ({type(module).__name__})", found))
    left_in_place.extend(_functional_batch_norms(graph))
    return pairs, left_in_place


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _plain_batchnorm_class(bn: nn.Module) -> type[nn.Module] | None:
    """nn.BatchNorm1d/2d/3d for a plain one or a norm layer with its activation inside, else None."""
    if type(bn) in _PLAIN_BATCHNORMS:
        return type(bn)
    if is_norm_with_activation(bn):
        return next((cls for cls in _PLAIN_BATCHNORMS if isinstance(bn, cls)), None)
    return None


def _match_pair(
    bn_name: str,
    bn: nn.Module,
    modules: dict[str, nn.Module],
    calls: dict[str, list[fx.Node]],
    read_attributes: list[str],
) -> _Pair | str:
    """The pair ending in BatchNorm ``bn_name``, or why there is none."""
    if _plain_batchnorm_class(bn) is None:
        return (
            f"only nn.BatchNorm1d/2d/3d and their subclasses with an `act` module (a norm with its activation "
            f"inside) are converted, not {type(bn).__name__}{_lazy_hint(bn)}"
        )
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
    consumer, activation = bn_node, None
    if not _is_convertible_conv_call(source, modules) and _is_elementwise_activation(source, modules):
        activation_input = source.args[0] if source.args else source.kwargs.get("input")
        if _is_convertible_conv_call(activation_input, modules) and list(source.users) == [bn_node]:
            consumer, activation = source, _describe(source, modules)
            source = activation_input
    if not _is_convertible_conv_call(source, modules):
        return (
            f"its input is {_describe(source, modules)}, not the output of an nn.Conv1d/2d/3d or nn.Linear "
            f"module{_subclass_hint(source, modules)} (or an elementwise activation of one used only by it)"
        )
    conv_name = source.target
    conv = modules[conv_name]
    problem = _conv_problem(conv_name, conv, bn, source, consumer, modules, calls)
    if problem is None:
        problem = _module_state_problem((conv_name, conv), (bn_name, bn), read_attributes)
    return _Pair(conv_name, bn_name, activation=activation) if problem is None else problem


def _conv_problem(
    conv_name: str,
    conv: nn.Module,
    bn: nn.Module,
    conv_node: fx.Node,
    consumer: fx.Node,
    modules: dict[str, nn.Module],
    calls: dict[str, list[fx.Node]],
) -> str | None:
    expected_bn = _MATCHING_BATCHNORM[type(conv)]
    if _plain_batchnorm_class(bn) is not expected_bn:
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
    other_users = [user for user in conv_node.users if user is not consumer]
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


def _is_elementwise_activation(node: object, modules: dict[str, nn.Module]) -> bool:
    """An activation applied to each value on its own, so its output channels are its input's."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _ELEMENTWISE_ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in _ELEMENTWISE_ACTIVATION_METHODS


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
def _replace_pair(model: nn.Module, pair: _Pair, options: _Options) -> ConvertedLayer:
    conv = model.get_submodule(pair.conv_name)
    bn = model.get_submodule(pair.bn_name)
    statistic, why = _statistic_for(pair, options)
    layer = _equinorm_layer(conv, bn, options, statistic, takes_norm_affine=pair.activation is None)
    _replace_everywhere(model, conv, layer)
    after = _what_the_norm_applied_after(bn)
    kept = None if isinstance(after, nn.Identity) else repr(after).replace("\n", "").replace("  ", " ")
    if pair.activation is not None and bn.affine:
        after = nn.Sequential(_norm_affine(bn), after) if kept else _norm_affine(bn)
    _replace_everywhere(model, bn, after.train(bn.training))
    return ConvertedLayer(pair.conv_name, pair.bn_name, type(layer).__name__, statistic, why, kept, pair.activation)


def _norm_affine(bn: nn.Module) -> ChannelAffine:
    affine = ChannelAffine(bn.num_features, device=bn.weight.device, dtype=bn.weight.dtype)
    _take_affine(affine.weight, affine.bias, bn)
    return affine


@torch.no_grad()
def _take_affine(scale: nn.Parameter, shift: nn.Parameter, bn: nn.Module) -> None:
    """The affine BatchNorm ``bn``'s weight and bias, values and requires_grad, into scale and shift."""
    scale.copy_(bn.weight)
    shift.copy_(bn.bias)
    scale.requires_grad_(bn.weight.requires_grad)
    shift.requires_grad_(bn.bias.requires_grad)


def _statistic_for(pair: _Pair, options: _Options) -> tuple[str, str]:
    if options.statistic != STATISTIC_FROM_GRAPH:
        return options.statistic, "as asked"
    if pair.input_non_negative:
        return "mean", "its input is non-negative in the traced graph"
    return "abs_mean", "its input may be negative (or the graph does not show that it cannot be)"


def _what_the_norm_applied_after(bn: nn.Module) -> nn.Module:
    """nn.Identity() for a plain BatchNorm; nn.Sequential(drop, act) for a norm with its activation."""
    if not is_norm_with_activation(bn):
        return nn.Identity()
    drop = getattr(bn, "drop", None)
    parts = [m for m in (drop, bn.act) if m is not None and not isinstance(m, nn.Identity)]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


def _replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    # The trace names a module by its first name only, but forward may call it through another
    # attribute that holds the same module: every name must see the replacement.
    names = [name for name, module in model.named_modules(remove_duplicate=False) if module is old]
    for name in names:
        model.set_submodule(name, new)


def _equinorm_layer(
    conv: nn.Module, bn: nn.Module, options: _Options, statistic: str, takes_norm_affine: bool
) -> EquiNormLayer:
    momentum = bn.momentum if options.momentum == MOMENTUM_FROM_BATCHNORM else options.momentum
    layer_options = dict(
        statistic=statistic,
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
    _copy_parameters(layer, conv, bn if takes_norm_affine else None)
    return layer.train(conv.training)


@torch.no_grad()
def _copy_parameters(layer: EquiNormLayer, conv: nn.Module, bn: nn.Module | None) -> None:
    """The conv's weight; the norm's affine as gain and bias (the layer's identity affine when ``bn``
    is None: a norm after an activation keeps its affine there)."""
    # A clone keeps the conv weight's memory format (channels_last models stay channels_last).
    layer.weight = nn.Parameter(balance_signs_(conv.weight.detach().clone()), requires_grad=conv.weight.requires_grad)
    if bn is None:
        return
    if bn.affine:
        _take_affine(layer.gain, layer.bias, bn)
    else:
        # A BatchNorm without affine learns no scale or shift; the identity affine stays frozen to match.
        layer.gain.requires_grad_(False)
        layer.bias.requires_grad_(False)
