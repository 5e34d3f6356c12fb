"""Discovering ENorm's channel groups by tracing a model with torch.fx.

Every tensor of the traced graph gets a state:

- a *space* (a channel group and where its channels lie): the output of a Linear/Conv (or, with
  ``batchnorm="affine"``, of a BatchNorm), carried unchanged through positively homogeneous,
  channel-preserving ops. Rescaling the group by d multiplies the tensor's channel i by d_i.
- *free*: a tensor ENorm never rescales (the network input, constants, values computed from them).
- *opaque*: the result of an unsupported op applied to a space; it does not scale with d.
- *meta*: sizes, dims and Python numbers.

Layers reading a space are its consumers. A residual add merges the spaces of its operands
(union-find), so all their producers and consumers share one coefficient per channel.

Supported between layers: ReLU/LeakyReLU (modules, F.relu, torch.relu, Tensor.relu, in-place
variants, F.leaky_relu), Identity, Dropout/Dropout1d/2d/3d and their functionals, max/avg/adaptive
pooling (modules and functionals, channels on dim 1 only), flatten from dim 1 (nn.Flatten,
torch.flatten, Tensor.flatten, ``.view/.reshape(x.size(0), -1)``), negation, multiplication or
division by a Python number or a 1-element parameter, additions/subtractions of members of the
group, BatchNorm (``batchnorm="paper"``: transparent), contiguous/clone, and metadata (size, dim,
shape). Anything else applied to a group that has consumers is an error, as is a consumer reading
the result of such an op; on the output space it is fine (e.g. log_softmax of the logits).
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field
from numbers import Number
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .plan import ChannelGroup, Columns, Layer

# Where a space's channels lie in the tensor.
FIRST = "first"  # dim 1 of an (N, C, *spatial) conv output
LAST = "last"  # the last dim of a Linear output
EITHER = "either"  # dim 1 of a tensor that may be 2-D (BatchNorm1d output): both of the above
FLAT = "flat"  # flattened from dim 1: channel i owns S consecutive features
FLAT_LAST = "flat_last"  # a flattened Linear output: only valid when it was 2-D (S = 1)

_LAYOUT_WORDS = {
    FIRST: "on dim 1 (a convolution output)",
    LAST: "on the last dim (a Linear output)",
    EITHER: "on dim 1",
    FLAT: "flattened from dim 1",
    FLAT_LAST: "flattened from a Linear output",
}
_LINEAR_READS = (LAST, EITHER, FLAT, FLAT_LAST)
_CONV_READS = (FIRST, EITHER)
_POOL_READS = (FIRST, EITHER)

SUPPORTED_OPS = (
    "ReLU/LeakyReLU, Identity, Dropout, max/avg/adaptive pooling, flatten from dim 1, "
    "multiplication or division by a Python number or a 1-element parameter, "
    "and additions of tensors of the same channel group"
)

_ACTIVATION_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)  # fmt: skip
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

_ACTIVATION_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu, F.leaky_relu_,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout, operator.neg, torch.neg,
}  # fmt: skip
_ACTIVATION_METHODS = {"relu", "relu_", "neg", "contiguous", "clone"}
# Pooling functionals and the argument index of their return_indices flag (None: no such flag).
_POOL_FUNCTIONS = {
    F.max_pool1d: 6, F.max_pool2d: 6, F.max_pool3d: 6,
    F.adaptive_max_pool1d: 2, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 2,
    F.avg_pool1d: None, F.avg_pool2d: None, F.avg_pool3d: None,
    F.adaptive_avg_pool1d: None, F.adaptive_avg_pool2d: None, F.adaptive_avg_pool3d: None,
}  # fmt: skip
_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_DIV_FUNCTIONS = {operator.truediv, operator.itruediv, torch.div}
_MUL_METHODS = {"mul", "mul_"}
_DIV_METHODS = {"div", "div_"}
_META_METHODS = {"size", "dim", "ndimension", "numel"}
_META_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda"}


@dataclass(frozen=True)
class _Space:
    group: int
    layout: str


@dataclass(frozen=True)
class _Opaque:
    reason: str


@dataclass(frozen=True)
class _Attr:
    """A get_attr result: a parameter, buffer or constant of the model."""

    target: str
    value: Any


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


FREE = _Marker("free")
META = _Marker("meta")


@dataclass
class _SpaceRecord:
    order: int
    producers: list[Layer] = field(default_factory=list)
    consumers: list[tuple[Layer, str]] = field(default_factory=list)
    taints: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)


class _Spaces:
    """Union-find over channel spaces, merging their records on union."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self.records: dict[int, _SpaceRecord] = {}

    def new(self, order: int, producer: Layer | None = None) -> int:
        index = len(self._parent)
        self._parent.append(index)
        self.records[index] = _SpaceRecord(order, [producer] if producer is not None else [])
        return index

    def find(self, index: int) -> int:
        while self._parent[index] != index:
            self._parent[index] = self._parent[self._parent[index]]
            index = self._parent[index]
        return index

    def record(self, index: int) -> _SpaceRecord:
        return self.records[self.find(index)]

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        keep, drop = (a, b) if self.records[a].order <= self.records[b].order else (b, a)
        self._parent[drop] = keep
        merged, gone = self.records[keep], self.records.pop(drop)
        merged.producers += gone.producers
        merged.consumers += gone.consumers
        merged.taints += gone.taints
        merged.blocked += gone.blocked
        return keep


def equinorm_layer_type() -> type | None:
    try:
        from ..layers import EquiNormLayer
    except ImportError:
        return None
    return EquiNormLayer


class _Tracer(fx.Tracer):
    """Keeps EquiNorm layers as leaves so they show up as calls (and are refused) instead of being inlined."""

    def __init__(self, extra_leaf: type | None) -> None:
        super().__init__()
        self._extra_leaf = extra_leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._extra_leaf is not None and isinstance(m, self._extra_leaf):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _function_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or "torch"
    if module.startswith("torch._C") or module == "torch.functional":
        module = "torch"
    module = {"_operator": "operator", "torch.nn.functional": "F"}.get(module, module)
    return f"{module}.{getattr(fn, '__name__', repr(fn))}"


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


_FORWARD_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)  # fmt: skip


@contextlib.contextmanager
def _fsdp_hooks_removed(model: nn.Module) -> Iterator[None]:
    """Modules sharded by FSDP2 without their forward hooks, which gather parameters and move inputs:
    tracing needs only the structure (and the parameters' global shapes), not their values."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        yield
        return
    saved = []
    for module in model.modules():
        if isinstance(module, FSDPModule):
            saved.append((module, {name: getattr(module, name) for name in _FORWARD_HOOK_DICTS}))
            for name in _FORWARD_HOOK_DICTS:
                setattr(module, name, type(getattr(module, name))())
    try:
        yield
    finally:
        for module, hooks in saved:
            for name, value in hooks.items():
                setattr(module, name, value)


def _resolve_attr(model: nn.Module, target: str) -> Any:
    value: Any = model
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _layer_name_of_weight(target: str) -> str:
    return target[: -len(".weight")] if target.endswith(".weight") else target


class _GraphAnalysis:
    def __init__(self, model: nn.Module, batchnorm: str) -> None:
        self.model = model
        self.batchnorm = batchnorm
        self.spaces = _Spaces()
        self.states: dict[fx.Node, Any] = {}
        self.layers: list[Layer] = []
        self._seen_weights: dict[int, str] = {}
        self._called_modules: set[str] = set()
        self._equinorm_layer = equinorm_layer_type()
        self.order = 0  # index of the node being visited; orders the groups topologically

    # ---- driving -------------------------------------------------------------------------
    def run(self) -> list[ChannelGroup]:
        graph = self._trace()
        for order, node in enumerate(graph.nodes):
            self.order = order
            self.states[node] = self._visit(node)
        return self._finalize()

    def _trace(self) -> fx.Graph:
        try:
            with _fsdp_hooks_removed(self.model):
                return _Tracer(self._equinorm_layer).trace(self.model)
        except Exception as error:  # tracing fails in many ways (data-dependent control flow, ...)
            raise ValueError(
                f"ENorm could not trace {type(self.model).__name__} with torch.fx ({type(error).__name__}: {error}); "
                "the sequential schedule needs a symbolically traceable model (schedule='release' does not)"
            ) from error

    def _visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return FREE
        if node.op == "get_attr":
            return _Attr(node.target, _resolve_attr(self.model, node.target))
        if node.op == "call_module":
            return self._call_module(node, self.model.get_submodule(node.target))
        if node.op == "call_function":
            return self._call_function(node)
        if node.op == "call_method":
            return self._call_method(node)
        if node.op == "output":
            self._mark_output(node)
            return META
        raise ValueError(f"ENorm does not understand graph node {node.format_node()}")

    def state(self, value: Any) -> Any:
        if isinstance(value, fx.Node):
            return self.states[value]
        if isinstance(value, torch.Tensor):
            return FREE
        return META

    # ---- node kinds -------------------------------------------------------------------------
    def _call_module(self, node: fx.Node, module: nn.Module) -> Any:
        where = f"module '{node.target}' ({type(module).__name__})"
        if self._equinorm_layer is not None and isinstance(module, self._equinorm_layer):
            raise ValueError(
                f"{where} is an EquiNorm layer: its output does not scale with its weight rows, so ENorm "
                "cannot rescale around it; use ENorm on a model without EquiNorm layers"
            )
        source = node.args[0] if node.args else None
        if isinstance(module, nn.Linear):
            return self._layer(node, Layer(node.target, "linear", module.weight, module.bias), source, module=True)
        if isinstance(module, _CONV_MODULES):
            layer = Layer(node.target, "conv", module.weight, module.bias, module.groups)
            return self._layer(node, layer, source, module=True)
        if isinstance(module, _BatchNorm):
            return self._batchnorm(node, module, source)
        if isinstance(module, _ACTIVATION_MODULES):
            return self.state(source)
        if isinstance(module, _POOL_MODULES) and not getattr(module, "return_indices", False):
            return self._pool(node, source, where)
        if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            return self._flatten(source)
        return self._unsupported(node, where)

    def _call_function(self, node: fx.Node) -> Any:
        target = node.target
        where = f"{_function_name(target)} (graph node '{node.name}')"
        if target is F.linear or target in _CONV_FUNCTIONS:
            return self._functional_layer(node, where)
        if target in _ACTIVATION_FUNCTIONS:
            return self.state(_arg(node, 0, "input"))
        if target in _POOL_FUNCTIONS:
            flag = _POOL_FUNCTIONS[target]
            if flag is not None and _arg(node, flag, "return_indices", False):
                return self._unsupported(node, f"{where} with return_indices=True")
            return self._pool(node, _arg(node, 0, "input"), where)
        if target is torch.flatten:
            return self._flatten_call(node, node.args[0], where)
        if target is torch.reshape:
            return self._view_call(node, node.args[0], _arg(node, 1, "shape"), where)
        if target in _ADD_FUNCTIONS:
            return self._add(node, node.args[0], _arg(node, 1, "other"), where)
        if target in _MUL_FUNCTIONS:
            return self._scale(node, node.args[0], _arg(node, 1, "other"), where, divide=False)
        if target in _DIV_FUNCTIONS and node.kwargs.get("rounding_mode") is None:
            return self._scale(node, node.args[0], _arg(node, 1, "other"), where, divide=True)
        if target is getattr and node.args[1] in _META_ATTRIBUTES:
            return META
        if target is operator.getitem and self.state(node.args[0]) is META:
            return META
        return self._unsupported(node, where)

    def _call_method(self, node: fx.Node) -> Any:
        method, source = node.target, node.args[0]
        where = f"Tensor.{method} (graph node '{node.name}')"
        if method in _META_METHODS:
            return META
        if method in _ACTIVATION_METHODS:
            return self.state(source)
        if method == "flatten":
            return self._flatten_call(node, source, where)
        if method in ("view", "reshape"):
            shape = node.args[1:] if len(node.args) > 2 else _arg(node, 1, "shape", ())
            return self._view_call(node, source, shape, where)
        if method in _ADD_METHODS:
            return self._add(node, source, _arg(node, 1, "other"), where)
        if method in _MUL_METHODS:
            return self._scale(node, source, _arg(node, 1, "other"), where, divide=False)
        if method in _DIV_METHODS and node.kwargs.get("rounding_mode") is None:
            return self._scale(node, source, _arg(node, 1, "other"), where, divide=True)
        return self._unsupported(node, where)

    # ---- layers -----------------------------------------------------------------------------
    def _functional_layer(self, node: fx.Node, where: str) -> Any:
        weight, bias = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        weight_state, bias_state = self.state(weight), self.state(bias)
        parametric = isinstance(weight_state, _Attr) and isinstance(weight_state.value, nn.Parameter)
        if not parametric or not (bias is None or isinstance(getattr(bias_state, "value", None), nn.Parameter)):
            return self._unsupported(node, f"{where} with a weight or bias that is not a parameter of the model")
        kind = "linear" if node.target is F.linear else "conv"
        groups = 1 if kind == "linear" else _arg(node, 6, "groups", 1)
        bias_param = None if bias is None else bias_state.value
        layer = Layer(_layer_name_of_weight(weight_state.target), kind, weight_state.value, bias_param, groups)
        return self._layer(node, layer, _arg(node, 0, "input"), module=False)

    def _layer(self, node: fx.Node, layer: Layer, source: Any, *, module: bool) -> _Space:
        self._register(node, layer, module)
        self._consume(layer, self.state(source))
        layout = LAST if layer.kind == "linear" else FIRST
        return _Space(self.spaces.new(self.order, layer), layout)

    def _register(self, node: fx.Node, layer: Layer, module: bool) -> None:
        what = f"'{layer.name}'"
        if module:
            if node.target in self._called_modules:
                raise ValueError(
                    f"module {what} is called more than once: its calls would need different rescalings of one "
                    "weight, which ENorm cannot do; give each call its own module"
                )
            self._called_modules.add(node.target)
        for tensor in (layer.weight, layer.bias):
            if tensor is not None and id(tensor) in self._seen_weights:
                raise ValueError(
                    f"layer {what} uses a parameter already used by layer '{self._seen_weights[id(tensor)]}' "
                    "(a layer called twice or tied weights); ENorm needs each weight in exactly one layer"
                )
        for tensor in (layer.weight, layer.bias):
            if tensor is not None:
                self._seen_weights[id(tensor)] = layer.name
        self.layers.append(layer)

    def _consume(self, layer: Layer, state: Any) -> None:
        if isinstance(state, _Opaque):
            raise ValueError(
                f"layer '{layer.name}' reads {state.reason}; that tensor does not scale with the channels ENorm "
                f"rescales. Between layers ENorm supports only {SUPPORTED_OPS}"
            )
        if not isinstance(state, _Space):
            return
        linear = layer.kind == "linear"
        if state.layout not in (_LINEAR_READS if linear else _CONV_READS):
            raise ValueError(
                f"layer '{layer.name}' ({layer.kind}) reads a tensor whose channels are {_LAYOUT_WORDS[state.layout]}, "
                f"but a {layer.kind} reads its channels {'from the last dim' if linear else 'from dim 1'}; "
                "flatten (from dim 1) or pool before a Linear that follows a convolution"
            )
        self.spaces.record(state.group).consumers.append((layer, state.layout))

    def _batchnorm(self, node: fx.Node, module: _BatchNorm, source: Any) -> Any:
        state = self.state(source)
        if self.batchnorm == "paper":
            return state  # the authors' treatment: transparent, its affine untouched
        name = node.target
        if isinstance(state, _Opaque):
            raise ValueError(f"BatchNorm '{name}' reads {state.reason}; ENorm supports only {SUPPORTED_OPS}")
        if isinstance(state, _Space):
            # Its running statistics would not follow a rescaled input, so the input space stays fixed.
            self.spaces.record(state.group).blocked.append(f"it is normalised by BatchNorm '{name}'")
        spatial = isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)) or getattr(state, "layout", None) == FIRST
        layout = FIRST if spatial else EITHER  # a BatchNorm1d input may be (N, C) or (N, C, L)
        if not module.affine:
            group = self.spaces.new(self.order)
            reason = f"it contains the output of BatchNorm '{name}', which has no affine parameters"
            self.spaces.record(group).blocked.append(reason)
            return _Space(group, layout)
        layer = Layer(name, "batchnorm", module.weight, module.bias)
        self._register(node, layer, module=True)
        return _Space(self.spaces.new(self.order, layer), layout)

    # ---- channel-preserving ops ---------------------------------------------------------------
    def _pool(self, node: fx.Node, source: Any, where: str) -> Any:
        state = self.state(source)
        if isinstance(state, _Space) and state.layout not in _POOL_READS:
            detail = f"on channels {_LAYOUT_WORDS[state.layout]} (pooling would mix channels)"
            return self._unsupported(node, f"{where} {detail}")
        return state

    def _flatten(self, source: Any) -> Any:
        state = self.state(source)
        if not isinstance(state, _Space):
            return state
        layout = {FIRST: FLAT, EITHER: FLAT, FLAT: FLAT, LAST: FLAT_LAST, FLAT_LAST: FLAT_LAST}[state.layout]
        return _Space(state.group, layout)

    def _flatten_call(self, node: fx.Node, source: Any, where: str) -> Any:
        """torch.flatten(x, start_dim, end_dim) or x.flatten(start_dim, end_dim)."""
        start_dim, end_dim = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
        if start_dim == 1 and end_dim == -1:
            return self._flatten(source)
        detail = f"start_dim={start_dim}, end_dim={end_dim} (only start_dim=1, end_dim=-1 keeps channels apart)"
        return self._unsupported(node, f"{where} with {detail}")

    def _view_call(self, node: fx.Node, source: Any, shape: Any, where: str) -> Any:
        if isinstance(shape, (tuple, list)) and len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        if isinstance(shape, (tuple, list)) and len(shape) == 2 and shape[1] == -1 and self._is_batch_size(shape[0]):
            return self._flatten(source)
        return self._unsupported(node, f"{where} to a shape other than (x.size(0), -1)")

    @staticmethod
    def _is_batch_size(value: Any) -> bool:
        if not isinstance(value, fx.Node):
            return False
        if value.op == "call_method" and value.target == "size":
            return _arg(value, 1, "dim") == 0
        if value.op == "call_function" and value.target is operator.getitem and value.args[1] == 0:
            shape = value.args[0]
            return isinstance(shape, fx.Node) and (
                (shape.op == "call_function" and shape.target is getattr and shape.args[1] == "shape")
                or (shape.op == "call_method" and shape.target == "size" and _arg(shape, 1, "dim") is None)
            )
        return False

    def _add(self, node: fx.Node, left: Any, right: Any, where: str) -> Any:
        a, b = self.state(left), self.state(right)
        spaces = [s for s in (a, b) if isinstance(s, _Space)]
        if any(isinstance(s, _Opaque) for s in (a, b)):
            return self._unsupported(node, where)
        if len(spaces) == 2:
            layouts = {a.layout, b.layout} - {EITHER}
            if len(layouts) > 1:
                detail = f"of tensors whose channels lie differently ({a.layout} and {b.layout})"
                return self._unsupported(node, f"{where} {detail}")
            return _Space(self.spaces.union(a.group, b.group), layouts.pop() if layouts else EITHER)
        if len(spaces) == 1:
            # The other operand (network input, constant, ...) would not scale with the group.
            self._taint(
                spaces[0],
                f"{where} adds a tensor that is not rescaled with these channels (the network input, a constant, "
                "or a value computed from them)",
            )
            return spaces[0]
        return FREE if FREE in (a, b) or isinstance(a, _Attr) or isinstance(b, _Attr) else META

    def _scale(self, node: fx.Node, left: Any, right: Any, where: str, *, divide: bool) -> Any:
        a, b = self.state(left), self.state(right)
        if isinstance(a, _Space) and self._is_scalar(right, b):
            return a
        if not divide and isinstance(b, _Space) and self._is_scalar(left, a):
            return b
        return self._unsupported(node, where)

    @staticmethod
    def _is_scalar(value: Any, state: Any) -> bool:
        if isinstance(value, Number):
            return True
        return isinstance(state, _Attr) and isinstance(state.value, torch.Tensor) and state.value.numel() == 1

    # ---- unsupported ops and the output ---------------------------------------------------------
    def _taint(self, space: _Space, reason: str) -> None:
        self.spaces.record(space.group).taints.append(reason)

    def _unsupported(self, node: fx.Node, where: str) -> Any:
        states = []
        fx.node.map_arg((node.args, node.kwargs), lambda value: states.append(self.state(value)))
        spaces = [s for s in states if isinstance(s, _Space)]
        for space in spaces:
            self._taint(space, f"{where} is applied to it")
        if spaces:
            producers = [layer for space in spaces for layer in self.spaces.record(space.group).producers]
            origin = f" applied to channels produced by {_names(producers)}" if producers else ""
            return _Opaque(f"the result of {where}{origin}")
        opaque = [s for s in states if isinstance(s, _Opaque)]
        if opaque:
            return opaque[0]
        return FREE if any(s is FREE or isinstance(s, _Attr) for s in states) else META

    def _mark_output(self, node: fx.Node) -> None:
        def visit(value: fx.Node) -> None:
            state = self.state(value)
            if isinstance(state, _Space):
                self.spaces.record(state.group).blocked.append("it is (part of) the network output")

        fx.node.map_arg(node.args, visit)

    # ---- groups --------------------------------------------------------------------------------
    def _finalize(self) -> list[ChannelGroup]:
        groups = []
        for record in sorted(self.spaces.records.values(), key=lambda r: r.order):
            if not record.producers or not record.consumers or record.blocked:
                continue
            if record.taints:
                raise ValueError(
                    f"{record.taints[0]}: the channels produced by {_names(record.producers)} are rescaled by ENorm "
                    f"because {_names(layer for layer, _ in record.consumers)} read them; between layers ENorm "
                    f"supports only {SUPPORTED_OPS}"
                )
            groups.append(self._channel_group(record))
        return groups

    def _channel_group(self, record: _SpaceRecord) -> ChannelGroup:
        counts = {layer.out_channels for layer in record.producers}
        if len(counts) != 1:
            raise ValueError(
                f"layers {_names(record.producers)} share a channel space but have {sorted(counts)} output channels"
            )
        channels = counts.pop()
        columns = tuple(self._columns(layer, layout, channels, record) for layer, layout in record.consumers)
        return ChannelGroup(channels, tuple(record.producers), columns)

    @staticmethod
    def _columns(layer: Layer, layout: str, channels: int, record: _SpaceRecord) -> Columns:
        width = layer.in_channels
        source = f"the {channels} channels of {_names(record.producers)}"
        if layout in (FLAT, FLAT_LAST):
            if width % channels:
                raise ValueError(
                    f"layer '{layer.name}' has {width} input features after a flatten of {source}: "
                    f"{width} is not a multiple of {channels}"
                )
            if layout == FLAT_LAST and width != channels:
                raise ValueError(
                    f"layer '{layer.name}' reads a flattened Linear output with more than 2 dims: its channels are "
                    "interleaved with the other dims, which ENorm does not support"
                )
            return Columns(layer, width // channels)
        if width != channels:
            raise ValueError(f"layer '{layer.name}' reads {width} input channels from {source}")
        return Columns(layer)


def _names(layers: Any) -> str:
    return ", ".join(f"'{layer.name}'" for layer in layers)


def discover_groups(model: nn.Module, batchnorm: str = "paper") -> tuple[list[Layer], list[ChannelGroup]]:
    """Trace ``model`` with torch.fx and return (its layers, its rescalable channel groups).

    Layers are the Linear/Conv weights (and, with ``batchnorm="affine"``, BatchNorm affines) in
    graph order. Groups are returned in topological order of their first producer and contain
    only channel spaces with at least one producer and one consumer that neither reach the
    network output nor feed a BatchNorm (``batchnorm="affine"``).

    Raises:
        ValueError: the model cannot be traced, uses an unsupported op on a rescaled channel
            space, calls a layer twice, shares a weight, contains an EquiNorm layer, or has
            channel counts that do not match.
    """
    analysis = _GraphAnalysis(model, batchnorm)
    groups = analysis.run()
    return analysis.layers, groups
