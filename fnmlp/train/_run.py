"""What a fit carries from epoch to epoch, and its checkpoints: everything needed to continue a
killed fit so that it ends bit-identical to an uninterrupted one (the parameters, model and
optimizer states, history, step count, dropout seed, the generator's state, early stopping's
bookkeeping)."""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch

from fnmlp._tree import tree_leaves
from fnmlp.interop import load, save
from fnmlp.train._executor import Carry
from fnmlp.train._loop import Run


_KEYS = ("epoch", "steps_done", "train_loss", "valid_loss", "dropout_seed", "best_loss",
         "best_epoch", "waited", "stopped_epoch", "diverged_epoch", "extras")


def save_run(path, run, model, optimizer, generator: torch.Generator | None,
             settings: dict) -> None:
    """Checkpoint ``run`` (atomically; see ``fnmlp.save``); ``settings``: what must be the same
    to resume it (batch size, shuffling, loss, ...)."""
    extra = {}
    if generator is not None:
        extra["generator"] = generator.get_state()
    if run.best is not None:
        extra["best_params"], extra["best_state"] = run.best
    extra.update({f"tensor_{name}": value for name, value in run.tensors.items()})
    fit_state = {key: getattr(run, key) for key in _KEYS}
    fit_state["settings"] = settings
    for key in ("best_loss", "train_loss", "valid_loss"):
        fit_state[key] = json_floats(fit_state[key])
    carry = run.carry
    save(path, model, carry.params, state=carry.state, opt_state=carry.opt_state,
         optimizer=optimizer, metadata={"fnmlp_fit": fit_state}, extra=extra)


def data_fingerprint(*arrays) -> str:
    """A SHA-256 hex digest of ``arrays`` (tensors, NumPy arrays, SciPy sparse matrices or
    None) over each one's dtype, shape and bytes (a sparse matrix's over its CSR data, indices
    and indptr): what a checkpointed fit stores to refuse resuming on other data. Hashes every
    byte (about 15 ms for 200k x 32 float32 on one CPU core); a CUDA tensor is copied to the
    CPU first."""
    digest = hashlib.sha256()
    for array in arrays:
        _hash_array(digest, array)
    return digest.hexdigest()


def _hash_array(digest, array) -> None:
    if array is None:
        digest.update(b"none;")
        return
    if isinstance(array, (tuple, list)):  # validation data: (x_valid, y_valid[, weight])
        digest.update(f"seq{len(array)};".encode())
        for item in array:
            _hash_array(digest, item)
        return
    if isinstance(array, torch.Tensor) and (array.is_sparse or array.layout != torch.strided):
        array = array.to_dense()
    if not isinstance(array, (torch.Tensor, np.ndarray)) and hasattr(array, "tocsr"):
        csr = array.tocsr()  # scipy sparse: its canonical CSR arrays
        if not csr.has_canonical_format:
            csr = csr.copy()
            csr.sum_duplicates()
        digest.update(f"csr{tuple(csr.shape)};".encode())
        for part in (csr.data, csr.indices, csr.indptr):
            _hash_array(digest, part)
        return
    if isinstance(array, torch.Tensor):
        digest.update(f"{array.dtype}{tuple(array.shape)};".encode())
        flat = array.detach().reshape(-1).contiguous().cpu()
        data: np.ndarray = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0)
    else:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        data = array.reshape(-1).view(np.uint8) if array.size else np.empty(0)
    digest.update(memoryview(data.data))  # its buffer: no copy


def restore_run(path, model, optimizer, like: torch.Tensor, generator: torch.Generator | None,
                settings: dict, epochs: int, members: int = 1) -> Run | None:
    """The run checkpointed at ``path`` (None if there is no file yet), checked against this
    fit (model, optimizer, ``settings``, the parameters' dtype and device, ``epochs``), its
    generator state put into ``generator``."""
    if not os.path.exists(path):
        return None
    checkpoint = load(path, map_location=like.device)
    fit_state = checkpoint.metadata.get("fnmlp_fit")
    if fit_state is None:
        raise ValueError(f"{path} holds no fit to resume: it was written by fnmlp.save, not by "
                         "a checkpointed fit (fit(..., checkpoint=path)); load it with "
                         "fnmlp.load and fit from its params and state, or pass another "
                         "checkpoint path / resume=False")
    if checkpoint.model != model:
        raise ValueError(f"{path} holds a fit of another model: {checkpoint.model}")
    if checkpoint.optimizer != optimizer:
        differs = _differing_field(checkpoint.optimizer, optimizer)
        raise ValueError(f"{path} holds a fit with another optimizer: {checkpoint.optimizer!r}, "
                         f"this fit's is {optimizer!r}{differs}; "
                         "resume with the same one (to change it, load the checkpoint and fit "
                         "from its params and state)")
    if "stopped_epoch" not in fit_state:
        raise ValueError(f"{path} holds a fit written by an older fnmlp, which cannot be "
                         "resumed; load it with fnmlp.load and fit from its params and state")
    saved = fit_state.get("settings", {})
    if "data" in saved and settings.get("data") != saved["data"]:  # none stored: not compared
        raise ValueError(f"{path} holds a fit on other data (its fingerprint differs): pass "
                         "the same data, or another checkpoint path / resume=False")
    for name, value in saved.items():
        if settings.get(name) != value:
            raise ValueError(f"{path} holds a fit with {name}={value!r}, this one has "
                             f"{settings.get(name)!r}; resume with the same settings")
    first = tree_leaves(checkpoint.params)[0]
    if first.dtype != like.dtype:
        raise ValueError(f"{path} holds {first.dtype} parameters, this fit's are {like.dtype}")
    if fit_state["epoch"] > epochs:
        raise ValueError(f"{path} holds a fit at epoch {fit_state['epoch']}, past epochs={epochs}")
    values = {key: fit_state[key] for key in _KEYS if key in fit_state}
    values["train_loss"] = [[float(v) for v in epoch] for epoch in values["train_loss"]]
    values["valid_loss"] = [[float(v) for v in epoch] for epoch in values["valid_loss"]]
    values["best_loss"] = [float(v) for v in values["best_loss"]]  # "inf", "nan" back
    run = Run(Carry(checkpoint.params, checkpoint.opt_state, checkpoint.state), members,
              **values)
    if len(run.best_loss) != members:
        raise ValueError(f"{path} holds a fit of {len(run.best_loss)} members, this one has "
                         f"{members}")
    if "best_params" in checkpoint.extra:
        run.best = (checkpoint.extra["best_params"], checkpoint.extra["best_state"])
    run.tensors = {name[len("tensor_"):]: value for name, value in checkpoint.extra.items()
                   if name.startswith("tensor_")}
    if "generator" in checkpoint.extra and generator is not None:
        generator.set_state(checkpoint.extra["generator"].cpu())
    return run


def _differing_field(saved, given) -> str:
    """" (lr differs: 0.1 there, 0.01 here)" for two optimizers of one kind that differ in
    one field; "" otherwise."""
    if type(saved) is not type(given) or not hasattr(given, "__dict__"):
        return ""
    fields = [name for name in vars(given)
              if not name.startswith("_") and getattr(saved, name, None) != vars(given)[name]]
    if len(fields) != 1:
        return ""
    name = fields[0]
    return f" ({name} differs: {getattr(saved, name)!r} there, {getattr(given, name)!r} here)"


_NON_FINITE = ("inf", "-inf", "nan")


def json_floats(value):
    """``value`` (JSON data) with each non-finite float as its string, "inf", "-inf" or "nan"
    (JSON has no NaN or inf): how a checkpoint keeps the fit's losses and its callbacks'
    states; other values as they are (tuples as lists)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {key: json_floats(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_floats(item) for item in value]
    return value


def json_floats_back(value):
    """``json_floats``'s inverse for data of unknown shape (a callback's state): the strings
    "inf", "-inf" and "nan" as floats; ``{"__float__": "inf"}``, how checkpoints of fnmlp's
    first callbacks spelled them, too."""
    if isinstance(value, str):
        return float(value) if value in _NON_FINITE else value
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in _NON_FINITE:
            return float(value["__float__"])
        return {key: json_floats_back(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_floats_back(item) for item in value]
    return value
