"""Frozen dataclasses of tensors registered as PyTorch pytrees."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch.utils._pytree as pytree

T = TypeVar("T")


def pytree_dataclass(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen dataclass whose fields are pytree children.

    ``tree_map``, ``tree_flatten``, ``torch.func.vmap`` and ``torch.compile`` then see through
    instances; assigning to a field raises ``dataclasses.FrozenInstanceError``. Equality is by
    identity (comparing tensors elementwise has no single truth value).
    """
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    names = tuple(field.name for field in dataclasses.fields(cls))

    def flatten(obj):
        return [getattr(obj, name) for name in names], None

    def flatten_with_keys(obj):
        return [(pytree.GetAttrKey(name), getattr(obj, name)) for name in names], None

    def unflatten(children, _context):
        return cls(*children)

    pytree.register_pytree_node(
        cls,
        flatten,
        unflatten,
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=flatten_with_keys,
    )
    return cls


def tree_map(fn, *trees):
    """``fn`` applied leaf by leaf over trees of the same structure."""
    return pytree.tree_map(fn, *trees)


def tree_leaves(tree) -> list:
    return pytree.tree_leaves(tree)
