"""Specs and pytrees as plain data (JSON-able dicts and lists), and back, for checkpoints.

Only registered classes are rebuilt: specs by their registry name (``fnmlp._registry``: fnmlp's
own classes and those given to ``fnmlp.register``), and pytree dataclasses made with
``fnmlp.pytree_dataclass``, by ``module.qualname``; nothing is imported or called by name from
the data, so reading a spec runs no code from it.
"""

from __future__ import annotations

import dataclasses
import numbers

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


def encode_tree(tree, tensors: dict[str, Tensor]):
    """A JSON-able description of a pytree; its tensors are added to ``tensors`` by name."""
    if isinstance(tree, Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = tree.detach()
        return {"tensor": name}
    if tree is None:
        return None
    if isinstance(tree, (tuple, list)):
        return {"tuple" if isinstance(tree, tuple) else "list":
                [encode_tree(child, tensors) for child in tree]}
    if isinstance(tree, dict) and all(isinstance(key, str) for key in tree):
        return {"dict": {key: encode_tree(child, tensors) for key, child in tree.items()}}
    fields = _tree.dataclass_fields(type(tree))
    if fields is not None:
        return {"dataclass": _tree.dataclass_name(type(tree)),
                "fields": {name: encode_tree(getattr(tree, name), tensors) for name in fields}}
    raise TypeError(f"a {type(tree).__name__} cannot be saved: trees hold tensors, tuples, "
                    "lists, dicts with string keys and fnmlp.pytree_dataclass instances")


def decode_tree(data, tensors: dict[str, Tensor]):
    """The pytree ``encode_tree`` described, with its tensors taken from ``tensors``."""
    if data is None:
        return None
    if not isinstance(data, dict) or len(data) not in (1, 2):
        raise SpecError(f"not a tree: {data!r}")
    if "tensor" in data:
        if data["tensor"] not in tensors:
            raise SpecError(f"tensor {data['tensor']!r} is missing")
        return tensors[data["tensor"]]
    if "tuple" in data:
        return tuple(decode_tree(child, tensors) for child in data["tuple"])
    if "list" in data:
        return [decode_tree(child, tensors) for child in data["list"]]
    if "dict" in data:
        return {key: decode_tree(child, tensors) for key, child in data["dict"].items()}
    if "dataclass" in data:
        cls = _tree.dataclass_named(data["dataclass"])
        if cls is None:
            raise SpecError(f"unknown pytree dataclass {data['dataclass']!r} (define it with "
                            "fnmlp.pytree_dataclass before loading)")
        return cls(**{name: decode_tree(child, tensors) for name, child in
                      data["fields"].items()})
    raise SpecError(f"not a tree: {data!r}")
