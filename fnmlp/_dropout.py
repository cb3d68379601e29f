"""Dropout with masks from a counter-based hash: pure, reproducible, and compile-friendly.

A mask depends only on a key (seed, counter), the layer's index and each element's position,
so the same key gives the same mask in eager and compiled code, on any device, with no
generator state to thread through. ``fit`` derives one key per step from its generator.

    keep_ij = u_ij >= p,  u_ij = hash(key, layer, i·n + j) / 2³²;  a' = a·keep/(1 - p)
    backward: da = da'·keep/(1 - p)
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B  # < 2³¹: products of 32-bit values stay inside int64


def _hash32(values: Tensor) -> Tensor:
    """A 32-bit integer mixing function on int64 tensors holding values in [0, 2³²)."""
    values = ((values ^ (values >> 16)) * _MULTIPLIER) & _MASK32
    values = ((values ^ (values >> 16)) * _MULTIPLIER) & _MASK32
    return values ^ (values >> 16)


def make_key(seed: int, counter: int = 0, device=None) -> Tensor:
    """A dropout key: an int64 tensor (2,) holding (seed, counter)."""
    return torch.tensor([seed & _MASK32, counter & _MASK32], dtype=torch.int64, device=device)


def keep_mask(key: Tensor, layer: int, shape: tuple[int, int], p: float, dtype) -> Tensor:
    """The (m, n) 0/1 mask of kept units for ``layer`` under ``key``, in ``dtype``."""
    base = _hash32(_hash32(key[0] ^ _hash32(key[1] & _MASK32)) ^ (layer * 0x9E3779B1 & _MASK32))
    index = torch.arange(shape[0] * shape[1], device=key.device, dtype=torch.int64)
    bits = _hash32((index ^ base) & _MASK32).reshape(shape)
    return (bits >= int(p * 2**32)).to(dtype)


def dropout_forward(a: Tensor, key: Tensor, layer: int, p: float):
    scaled_mask = keep_mask(key, layer, tuple(a.shape), p, a.dtype) * (1 / (1 - p))
    return a * scaled_mask, scaled_mask


def dropout_backward(scaled_mask: Tensor, da: Tensor) -> Tensor:
    return da * scaled_mask
