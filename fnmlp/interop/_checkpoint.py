"""Checkpoints: one file with the spec, the parameter/state/optimizer trees and metadata.

The file is what ``torch.save`` writes for a dict of plain data and tensors: a JSON header
(format version, the spec and optimizer as plain data, the trees' structure, dtype and device,
fnmlp and torch versions, the user's metadata, a SHA-256 checksum) and the tensors by name. It is
read with ``torch.load(weights_only=True)``, whose unpickler builds only tensors and plain
containers, so loading never runs code from the file (safetensors would do as well, but is one
more dependency for the same guarantee). Writing is atomic: a temporary file in the same folder,
flushed, fsynced, then renamed over the target, so a writer killed midway leaves the previous
checkpoint intact.

The model is any registered model kind (``MLP``, ``Ensemble``): the checkpoint code knows only
its small protocol, ``ModelKind``, and its spec (``fnmlp.interop._spec``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Any, Protocol

import torch
from torch import Tensor

from fnmlp import _registry
from fnmlp.interop import _spec
from fnmlp._errors import FnmlpError

FORMAT = "fnmlp-checkpoint"
VERSION = 1


class ModelKind(Protocol):
    """What a checkpoint needs of a model (``MLP``, ``Ensemble``), besides being registered
    with kind "model" (``fnmlp._registry``). A kind may also define ``check_opt_state(
    optimizer, params, opt_state)``; without it ``optimizer.check(params, None, opt_state)``
    applies."""

    def check_params(self, params) -> Tensor:
        """Raise unless ``params`` fit; return one leaf (for dtype and device)."""

    def check_state(self, state, like: Tensor) -> None:
        """Raise unless ``state`` fits, on ``like``'s dtype and device."""

    def init_state(self, *, dtype: torch.dtype, device: Any) -> Any:
        """The initial state."""


class CheckpointError(FnmlpError, RuntimeError):
    """A file that is not a readable fnmlp checkpoint (truncated, corrupted, foreign, newer)."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What ``fnmlp.load`` returns: ``model`` (an ``MLP``, an ``Ensemble``), ``params``,
    ``state`` (a tuple of ``()`` for a stateless ``MLP``), ``opt_state`` and ``optimizer``
    (None if not saved), ``metadata`` and the ``extra`` trees (a fit's generator state and best
    parameters)."""

    model: ModelKind
    params: Any
    state: Any
    opt_state: object = None
    optimizer: object = None
    metadata: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)


def save(path, model: ModelKind, params, *, state=None, opt_state=None, optimizer=None,
         metadata: dict | None = None, extra: dict | None = None) -> None:
    """Write a checkpoint to ``path`` atomically (the previous file stays intact until the new
    one is complete on disk).

    Arguments:
        path: the file to write (its folder must exist).
        model, params: the network (an ``MLP``, an ``Ensemble``) and its parameters (checked
            against each other; an ensemble's stacked).
        state: the model's state (``BatchNorm``); default the initial one.
        opt_state, optimizer: the optimizer's state and the optimizer itself (its spec), to
            continue training.
        metadata: plain data (JSON: dicts with string keys, lists, strings, numbers, booleans,
            None) stored with it.
        extra: more trees of tensors by name (``fit`` keeps its generator state here).
    """
    _check_kind(model, "model")
    like = model.check_params(params)
    if state is None:
        state = model.init_state(dtype=like.dtype, device=like.device)
    model.check_state(state, like)
    if opt_state is not None and optimizer is not None:
        check_opt_state = getattr(model, "check_opt_state", None)
        if check_opt_state is not None:
            check_opt_state(optimizer, params, opt_state)
        else:
            optimizer.check(params, None, opt_state)
    _check_plain(metadata or {}, "metadata")
    tensors: dict[str, Tensor] = {}
    header = {
        "format": FORMAT, "version": VERSION,
        "model": _spec.encode_spec(model),
        "optimizer": None if optimizer is None else _spec.encode_spec(optimizer),
        "trees": {name: _spec.encode_tree(tree, tensors)
                  for name, tree in (("params", params), ("state", state),
                                     ("opt_state", opt_state))},
        "extra": {str(name): _spec.encode_tree(tree, tensors)
                  for name, tree in (extra or {}).items()},
        "dtype": str(like.dtype), "device": str(like.device),
        "versions": {"fnmlp": _fnmlp_version(), "torch": torch.__version__},
        "metadata": metadata or {},
    }
    tensors = {name: t.detach().contiguous() for name, t in tensors.items()}
    header["checksum"] = _checksum(header, tensors)
    _write_atomically(os.fspath(path), {"header": json.dumps(header), "tensors": tensors})


def load(path, *, map_location=None) -> Checkpoint:
    """Read a checkpoint written by ``save``, verifying its checksum.

    Arguments:
        path: the file.
        map_location: where to put the tensors (a device or device name; default: where they
            were saved).

    Raises ``CheckpointError`` naming the path and the problem for a missing, truncated,
    corrupted, foreign or newer-format file; nothing in the file is executed.
    """
    path = os.fspath(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as error:  # the safe unpickler's refusal, a broken zip, ...
        raise CheckpointError(f"{path}: not a readable fnmlp checkpoint "
                              f"({type(error).__name__}: {str(error)[:200]})") from None
    try:
        header = json.loads(payload["header"])
        tensors = payload["tensors"]
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise KeyError("format")
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{path}: not an fnmlp checkpoint") from None
    if isinstance(header.get("version"), int) and header["version"] > VERSION:
        raise CheckpointError(f"{path}: written in checkpoint format {header['version']} by a "
                              f"newer fnmlp; this one reads format {VERSION} and older: upgrade "
                              "fnmlp")
    if not isinstance(header.get("version"), int) or not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: not an fnmlp checkpoint")
    expected = header.pop("checksum", None)
    try:
        actual = _checksum(header, tensors)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    if expected != actual:
        raise CheckpointError(f"{path}: checksum mismatch: the file is corrupted")
    try:
        return _rebuild(header, tensors, map_location)
    except _spec.SpecError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except Exception as error:  # a well-formed file whose trees do not fit its model
        raise CheckpointError(f"{path}: {type(error).__name__}: {error}") from None


def _rebuild(header: dict, tensors: dict, map_location) -> Checkpoint:
    """The checkpoint a verified header and its tensors describe."""
    model = _spec.decode_spec(header["model"])
    _check_kind(model, "the saved model")
    optimizer = None if header["optimizer"] is None else _spec.decode_spec(header["optimizer"])
    target = map_location if map_location is not None else header["device"]
    try:
        tensors = {name: t.to(target) for name, t in tensors.items()}
    except (RuntimeError, AssertionError, TypeError) as error:
        if map_location is not None:
            raise CheckpointError(f"map_location={map_location!r} cannot be used: "
                                  f"{error}") from None
        raise CheckpointError(f"saved on {header['device']}, which this machine cannot use "
                              f"({error}); pass map_location='cpu'") from None
    trees = {name: _spec.decode_tree(data, tensors) for name, data in header["trees"].items()}
    extra = {name: _spec.decode_tree(data, tensors)
             for name, data in header.get("extra", {}).items()}
    like = model.check_params(trees["params"])
    model.check_state(trees["state"], like)
    return Checkpoint(model=model, params=trees["params"], state=trees["state"],
                      opt_state=trees["opt_state"], optimizer=optimizer,
                      metadata=header["metadata"], extra=extra)


def _check_kind(model, name: str) -> None:
    entry = _registry.entry(type(model))
    if entry is None or entry.kind != "model":
        kinds = ", ".join(e.name for e in _registry.entries("model"))
        raise TypeError(f"{name} must be a model ({kinds}), got {type(model).__name__}")


def _check_plain(value, name: str) -> None:
    """Raise unless ``value`` is JSON data that loads back equal (dict keys strings)."""
    if isinstance(value, dict):
        for key, child in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{name} must be plain JSON data: key {key!r} is not a string")
            _check_plain(child, f"{name}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, child in enumerate(value):
            _check_plain(child, f"{name}[{i}]")
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        raise TypeError(f"{name} must be plain JSON data, got a {type(value).__name__}")


def _checksum(header: dict, tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the header (without its checksum) and every tensor's name, dtype, shape and
    bytes."""
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        if not isinstance(tensor, Tensor):
            raise CheckpointError(f"entry {name!r} is not a tensor")
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _write_atomically(path: str, payload: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".fnmlp-", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(handle, 0o666 & ~umask)  # as an ordinary new file, not mkstemp's 0600
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    try:  # the rename itself, on disk
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:  # pragma: no cover - file systems without directory fsync
        pass


def _fnmlp_version() -> str:
    import fnmlp

    return fnmlp.__version__
