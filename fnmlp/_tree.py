"""Frozen dataclasses of tensors registered as PyTorch pytrees."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
import torch.utils._pytree as pytree
from typing_extensions import dataclass_transform

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")
_DATACLASS_FIELDS: dict[type, tuple[str, ...]] = {}  # pytree dataclass -> its field names
_DATACLASS_NAMES: dict[str, type] = {}  # its name (module.qualname) -> the latest such class


@dataclass_transform(frozen_default=True, eq_default=False)
def pytree_dataclass(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen dataclass whose fields are pytree children.

    ``tree_map``, ``tree_flatten``, ``torch.func.vmap`` and ``torch.compile`` then see through
    instances; a field holding None (an absent part) is no child. Assigning to a field raises
    ``dataclasses.FrozenInstanceError``. Equality is by identity (comparing tensors
    elementwise has no single truth value).
    """
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    names = tuple(field.name for field in dataclasses.fields(cast("type[DataclassInstance]", cls)))

    def present(obj):  # fields holding None (an absent part) are no children
        return tuple(name for name in names if getattr(obj, name) is not None)

    def flatten(obj):
        fields = present(obj)
        return [getattr(obj, name) for name in fields], fields

    def flatten_with_keys(obj):
        fields = present(obj)
        return [(pytree.GetAttrKey(name), getattr(obj, name)) for name in fields], fields

    def unflatten(children, fields):
        absent = {name: None for name in names if name not in fields}
        return cls(**absent, **dict(zip(fields, children)))

    _DATACLASS_FIELDS[cls] = names
    _DATACLASS_NAMES[dataclass_name(cls)] = cls
    pytree.register_pytree_node(
        cls,
        flatten,
        unflatten,
        serialized_type_name=dataclass_name(cls),
        flatten_with_keys_fn=flatten_with_keys,
    )
    return cls


def dataclass_name(cls: type) -> str:
    """The stable name of a ``pytree_dataclass`` (``module.qualname``; checkpoints use it)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def dataclass_fields(cls: type) -> tuple[str, ...] | None:
    """The field names of the ``pytree_dataclass`` ``cls``; None for any other type."""
    return _DATACLASS_FIELDS.get(cls)


def dataclass_named(name: str) -> type | None:
    """The ``pytree_dataclass`` of that ``dataclass_name`` (the latest defined), or None."""
    return _DATACLASS_NAMES.get(name)


def tree_map(fn, *trees):
    """``fn`` applied leaf by leaf over trees of the same structure."""
    return pytree.tree_map(fn, *trees)


def tree_leaves(tree) -> list:
    return pytree.tree_leaves(tree)


def flatten(tree) -> tuple[list, object]:
    """``(leaves, spec)`` of a tree of tensors, tuples, lists and pytree dataclasses; None
    holds no leaf.

    A few times faster than ``torch.utils._pytree.tree_flatten`` for the small trees of a
    training step; ``spec`` is hashable. Other node types go through torch's pytree.
    """
    leaves: list = []
    return leaves, _flatten_into(tree, leaves)


def _flatten_into(tree, leaves: list):
    kind = type(tree)
    if kind is torch.Tensor:
        leaves.append(tree)
        return None
    if tree is None:  # an absent buffer: no leaf
        return "none"
    fields = _DATACLASS_FIELDS.get(kind)
    if fields is not None:
        children = [getattr(tree, name) for name in fields]
    elif kind is tuple or kind is list:
        children = tree
    elif isinstance(tree, torch.Tensor):  # a subclass such as nn.Parameter
        leaves.append(tree)
        return None
    else:
        children, spec = pytree.tree_flatten(tree)
        leaves.extend(children)
        return ("pytree", spec, len(children))
    specs: list[object] = []
    for child in children:  # tensor children inline: most of a training step's leaves
        if type(child) is torch.Tensor:
            leaves.append(child)
            specs.append(None)
        else:
            specs.append(_flatten_into(child, leaves))
    return (kind, tuple(specs))


def through_flat_buckets(tensors, act=None) -> list:
    """Fresh copies of ``tensors``, made as one concatenation per dtype (one kernel instead of
    a copy per tensor) that ``act(flat)`` may change in place before the copies, views of it,
    are returned."""
    copies: list = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(index)
    for indices in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        if act is not None:
            act(flat)
        for i, piece in zip(indices, flat.split([tensors[i].numel() for i in indices])):
            copies[i] = piece.view(tensors[i].shape)
    return copies


def unflatten(leaves, spec):
    """The tree of ``spec`` (from ``flatten``) holding ``leaves``."""
    return tree_builder(spec)(leaves)


_BUILDERS: dict = {}  # spec -> function building its tree from a sequence of leaves


def tree_builder(spec):
    """The function ``leaves -> tree`` for ``spec`` (from ``flatten``), made once per spec.
    Look it up outside traced code: dynamo cannot hash a spec."""
    builder = _BUILDERS.get(spec)
    if builder is None:
        builder = _BUILDERS[spec] = _generate_builder(spec)
    return builder


def _generate_builder(spec) -> Callable[[Sequence], Any]:
    """A function ``leaves -> tree`` for ``spec``, generated as one expression (like
    ``namedtuple``'s methods): a few times faster than walking the spec at every step."""
    names: dict[str, object] = {"tree_unflatten": pytree.tree_unflatten}
    count = itertools.count()

    def source(node) -> str:
        if node is None:
            return f"leaves[{next(count)}]"
        if node == "none":
            return "None"
        kind = node[0]
        if kind == "pytree":
            name = f"spec{len(names)}"
            names[name] = node[1]
            items = ", ".join(f"leaves[{next(count)}]" for _ in range(node[2]))
            return f"tree_unflatten([{items}], {name})"
        children = ", ".join(source(child) for child in node[1])
        if kind is tuple:
            return f"({children},)" if children else "()"
        if kind is list:
            return f"[{children}]"
        name = f"cls{len(names)}"
        names[name] = kind
        return f"{name}({children})"

    return eval(f"lambda leaves: {source(spec)}", names)  # noqa: S307 (generated source)


def unflatten_traced(leaves, spec):
    """``unflatten(leaves, spec)`` by walking ``spec``: no generated code and no cache keyed by
    the spec, so that dynamo traces it as well as eager code runs it (``tree_builder``'s
    builder is ~1.5 µs faster per call eagerly but is made by ``eval``, which dynamo cannot
    trace)."""
    return _walk(spec, iter(leaves))


def _walk(node, leaves):
    if node is None:
        return next(leaves)
    if type(node) is str:  # "none": an absent part
        return None
    kind, children = node[0], node[1]
    if kind == "pytree":
        return pytree.tree_unflatten([next(leaves) for _ in range(node[2])], children)
    built = [next(leaves) if child is None else _walk(child, leaves) for child in children]
    if kind is tuple:
        return tuple(built)
    if kind is list:
        return built
    return kind(*built)
