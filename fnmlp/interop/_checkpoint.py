"""Checkpoints: one file with the spec, the parameter/state/optimizer trees and metadata.

Two formats hold the same names and header (``docs/guide/checkpoints.md`` shows the layout):

- torch (the default): what ``torch.save`` writes for ``{"header": the JSON header,
  "state_dict": the model's tensors, "tensors": the optimizer's and the extra trees'}``. The
  state_dict is the torch twin's (``fnmlp.to_torch``): ``0.weight``, ``1.running_mean``, ...; an
  ensemble's members under ``members.k.``. It is read with ``torch.load(weights_only=True)``,
  whose unpickler builds only tensors and plain containers, so loading never runs code from the
  file.
- safetensors (a ``.safetensors`` path or ``format="safetensors"``): every tensor by the same
  name, the header in the file's metadata (``_safetensors``); safetensors is optional.

The header: format version, the spec and optimizer as plain data, the trees' structure (their
tensors by name, types by registered public names), dtype and device, fnmlp and torch versions,
the user's metadata and a SHA-256 checksum over header and tensors. Writing is atomic: a
temporary file in the same folder, flushed, fsynced, then renamed over the target, so a writer
killed midway leaves the previous checkpoint intact. Format 1 files (tensors ``t0``, ``t1``, ...)
still load.

The model is any registered model kind (``MLP``, ``Ensemble``): the checkpoint code knows only
its small protocol, ``ModelKind``, and its spec (``fnmlp.interop._spec``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Protocol

import torch
from torch import Tensor

from fnmlp import _registry
from fnmlp._errors import FnmlpError
from fnmlp._files import ZIP_START, check_writable, summary, write_atomically, zip_damage
from fnmlp.interop import _safetensors, _spec

FORMAT = "fnmlp-checkpoint"
VERSION = 2  # 2: tensors named by their path (the twin's state_dict); 1: t0, t1, ...
FILE_FORMATS = ("torch", "safetensors")
_OTHER_TREES = ("opt_state", "extra")  # the prefixes of the tensors outside the state_dict


class ModelKind(Protocol):
    """What a checkpoint needs of a model (``MLP``, ``Ensemble``), besides being registered
    with kind "model" (``fnmlp._registry``). A kind may also define ``check_opt_state(
    optimizer, params, opt_state)``; without it ``optimizer.check(params, None, opt_state)``
    applies. A kind of members stacked on a leading axis (``Ensemble``) defines ``size``,
    ``member(tree, k)`` and ``stack(trees)``: its params and state are stored member by
    member, under ``members.k.``."""

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
         metadata: dict | None = None, extra: dict | None = None,
         format: str | None = None) -> None:
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
        format: "torch" (``torch.save``'s zip) or "safetensors" (needs the safetensors
            package); default: "safetensors" for a path ending in ``.safetensors``, else
            "torch". ``fnmlp.load`` reads either.
    """
    path = check_writable(path)
    file_format = _file_format(path, format)
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
    members = _members(model)
    model_tensors: dict[str, Tensor] = {}
    trees = {name: _spec.encode_tree(tree, model_tensors, members=members)
             for name, tree in (("params", params), ("state", state))}
    if members is not None:  # member by member in the file: members.0.*, members.1.*, ...
        model_tensors = dict(sorted(model_tensors.items(),
                                    key=lambda item: int(item[0].split(".")[1])))
    tensors = dict(model_tensors)
    trees["opt_state"] = _spec.encode_tree(opt_state, tensors, "opt_state")
    header = {
        "format": FORMAT, "version": VERSION,
        "model": _spec.encode_spec(model),
        "optimizer": None if optimizer is None else _spec.encode_spec(optimizer),
        "trees": trees,
        "extra": {str(name): _spec.encode_tree(tree, tensors, f"extra.{name}")
                  for name, tree in (extra or {}).items()},
        "dtype": str(like.dtype), "device": str(like.device),
        "versions": {"fnmlp": _fnmlp_version(), "torch": torch.__version__},
        "metadata": metadata or {},
    }
    tensors = {name: t.detach().contiguous() for name, t in tensors.items()}
    header["checksum"] = _checksum(header, tensors)
    text = json.dumps(header)
    if file_format == "safetensors":
        write_atomically(path, lambda file, temporary: _safetensors.write(
            file, temporary, tensors, text))
        return
    payload = {"header": text,
               "state_dict": {name: tensors[name] for name in model_tensors},
               "tensors": {name: t for name, t in tensors.items() if name not in model_tensors}}
    write_atomically(path, lambda file, temporary: torch.save(payload, file))


def _file_format(path: str, format: str | None) -> str:
    """The file format to write (``save``'s ``format``), checked; safetensors' import too."""
    if format is None:
        format = "safetensors" if path.endswith(_safetensors.SUFFIX) else "torch"
    if format not in FILE_FORMATS:
        raise ValueError(f"format must be one of {FILE_FORMATS} (or None: from the path's "
                         f"suffix), got {format!r}")
    if format == "safetensors":
        _safetensors.require()
    return format


def _members(model) -> int | None:
    """The number of stacked members of a model kind that has them (``Ensemble``), else None."""
    size = getattr(model, "size", None)
    stacked = callable(getattr(model, "stack", None)) and callable(getattr(model, "member", None))
    return size if stacked and isinstance(size, int) else None


def load(path, *, map_location=None) -> Checkpoint:
    """Read a checkpoint written by ``save`` (either file format, any format version this
    fnmlp knows), verifying its checksum.

    Arguments:
        path: the file.
        map_location: where to put the tensors (a device or device name; default: where they
            were saved).

    Raises ``CheckpointError`` naming the path and the problem for a missing, truncated,
    corrupted, foreign or newer-format file; nothing in the file is executed.
    """
    path = os.fspath(path)
    header, tensors = _read(path)
    expected = header.pop("checksum", None)
    try:
        actual = _checksum(header, tensors)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    if expected != actual:
        raise CheckpointError(f"{path}: corrupted (checksum mismatch): its contents are not what "
                              "was written; use an intact copy")
    try:
        return _rebuild(header, tensors, map_location)
    except _spec.SpecError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except Exception as error:  # a well-formed file whose trees do not fit its model
        raise CheckpointError(f"{path}: {type(error).__name__}: {error}") from None


def _read(path: str) -> tuple[dict, dict]:
    """The header and tensors (every one, by name) of the checkpoint at ``path``, read safely
    (nothing in the file runs) and not yet verified. A file that does not read as a checkpoint
    of a format this fnmlp knows raises ``CheckpointError``: "truncated" or "corrupted" when
    the file is damaged, else what it is (foreign, newer)."""
    try:
        with open(path, "rb") as file:
            start = file.read(9)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: a directory, not a checkpoint file") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({summary(error)})") from None
    if not ZIP_START.startswith(start[:4]) and _safetensors.looks_like(start, path):
        header, tensors = _read_safetensors(path)
    else:
        header, tensors = _read_torch(path)
    if header["version"] > VERSION:
        raise _unreadable(path, f"written in checkpoint format {header['version']} by a newer "
                                f"fnmlp; this one reads format {VERSION} and older: upgrade fnmlp")
    return header, tensors


def _read_torch(path: str) -> tuple[dict, dict]:
    """``_read`` for a file of ``torch.save``: format 2's ``{"header", "state_dict",
    "tensors"}`` or format 1's ``{"header", "tensors"}``."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: a directory, not a checkpoint file") from None
    except Exception as error:  # the safe unpickler's refusal, a broken zip, ...
        raise _unreadable(path, "not a readable fnmlp checkpoint", error) from None
    try:
        header, tensors = json.loads(payload["header"]), payload["tensors"]
        model_tensors = payload.get("state_dict", {}) if header["version"] >= 2 else {}
        ours = (isinstance(header, dict) and header.get("format") == FORMAT
                and isinstance(header.get("version"), int) and isinstance(tensors, dict)
                and isinstance(model_tensors, dict))
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise _unreadable(path, "not an fnmlp checkpoint")
    if set(model_tensors) & set(tensors):
        raise CheckpointError(f"{path}: corrupted: tensor names repeat in its state_dict and "
                              "tensors")
    return header, {**model_tensors, **tensors}


def _read_safetensors(path: str) -> tuple[dict, dict]:
    """``_read`` for a safetensors file: its tensors, the header from its metadata."""
    try:
        metadata, tensors = _safetensors.read(path)
    except ImportError:
        raise
    except Exception as error:  # the reader's refusal of a damaged or foreign file
        damage = _safetensors.damage(path)
        if damage is not None:
            raise CheckpointError(f"{path}: {damage}") from None
        raise CheckpointError(f"{path}: not a readable fnmlp checkpoint "
                              f"({summary(error)})") from None
    try:
        header = json.loads((metadata or {})["fnmlp"])
        ours = (isinstance(header, dict) and header.get("format") == FORMAT
                and isinstance(header.get("version"), int))
    except (TypeError, KeyError, ValueError):
        ours = False
    if not ours:
        raise CheckpointError(f"{path}: a safetensors file, but not an fnmlp checkpoint (no "
                              "fnmlp header in its metadata): read it with "
                              "safetensors.torch.load_file")
    return header, tensors


def _unreadable(path: str, problem: str, error: BaseException | None = None) -> CheckpointError:
    """The error for a file that did not read as a checkpoint: its damage when it is damaged
    (``zip_damage``), else ``problem``; ``error``: what the reader raised, summarized after."""
    damage = zip_damage(path, error)
    if damage is not None:
        return CheckpointError(f"{path}: {damage}")
    return CheckpointError(f"{path}: {problem}" + ("" if error is None else
                                                   f" ({summary(error)})"))


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
        hint = ("; a torch.nn module converts with fnmlp.from_torch(module)"
                if isinstance(model, torch.nn.Module) else "")
        raise TypeError(f"{name} must be a model ({kinds}), got {type(model).__name__}{hint}")


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


def _fnmlp_version() -> str:
    import fnmlp

    return fnmlp.__version__
