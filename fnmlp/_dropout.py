"""Dropout with masks from a counter-based hash: pure, reproducible, and compile-friendly.

A mask depends only on a key (seed, counter), the layer's index and each element's position,
so the same key gives the same mask in eager and compiled code, on any device, with no
generator state to thread through. ``fit`` derives one key per step from its generator.

    keep_ij = u_ij >= p,  u_ij = hash(key, layer, i·n + j) / 2³²;  a' = a·keep/(1 - p)
    backward: da = da'·keep/(1 - p)
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B  # < 2³¹: products of 32-bit values stay inside int64
_GOLDEN = 0x9E3779B1  # 2³²/φ: spreads layer indices before hashing
_ROUND_SALT = 0x5BD1E995


def _hash32(values):
    """A 32-bit integer mixing function (a bijection of [0, 2³²)), on Python ints or on int64
    tensors holding such values."""
    values = ((values ^ (values >> 16)) * _MULTIPLIER) & _MASK32
    values = ((values ^ (values >> 16)) * _MULTIPLIER) & _MASK32
    return values ^ (values >> 16)


def make_key(seed: int, counter: int = 0, device=None) -> Tensor:
    """A dropout key: an int64 tensor (2,), two 32-bit words mixed from (seed, counter).

    Both are taken modulo 2³². The mixing (three Feistel rounds over ``_hash32``) is a
    bijection of the 64-bit pair, so distinct (seed, counter) pairs give distinct keys. It
    runs here, on Python ints, so that a compiled step only hashes each element's position:
    hashing the key in the graph too made inductor's expressions ~60× larger (compiling the
    classifier step took ~170 s instead of ~30 s).
    """
    words = []
    for name, value in (("seed", seed), ("counter", counter)):
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"dropout key {name} must be an integer, got {value!r}")
        words.append(operator.index(value) & _MASK32)
    left, right = words
    for _ in range(3):
        left, right = right, left ^ _hash32(right ^ _ROUND_SALT)
    return torch.tensor([left, right], dtype=torch.int64, device=device)


def keep_mask(key: Tensor, layer: int, shape: tuple[int, int], p: float, dtype) -> Tensor:
    """The (m, n) 0/1 mask of kept units for ``layer`` under ``key``, in ``dtype``:
    bits = hash(hash(position ^ key₀ ^ salt(layer)) ^ key₁), kept where bits ≥ p·2³²."""
    salt = _hash32((layer * _GOLDEN + 1) & _MASK32)
    index = torch.arange(shape[0] * shape[1], device=key.device, dtype=torch.int64)
    bits = _hash32(_hash32(index ^ (key[0] ^ salt)) ^ key[1]).reshape(shape)
    return (bits >= int(p * 2**32)).to(dtype)


def dropout_forward(a: Tensor, key: Tensor, layer: int, p: float):
    scaled_mask = keep_mask(key, layer, tuple(a.shape), p, a.dtype) * (1 / (1 - p))
    return a * scaled_mask, scaled_mask


def dropout_backward(scaled_mask: Tensor, da: Tensor) -> Tensor:
    return da * scaled_mask
