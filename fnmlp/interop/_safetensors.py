"""Checkpoints in the safetensors format: the tensors by name, the checkpoint's JSON header in
the file's metadata (``{"format": "pt", "fnmlp": header}``), so that
``safetensors.torch.load_file`` reads the weights without fnmlp. safetensors is optional: it is
imported when a file of this format is written or read.
"""

from __future__ import annotations

import json
import os

from torch import Tensor

SUFFIX = ".safetensors"
_INSTALL = "pip install safetensors (or fnmlp[persist])"
_MAX_HEADER = 100_000_000  # safetensors' own limit on its header


def require():
    """``safetensors.torch``, or an ``ImportError`` saying how to install it."""
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError(f"checkpoints in the safetensors format need the safetensors "
                          f"package: {_INSTALL}") from error
    return safetensors.torch


def looks_like(start: bytes, path: str) -> bool:
    """Whether the file at ``path``, beginning with ``start`` (its first 9 bytes or fewer; not
    a zip archive's), is safetensors: an 8-byte header length, then the JSON header's opening
    brace; a file cut before that brace, by its suffix or a plausible header length."""
    if start[8:9] == b"{" or path.endswith(SUFFIX):
        return True
    return len(start) == 8 and int.from_bytes(start, "little") <= _MAX_HEADER


def write(file, temporary: str, tensors: dict[str, Tensor], header: str) -> None:
    """Write ``tensors`` and the JSON ``header`` to ``temporary`` (the open ``file`` is its
    handle, which the caller flushes and fsyncs). Tensors sharing memory (one tensor in two
    trees) are copied first: safetensors refuses overlapping ones."""
    module = require()
    count: dict[tuple, int] = {}
    for tensor in tensors.values():
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        count[key] = count.get(key, 0) + 1
    plain = {}
    for name, tensor in tensors.items():
        shared = count[(tensor.device, tensor.untyped_storage().data_ptr())] > 1
        tensor = tensor.contiguous()
        plain[name] = tensor.clone() if shared and tensor.numel() else tensor
    module.save_file(plain, temporary, metadata={"format": "pt", "fnmlp": header})


def read(path: str) -> tuple[dict[str, str] | None, dict[str, Tensor]]:
    """The metadata and the tensors (on the CPU) of the safetensors file at ``path``; the
    reader's error for a file it cannot read. safetensors parses only its JSON header and
    raw tensor bytes: nothing in the file runs."""
    require()
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as file:
        return file.metadata(), {name: file.get_tensor(name) for name in file.keys()}


def damage(path: str) -> str | None:
    """What is wrong with a safetensors file that did not read, in plain words ("truncated:
    ...", "corrupted: ..."), from its header's length and the extent of its data; None when
    its structure is whole (then it is foreign, not damaged)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as file:
            length = int.from_bytes(file.read(8), "little")
            text = file.read(min(length, _MAX_HEADER)) if size >= 8 else b""
    except OSError:
        return None
    if size < 8:
        return f"truncated: the file has {size} bytes, too few for a checkpoint"
    if length > _MAX_HEADER:
        return "corrupted: its safetensors header length is damaged"
    if 8 + length > size:
        return (f"truncated: the file ends after {size} bytes, inside its safetensors header "
                "(an interrupted write or copy); use an intact copy")
    try:
        header = json.loads(text)
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items()
                if name != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "corrupted: its safetensors header is damaged"
    end = 8 + length + max(ends, default=0)
    if size < end:
        return (f"truncated: the file ends after {size} bytes, before the end of its tensors "
                f"({end} bytes; an interrupted write or copy); use an intact copy")
    if size > end:
        return f"corrupted: {size - end} bytes follow its tensors' data"
    return None
