"""Specs and pytrees as plain data (JSON-able dicts and lists), and back, for checkpoints.

Only registered classes are rebuilt: specs by their registry name (``fnmlp._registry``: fnmlp's
own classes and those given to ``fnmlp.register``), and pytree dataclasses made with
``fnmlp.pytree_dataclass``, fnmlp's own by their public path (``fnmlp.nn.LinearParams``), one's
own by ``module.qualname``; nothing is imported or called by name from the data, so reading a
spec runs no code from it.

A tree's tensors are named by their path in it, as torch's ``state_dict`` names a module's:
``0.weight`` is the ``weight`` of the tuple's item 0.
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers
import sys
from typing import cast

import torch
from torch import Tensor

from fnmlp import _registry, _tree
from fnmlp.nn import MLP
from fnmlp._errors import FnmlpError

# MLP keeps the layout it had before the registry ({"kind", "in_features", "layers"}), so that
# files stay readable both ways
_registry.add(MLP, "model")


class SpecError(FnmlpError, ValueError):
    """Plain data that does not describe an fnmlp spec or tree."""


def encode_spec(value):
    """A JSON-able description of a spec: a model (``MLP``, ``Ensemble``), a primitive, a
    loss, an optimizer or a schedule, of a registered class: ``{"kind": its registered name,
    "options": its dataclass fields}``, and for a class of one's own ``"class"``, its
    qualified name, which only error messages read."""
    entry = _registry.entry(type(value))
    if entry is None:
        name = type(value).__name__
        raise TypeError(f"{name} cannot be saved as a spec: it is not registered; register "
                        f"it once with fnmlp.register({name}) (a frozen dataclass subclassing "
                        "fnmlp.Primitive, fnmlp.nn.Loss, fnmlp.optim.Optimizer or "
                        "fnmlp.optim.schedules.Schedule)")
    if entry.cls is MLP:
        return {"kind": "MLP", "in_features": value.in_features,
                "layers": [encode_spec(layer) for layer in value.layers]}
    data = {"kind": entry.name,
            "options": {f.name: _encode_option(getattr(value, f.name), value, f.name)
                        for f in dataclasses.fields(value)}}
    if not _is_own(entry.cls):
        data["class"] = _registry.qualified(entry.cls)
    return data


def _is_own(cls: type) -> bool:
    return cls.__module__.partition(".")[0] == "fnmlp"


def _encode_option(value, spec, field: str):
    if isinstance(value, Tensor):
        return float(value)
    if isinstance(value, tuple):
        return {"tuple": [_encode_option(v, spec, field) for v in value]}
    if value is None or isinstance(value, (bool, str)) or isinstance(value, numbers.Real):
        return value
    if callable(value) and not dataclasses.is_dataclass(value):  # a function, a lambda
        # the cast: spec's class is registered (encode_spec checked it)
        kind = cast(_registry.Entry, _registry.entry(type(spec))).kind
        raise TypeError(f"a {kind} made from a Python function cannot be saved; "
                        f"{type(spec).__name__}.{field} holds {value!r}: express it with "
                        f"fnmlp's own {kind}s, or a class of your own registered with "
                        "fnmlp.register, or save (or fit) without a checkpoint")
    if _registry.entry(type(value)) is None and not dataclasses.is_dataclass(value):
        raise TypeError(f"{type(spec).__name__}.{field} holds a {type(value).__name__}, which a "
                        "spec cannot store: options are numbers, strings, booleans, None, "
                        "tuples of them and registered specs")
    return encode_spec(value)


def decode_spec(data):
    """The spec ``encode_spec`` described; only registered classes are rebuilt, by name."""
    if not isinstance(data, dict) or "kind" not in data:
        raise SpecError(f"not a spec: {data!r}")
    try:
        entry = _registry.named(data["kind"])
        if entry is None:
            raise SpecError(_unregistered(data))
        if entry.cls is MLP:
            return MLP(data["in_features"], [decode_spec(layer) for layer in data["layers"]])
        options = {name: _decode_option(value) for name, value in data["options"].items()}
        return entry.cls(**options)
    except SpecError:
        raise
    except Exception as error:  # malformed data: wrong types, missing keys, bad options
        raise SpecError(f"bad spec for {data.get('kind')!r}: {type(error).__name__}: "
                        f"{error}") from None


def _unregistered(data: dict) -> str:
    """The message for a spec whose kind no class is registered under here."""
    kind = data["kind"]
    cls = data.get("class")
    if not isinstance(cls, str):
        return (f"unknown kind {kind!r} (a class of your own must be registered with "
                "fnmlp.register before loading)")
    short = cls.rpartition(".")[2]
    return (f"unknown kind {kind!r} (the class {cls} is not registered in this process; "
            f"define it and register it with fnmlp.register({short}"
            + ("" if kind == short else f", name={kind!r}")
            + ") before loading: fnmlp imports nothing a file names)")


def _decode_option(value):
    if isinstance(value, dict):
        if "tuple" in value:
            return tuple(_decode_option(v) for v in value["tuple"])
        return decode_spec(value)
    return value


def encode_tree(tree, tensors: dict[str, Tensor], name: str = "", *,
                members: int | None = None):
    """A JSON-able description of a pytree; its tensors are added to ``tensors``.

    Arguments:
        tree: tensors, None, tuples, lists, dicts with string keys and
            ``fnmlp.pytree_dataclass`` instances.
        tensors: where the tensors go, by name: ``name``, then the tuple and list indices,
            dataclass fields and dict keys down to the tensor, joined by dots (``opt_state`` and
            ``exp_avg``, 0, ``weight``: ``opt_state.exp_avg.0.weight``); a name taken already
            gets ``~1``, ``~2``, ... (a dict key holding a dot can meet another path).
        name: the tree's own name ("" for none).
        members: for a tree stacked over that many members (an ensemble's: leaves (K, ...)),
            store member k's slice of every tensor under ``members.k.`` and its path; the
            description then holds ``{"stack": [the K names]}`` where a tensor was.
    """
    if isinstance(tree, Tensor):
        if members is None:
            return {"tensor": _add(tensors, name or "tensor", tree.detach())}
        return {"stack": [_add(tensors, _join(f"members.{k}", name or "tensor"),
                               tree.detach()[k]) for k in range(members)]}
    if tree is None:
        return None
    if isinstance(tree, (tuple, list)):
        return {"tuple" if isinstance(tree, tuple) else "list":
                [encode_tree(child, tensors, _join(name, i), members=members)
                 for i, child in enumerate(tree)]}
    if isinstance(tree, dict) and all(isinstance(key, str) for key in tree):
        return {"dict": {key: encode_tree(child, tensors, _join(name, key), members=members)
                         for key, child in tree.items()}}
    fields = _tree.dataclass_fields(type(tree))
    if fields is not None:
        return {"dataclass": dataclass_name(type(tree)),
                "fields": {field: encode_tree(getattr(tree, field), tensors,
                                              _join(name, field), members=members)
                           for field in fields}}
    raise TypeError(f"a {type(tree).__name__} cannot be saved: trees hold tensors, tuples, "
                    "lists, dicts with string keys and fnmlp.pytree_dataclass instances")


def _join(name: str, key) -> str:
    return f"{name}.{key}" if name else str(key)


def _add(tensors: dict[str, Tensor], name: str, tensor: Tensor) -> str:
    """Put ``tensor`` in ``tensors`` under ``name``, or ``name~1``, ... if that is taken."""
    unique = name
    for count in itertools.count(1):
        if unique not in tensors:
            break
        unique = f"{name}~{count}"
    tensors[unique] = tensor
    return unique


def dataclass_name(cls: type) -> str:
    """The name a file stores for the ``pytree_dataclass`` ``cls``: fnmlp's own by its public
    path (``fnmlp.nn.LinearParams``, ``fnmlp.optim.AdamState``: where ``fnmlp`` exports it),
    a class of one's own by ``module.qualname``, as ``fnmlp.pytree_dataclass`` registered it."""
    if _is_own(cls):
        parts = cls.__module__.split(".")
        public = ".".join(itertools.takewhile(lambda part: not part.startswith("_"), parts))
        if getattr(sys.modules.get(public), cls.__qualname__, None) is cls:
            return f"{public}.{cls.__qualname__}"
    return _tree.dataclass_name(cls)


def dataclass_named(name: str) -> type | None:
    """The ``pytree_dataclass`` a file names (``dataclass_name``'s, or ``module.qualname``,
    which older files store for fnmlp's own too), or None; only modules loaded already are
    looked in: nothing is imported."""
    if not isinstance(name, str):
        return None
    module, _, attribute = name.rpartition(".")
    if module.partition(".")[0] == "fnmlp":
        found = getattr(sys.modules.get(module), attribute, None)
        if isinstance(found, type) and _tree.dataclass_fields(found) is not None:
            return found
    return _tree.dataclass_named(name)


def decode_tree(data, tensors: dict[str, Tensor]):
    """The pytree ``encode_tree`` described, with its tensors taken from ``tensors`` (a
    ``stack`` of member tensors stacked again)."""
    if data is None:
        return None
    if not isinstance(data, dict) or len(data) not in (1, 2):
        raise SpecError(f"not a tree: {data!r}")
    if "tensor" in data:
        return _tensor(data["tensor"], tensors)
    if "stack" in data:
        names = data["stack"]
        if not isinstance(names, list) or not names:
            raise SpecError(f"not a tree: {data!r}")
        return torch.stack([_tensor(name, tensors) for name in names])
    if "tuple" in data:
        return tuple(decode_tree(child, tensors) for child in data["tuple"])
    if "list" in data:
        return [decode_tree(child, tensors) for child in data["list"]]
    if "dict" in data:
        return {key: decode_tree(child, tensors) for key, child in data["dict"].items()}
    if "dataclass" in data:
        cls = dataclass_named(data["dataclass"])
        if cls is None:
            raise SpecError(f"unknown pytree dataclass {data['dataclass']!r} (define it with "
                            "fnmlp.pytree_dataclass before loading)")
        return cls(**{name: decode_tree(child, tensors) for name, child in
                      data["fields"].items()})
    raise SpecError(f"not a tree: {data!r}")


def _tensor(name, tensors: dict[str, Tensor]) -> Tensor:
    if not isinstance(name, str) or name not in tensors:
        raise SpecError(f"tensor {name!r} is missing")
    return tensors[name]
