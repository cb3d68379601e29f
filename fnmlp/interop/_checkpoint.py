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
import errno
import hashlib
import json
import os
import tempfile
import zipfile
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
    path = check_writable(path)
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
    _write_atomically(path, {"header": json.dumps(header), "tensors": tensors})


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
    """The header and tensors of the checkpoint at ``path``, read safely (nothing in the file
    runs) and not yet verified. A file that does not read as a checkpoint of a format this
    fnmlp knows raises ``CheckpointError``: "truncated" or "corrupted" when the file is
    damaged, else what it is (foreign, newer)."""
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
        ours = (isinstance(header, dict) and header.get("format") == FORMAT
                and isinstance(header.get("version"), int) and isinstance(tensors, dict))
    except (TypeError, KeyError, IndexError, ValueError):
        ours = False
    if not ours:
        raise _unreadable(path, "not an fnmlp checkpoint")
    if header["version"] > VERSION:
        raise _unreadable(path, f"written in checkpoint format {header['version']} by a newer "
                                f"fnmlp; this one reads format {VERSION} and older: upgrade fnmlp")
    return header, tensors


def _unreadable(path: str, problem: str, error: BaseException | None = None) -> CheckpointError:
    """The error for a file that did not read as a checkpoint: its damage when it is damaged
    (``_damage``), else ``problem``; ``error``: what the reader raised, summarized after."""
    damage = _damage(path, error)
    if damage is not None:
        return CheckpointError(f"{path}: {damage}")
    return CheckpointError(f"{path}: {problem}" + ("" if error is None else
                                                   f" ({_summary(error)})"))


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


def _damage(path: str, error: BaseException | None = None) -> str | None:
    """What is wrong with a checkpoint file that did not load, in plain words ("truncated: ...",
    "corrupted (checksum mismatch in ...): ..."), from its zip structure and the CRC-32 of every
    entry (``torch.save`` writes them; ``torch.load`` does not check them); None when it is no
    zip archive or an intact one (then it is foreign, not damaged). ``error``: what torch's
    reader raised; a failure of its zip reader on an archive that Python's reads is damage too
    (every file ``torch.save`` writes reads back)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as file:
            start = file.read(len(_ZIP_START))
        whole = _has_end_record(path, size)
    except OSError:
        return None
    if size < len(_ZIP_START):
        return (f"truncated: the file has {size} bytes, too few for a checkpoint"
                if _ZIP_START.startswith(start) else None)
    if not whole:
        return None if start != _ZIP_START else (
            f"truncated: the file ends after {size} bytes, before the end of its zip archive "
            "(an interrupted write or copy); use an intact copy")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = _bad_entry(archive)
            names = archive.namelist()
    except zipfile.BadZipFile as zip_error:
        return f"corrupted: its zip archive is damaged ({zip_error})"
    except Exception as zip_error:  # odd lengths or names: struct, Unicode, overflow errors
        return f"corrupted: its zip archive is damaged ({_summary(zip_error)})"
    if bad is not None:
        return (f"corrupted (checksum mismatch in {bad}): its contents are not what was "
                "written; use an intact copy")
    if (error is not None and any(name.endswith("/data.pkl") for name in names)
            and any(word in str(error) for word in ("PytorchStreamReader", "inline_container"))):
        return "corrupted: its zip archive is damaged"
    return None


_ZIP_START = b"PK\x03\x04"  # a local file header: what every torch.save file starts with
_ZIP_END = b"PK\x05\x06"  # the end of central directory record, the last thing in a zip
_ZIP_END_SIZE = 22  # its length without a comment


def _has_end_record(path: str, size: int) -> bool:
    """Whether the file ends in a whole zip end record (22 bytes, then a comment, which
    ``torch.save`` never writes), looked for in the last 64 KiB + 22 bytes: a file cut short
    loses it, or part of it, whatever else it kept."""
    with open(path, "rb") as file:
        file.seek(max(0, size - (1 << 16) - _ZIP_END_SIZE))
        tail = file.read()
    found = tail.rfind(_ZIP_END)
    return found >= 0 and len(tail) - found >= _ZIP_END_SIZE


def _bad_entry(archive: zipfile.ZipFile) -> str | None:
    """The first entry whose bytes fail their CRC-32 (None if all pass); entries written
    without one (CRC 0: ``torch.serialization.set_crc32_options(False)``) are only opened."""
    for info in archive.infolist():
        try:
            with archive.open(info) as entry:
                while info.CRC and entry.read(1 << 20):
                    pass
        except zipfile.BadZipFile as error:
            if "CRC" in str(error):
                return info.filename
            raise
    return None


def _summary(error: BaseException) -> str:
    """``Type: message``, the message cut to its first sentence or line (at most ~160
    characters, cut between words): library messages can run to paragraphs."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    sentence = text.split(". ")[0]
    if len(sentence) > 160:
        sentence = sentence[:160].rsplit(" ", 1)[0] + " ..."
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__


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


def check_writable(path) -> str:
    """``path`` as a string; an ``OSError`` naming it, before any work, when no checkpoint can
    be written there: it is a directory, or its folder is missing or not writable by this
    process (root may write anywhere: then the write is tried, and its failure named too)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"cannot write the checkpoint {path}: it is a "
                                f"directory; name a file in it, such as "
                                f"{os.path.join(path, 'run.fnmlp')}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, f"cannot write the checkpoint {path}: its folder "
                                f"{folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"cannot write the checkpoint {path}: its folder "
                              f"{folder} is not writable")
    return path


def _write_error(path: str, error: OSError) -> OSError:
    """``error`` (its type and errno kept) with a message that names the checkpoint ``path``
    rather than the temporary file the error was about."""
    message = f"cannot write the checkpoint {path}: {error.strerror or error}"
    return type(error)(message) if error.errno is None else type(error)(error.errno, message)


def _write_atomically(path: str, payload: dict) -> None:
    """Write ``payload`` (``torch.save``) to ``path`` through a temporary file in the same
    folder, flushed, fsynced and renamed over it: ``path`` holds the old file or the new one,
    never part of one. An ``OSError`` names ``path``; the temporary file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        handle, temporary = tempfile.mkstemp(prefix=".fnmlp-", suffix=".tmp", dir=folder)
    except OSError as error:
        raise _write_error(path, error) from error
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(handle, 0o666 & ~umask)  # as an ordinary new file, not mkstemp's 0600
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.exists(temporary):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise _write_error(path, error) from error
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
