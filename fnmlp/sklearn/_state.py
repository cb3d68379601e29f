"""An estimator's state as plain data, for pickle and skops: what ``__getstate__`` gives and
``__setstate__`` takes.

fnmlp's objects become JSON text: the network and the specs in the hyperparameters (``layers``,
``loss``) by ``fnmlp.interop.encode_spec``, the trees of tensors (``params_``, ``state_``, the
optimizer state, the best weights) by their structure (``encode_tree``), their tensors NumPy
arrays by name. A torch dtype or device and a path become strings. Everything else (numbers,
strings, NumPy arrays, scikit-learn objects such as the label binarizer) stays as it is, so that
``skops.io`` reads the state with only NumPy's and scikit-learn's types besides the estimator's
class, and a pickle holds no torch object.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np
import torch

from fnmlp import _registry
from fnmlp._tree import dataclass_fields, tree_leaves
from fnmlp.interop import decode_spec, decode_tree, encode_spec, encode_tree
from fnmlp.nn import Dense

KEY = "_fnmlp_state"  # the state's entry saying what was converted (absent: an older pickle)
_FORMAT = 1


def plain_state(state: dict) -> dict:
    """``state`` (an estimator's ``__dict__``, copied) with fnmlp's and torch's objects as
    plain data; ``restore_state`` undoes it."""
    plain: dict = {}
    kinds: dict[str, str | None] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        kind = _kind(value)
        kinds[name] = kind
        plain[name] = value if kind is None else _ENCODE[kind](value, name, tensors)
    converted = {name: kind for name, kind in kinds.items() if kind is not None}
    if not converted:
        return plain
    arrays, meta = _arrays(tensors)
    plain[KEY] = {"format": _FORMAT, "kinds": converted, "arrays": arrays,
                  "tensors": json.dumps(meta)}
    return plain


def restore_state(state: dict) -> dict:
    """The estimator's ``__dict__`` from ``plain_state``'s data (an older pickle's state, which
    holds the objects themselves, is returned as it is)."""
    if KEY not in state:
        return state
    state = dict(state)
    info = state.pop(KEY)
    if info.get("format") != _FORMAT:
        raise ValueError(f"this estimator's state has format {info.get('format')!r}, which this "
                         f"fnmlp cannot read (it reads format {_FORMAT}): upgrade fnmlp")
    tensors = _tensors(info["arrays"], json.loads(info["tensors"]))
    for name, kind in info["kinds"].items():
        state[name] = _DECODE[kind](state[name], tensors)
    return state


def _kind(value) -> str | None:
    """How ``value`` is converted (a key of ``_ENCODE``), None if it stays as it is."""
    if isinstance(value, torch.dtype):
        return "dtype"
    if isinstance(value, torch.device):
        return "device"
    if isinstance(value, os.PathLike):
        return "path"
    if _is_spec(value) or isinstance(value, Dense):
        return "spec"
    if isinstance(value, (list, tuple)) and value and any(
            _is_spec(item) or isinstance(item, Dense) for item in value):
        return "specs"
    if isinstance(value, (tuple, list, dict, torch.Tensor)) or _is_tree_dataclass(value):
        if any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(value)):
            return "tree"
    return None


def _is_spec(value) -> bool:
    return _registry.entry(type(value)) is not None


def _is_tree_dataclass(value) -> bool:
    return dataclass_fields(type(value)) is not None


# --- one kind of value each ----------------------------------------------------------------


def _encode_spec(value, name, tensors) -> str:
    return json.dumps(_spec_data(value))


def _decode_spec(text: str, tensors):
    return _from_spec_data(json.loads(text))


def _encode_specs(values, name, tensors) -> str:
    """A list of layers (``layers=``): specs, ``Dense`` layers and activation names."""
    return json.dumps({"list": isinstance(values, list),
                       "items": [item if isinstance(item, str) else _spec_data(item)
                                 for item in values]})


def _decode_specs(text: str, tensors):
    data = json.loads(text)
    items = [item if isinstance(item, str) else _from_spec_data(item) for item in data["items"]]
    return items if data["list"] else tuple(items)


def _spec_data(value) -> dict:
    if isinstance(value, Dense):
        return {"dense": {field.name: _spec_data(getattr(value, field.name))
                          if _is_spec(getattr(value, field.name)) else getattr(value, field.name)
                          for field in dataclasses.fields(value)}}
    return {"spec": encode_spec(value)}


def _from_spec_data(data: dict):
    if "dense" in data:
        return Dense(**{name: _from_spec_data(value) if isinstance(value, dict) else value
                        for name, value in data["dense"].items()})
    return decode_spec(data["spec"])


def _encode_tree(value, name, tensors) -> str:
    return json.dumps(encode_tree(value, tensors, name))


def _decode_tree(text: str, tensors):
    return decode_tree(json.loads(text), tensors)


_ENCODE = {
    "dtype": lambda value, name, tensors: str(value).removeprefix("torch."),
    "device": lambda value, name, tensors: str(value),
    "path": lambda value, name, tensors: os.fspath(value),
    "spec": _encode_spec,
    "specs": _encode_specs,
    "tree": _encode_tree,
}
_DECODE = {
    "dtype": lambda text, tensors: _torch_dtype(text),
    "device": lambda text, tensors: torch.device(text),
    "path": lambda text, tensors: pathlib.Path(text),
    "spec": _decode_spec,
    "specs": _decode_specs,
    "tree": _decode_tree,
}


def _torch_dtype(name, dtypes: dict[str, torch.dtype] | None = None) -> torch.dtype:
    """The torch dtype a file names, looked up in a fixed table (``dtypes``; by default the
    floating dtypes fnmlp computes in), never as an attribute of ``torch``: the module's
    ``__getattr__`` imports submodules by name (``"_dynamo"``, ``"onnx"``)."""
    table = _FLOATING if dtypes is None else dtypes
    dtype = table.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ValueError(f"not a dtype fnmlp restores: {name!r} (one of "
                         f"{', '.join(table)})")
    return dtype


# --- tensors as NumPy arrays ---------------------------------------------------------------


def _arrays(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors as NumPy arrays by name, and per name its dtype, shape and device (or the
    name of the same tensor stored already: a tree sharing tensors with another, such as the
    best weights with the weights, shares them again when restored)."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, dict] = {}
    first: dict[int, str] = {}
    for name, tensor in tensors.items():
        if id(tensor) in first:
            meta[name] = {"same_as": first[id(tensor)]}
            continue
        first[id(tensor)] = name
        data = tensor.detach().cpu()
        if data.dtype not in _TENSOR_DTYPES.values():
            raise ValueError(f"{name} is a tensor of {data.dtype}, which an estimator's state "
                             f"cannot hold (it holds {', '.join(_TENSOR_DTYPES)})")
        if data.dtype in _NUMPY:
            array = data.numpy()
        else:  # bfloat16: the bytes
            array = data.contiguous().reshape(-1).view(torch.uint8).numpy()
        arrays[name] = array
        meta[name] = {"dtype": str(tensor.dtype).removeprefix("torch."),
                      "shape": list(tensor.shape), "device": str(tensor.device)}
    return arrays, meta


def _tensors(arrays: dict, meta: dict) -> dict[str, torch.Tensor]:
    """``_arrays`` undone: fresh tensors (copies: nothing shared with the arrays)."""
    tensors = {}
    for name, info in meta.items():
        if "same_as" in info:
            continue
        dtype = _torch_dtype(info["dtype"], _TENSOR_DTYPES)
        tensor = torch.from_numpy(np.array(arrays[name], copy=True))
        if dtype not in _NUMPY:
            tensor = tensor.view(dtype)
        tensors[name] = tensor.reshape(info["shape"]).to(info["device"])
    for name, info in meta.items():
        if "same_as" in info:
            tensors[name] = tensors[info["same_as"]]
    return tensors


_NUMPY = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128}


def _by_name(*dtypes: torch.dtype) -> dict[str, torch.dtype]:
    return {str(dtype).removeprefix("torch."): dtype for dtype in dtypes}


# the only dtypes a state names that are restored: fnmlp's floating dtypes (a dtype value, such
# as the dtype= hyperparameter), and for tensors those and the integer, bool and complex ones
# NumPy stores (a generator's state is uint8, a step count int64)
_FLOATING = _by_name(torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TENSOR_DTYPES = {**_FLOATING, **_by_name(*sorted(_NUMPY - set(_FLOATING.values()), key=str))}
