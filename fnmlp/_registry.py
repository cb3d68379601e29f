"""The one registry of spec classes: every primitive, loss, optimizer, schedule and model kind
that checkpoints rebuild by name, each under one stable name, with a primitive's ``torch.nn``
twin beside it.

fnmlp's own classes register themselves (the base classes' ``__init_subclass__``; ``Ensemble``
and ``MLP`` by one line each); a user's class is registered with ``fnmlp.register``. Every table
is read from here: the checkpoints' whitelist (``fnmlp.interop._spec``), the activation names
(``fnmlp.nn.get_activation``) and the twin rules (``fnmlp.interop._registry``). This module is
the bottom layer: it imports nothing of fnmlp, nor torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

KINDS = ("primitive", "loss", "optimizer", "schedule", "model")


def no_width(module) -> None:
    """A module that fixes no input width (an activation's)."""
    return None


class Twin(NamedTuple):
    """How a primitive and its ``torch.nn`` module convert.

    ``modules``: the module classes; the first is what ``to_torch`` makes, ``from_torch``
    recognizes all. ``to_torch(primitive, params, state, n_in) -> nn.Module`` (holding copies);
    ``from_torch(module) -> (primitive, params, state)`` (copies); ``in_width(module)``: the
    input width the module fixes, or None (``no_width``).
    """

    modules: tuple[type, ...]
    to_torch: Callable[..., Any]
    from_torch: Callable[[Any], tuple[Any, Any, Any]]
    in_width: Callable[[Any], int | None] = no_width


class Entry(NamedTuple):
    """One registered class: its stable ``name``, its ``kind`` (one of ``KINDS``) and its torch
    ``twin`` (None if it has none; see ``set_twin``)."""

    name: str
    cls: type
    kind: str
    twin: Any = None


_BY_NAME: dict[str, Entry] = {}
_BY_CLASS: dict[type, Entry] = {}
_generation = 0  # counts changes, for tables derived from this one


def add(cls: type, kind: str, *, name: str | None = None, twin: Twin | None = None) -> type:
    """Register ``cls`` under ``name`` (default: its class name); returns ``cls``.

    Raises ``ValueError`` if ``cls`` is registered already, if another class holds ``name``, or
    if another primitive's twin holds one of ``twin.modules``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    name = cls.__name__ if name is None else name
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if cls in _BY_CLASS:
        raise ValueError(f"{qualified(cls)} is registered already (as {_BY_CLASS[cls].name!r})")
    holder = _BY_NAME.get(name)
    if holder is not None:
        raise ValueError(f"the name {name!r} is taken by {qualified(holder.cls)}: register "
                         f"{qualified(cls)} under another one (name=...)")
    if twin is not None:
        _check_twin(kind, cls, twin)
    _store(Entry(name, cls, kind, twin))
    return cls


def add_own(cls: type, kind: str) -> None:
    """The base classes' hook (``__init_subclass__``): register fnmlp's own classes under their
    class name; a class defined elsewhere waits for ``fnmlp.register``."""
    if cls.__module__.partition(".")[0] == "fnmlp":
        add(cls, kind)


def set_twin(cls: type, twin) -> None:
    """Give the registered ``cls`` its torch twin (once): a ``Twin`` for a primitive; for a
    loss, optimizer or schedule the interop layer's rule, a named tuple whose ``modules`` are
    the torch classes it converts to and from."""
    entry = _BY_CLASS.get(cls)
    if entry is None:
        raise ValueError(f"{qualified(cls)} is not registered")
    if entry.twin is not None:
        raise ValueError(f"{qualified(cls)} has a torch twin already")
    _check_twin(entry.kind, cls, twin)
    _store(entry._replace(twin=twin))


def options_twin(cls: type, module: type) -> Twin:
    """The twin of a primitive without params or state whose module takes the primitive's
    options (dataclass fields) by the same names: ``nn.ELU(alpha=...)`` for ``ELU(alpha)``."""

    def to_torch(primitive, params, state, n_in):
        return module(**{f.name: getattr(primitive, f.name) for f in dataclasses.fields(cls)})

    def from_torch(instance):
        return cls(**{f.name: getattr(instance, f.name) for f in dataclasses.fields(cls)}), (), ()

    return Twin((module,), to_torch, from_torch)


def entry(cls: type) -> Entry | None:
    """The entry of exactly ``cls`` (not of a base class), or None."""
    return _BY_CLASS.get(cls)


def named(name: str) -> Entry | None:
    """The entry registered under ``name``, or None."""
    return _BY_NAME.get(name) if isinstance(name, str) else None


def entries(kind: str | None = None) -> tuple[Entry, ...]:
    """Every entry (of ``kind``), in registration order."""
    return tuple(e for e in _BY_NAME.values() if kind is None or e.kind == kind)


def generation() -> int:
    """A number that changes whenever the registry does (a key for derived tables)."""
    return _generation


def qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_twin(kind: str, cls: type, twin) -> None:
    if kind == "primitive" and not isinstance(twin, Twin) or not getattr(twin, "modules", ()):
        raise TypeError(f"a twin names at least one torch class (a primitive's is a Twin), "
                        f"got {twin!r}")
    for other in _BY_NAME.values():  # a torch class converts back to one class of a kind
        if other.twin is not None and other.cls is not cls and other.kind == kind:
            for module in set(twin.modules) & set(other.twin.modules):
                raise ValueError(f"{qualified(module)} is the twin of {qualified(other.cls)} "
                                 f"already; {qualified(cls)} needs a module class of its own")


def _store(new: Entry) -> None:
    global _generation
    _BY_NAME[new.name] = _BY_CLASS[new.cls] = new
    _generation += 1
