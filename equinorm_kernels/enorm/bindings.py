"""Keeping ENorm's layers on the parameters the model holds now.

A parameter can be replaced after ENorm was built (``module.weight = nn.Parameter(...)``,
``model.load_state_dict(..., assign=True)``). Rescaling the replaced tensor would change nothing
the model computes with, and the energies would describe tensors the model no longer uses. Before
every cycle or energy reading, each recorded parameter is compared by identity with what its
module holds (a few attribute reads per layer); a replacement of the same shape is adopted, any
other change raises.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .plan import Layer

_FIELDS = ("weight", "bias")


@dataclass
class _Binding:
    layer: Layer
    field: str  # the Layer attribute: "weight" or "bias"
    owner_path: tuple[str, ...]  # submodule names from the model to the owning module
    owner: nn.Module
    attribute: str  # the parameter's name on its owner

    @property
    def qualified_name(self) -> str:
        return ".".join((*self.owner_path, self.attribute))


class ParameterBindings:
    """The module attribute each layer's weight and bias was read from, and the tensor it held."""

    def __init__(self, model: nn.Module, layers: tuple[Layer, ...]) -> None:
        self._model = model
        names: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), name)
        self._bindings = []
        for layer in layers:
            for field in _FIELDS:
                tensor = getattr(layer, field)
                name = names.get(id(tensor)) if tensor is not None else None
                if name is None:  # absent, or a buffer/constant: not replaceable as a parameter
                    continue
                module_path, _, attribute = name.rpartition(".")
                owner_path = tuple(module_path.split(".")) if module_path else ()
                owner = model.get_submodule(module_path)
                self._bindings.append(_Binding(layer, field, owner_path, owner, attribute))

    def refresh(self) -> None:
        """Adopt replaced parameters; raise ValueError for a change ENorm cannot follow."""
        for binding in self._bindings:
            owner = self._owner_now(binding)
            current = getattr(owner, binding.attribute, None)
            if current is not getattr(binding.layer, binding.field):
                self._adopt(binding, owner, current)

    def _owner_now(self, binding: _Binding) -> nn.Module:
        module = self._model
        for part in binding.owner_path:
            module = getattr(module, part, None)
            if module is None:
                break
        if module is binding.owner:
            return module
        if type(module) is not type(binding.owner):
            found = "nothing" if module is None else f"a {type(module).__name__}"
            raise ValueError(
                f"module '{'.'.join(binding.owner_path)}' ({type(binding.owner).__name__}) was replaced by {found} "
                "after ENorm was built; the channel groups may no longer hold: build a new ENorm for the model"
            )
        binding.owner = module
        return module

    @staticmethod
    def _adopt(binding: _Binding, owner: nn.Module, current: object) -> None:
        recorded = getattr(binding.layer, binding.field)
        where = f"parameter '{binding.qualified_name}' of module '{'.'.join(binding.owner_path) or '<model>'}'"
        if not isinstance(current, torch.Tensor):
            raise ValueError(
                f"{where} was replaced by {type(current).__name__} after ENorm was built; "
                "build a new ENorm for the model"
            )
        if current.shape != recorded.shape:
            raise ValueError(
                f"{where} was replaced by a tensor of shape {tuple(current.shape)} after ENorm was built, "
                f"but ENorm's channel groups were found for shape {tuple(recorded.shape)}; build a new ENorm"
            )
        setattr(binding.layer, binding.field, current)
