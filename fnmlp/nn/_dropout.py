"""Dropout with masks from a counter-based hash: pure, reproducible, and compile-friendly.

A mask depends only on a key (seed, counter), the primitive's position in its network (its
``stream``) and each element's position, so the same key gives the same mask in eager and
compiled code, on any device, with no generator state to thread through. ``fit`` derives one
key per step from its generator.

    keep_ij = u_ij >= p,  u_ij = hash(key, stream, i·n + j) / 2³²;  a' = a·keep/(1 - p)
    backward: da = da'·keep/(1 - p)
"""

from __future__ import annotations

import dataclasses
import numbers
import operator

import torch
from torch import Tensor

from fnmlp.nn._primitive import Primitive

_MASK32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B  # < 2³¹: products of 32-bit values stay inside int64
_GOLDEN = 0x9E3779B1  # 2³²/φ: spreads stream numbers before hashing
_ROUND_SALT = 0x5BD1E995


def _hash32(values):
    """A 32-bit integer mixing function (a bijection of [0, 2³²)), on Python ints or on int64
    tensors holding such values."""
    values = ((values ^ (values >> 16)) * _MULTIPLIER) & _MASK32
    values = ((values ^ (values >> 16)) * _MULTIPLIER) & _MASK32
    return values ^ (values >> 16)


def make_key(seed: int, counter: int = 0, device=None) -> Tensor:
    """A dropout key: an int64 tensor (2,), two 32-bit words mixed from (seed, counter).

    Arguments:
        seed: any integer (a run's seed).
        counter: any integer, a new one for every step.
        device: where the key lives (default: the CPU; a step moves it where it is needed).

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


def keep_mask(key: Tensor, stream: int, shape: tuple[int, int], p: float, dtype) -> Tensor:
    """The (m, n) 0/1 mask of kept units for ``stream`` under ``key``, in ``dtype``:
    bits = hash(hash(position ^ key₀ ^ salt(stream)) ^ key₁), kept where bits ≥ p·2³²."""
    salt = _hash32((stream * _GOLDEN + 1) & _MASK32)
    index = torch.arange(shape[0] * shape[1], device=key.device, dtype=torch.int64)
    bits = _hash32(_hash32(index ^ (key[0] ^ salt)) ^ key[1]).reshape(shape)
    return (bits >= int(p * 2**32)).to(dtype)


@dataclasses.dataclass(frozen=True)
class Dropout(Primitive):
    """Zero each unit with probability ``p`` while training and scale the rest by 1/(1 - p).

    Arguments:
        p: the drop probability, 0 <= p < 1.
        stream: which masks it draws; ``MLP`` sets it to the primitive's position, so that two
            dropout layers of one network draw independent masks.

    Masks come from ``Context.key``; without a key, or in evaluation, it is the identity.
    """

    p: float = 0.5
    stream: int | None = None
    uses_key = True

    def __post_init__(self):
        if isinstance(self.p, bool) or not isinstance(self.p, numbers.Real) \
                or not 0 <= self.p < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.p!r}")
        object.__setattr__(self, "p", float(self.p))

    def forward(self, params, x, state, context):
        if not context.train or context.key is None or self.p == 0:
            return x, None, state
        scaled_mask = keep_mask(context.key, self.stream or 0, tuple(x.shape), self.p,
                                x.dtype) * (1 / (1 - self.p))
        return x * scaled_mask, scaled_mask, state

    def backward(self, params, scaled_mask, dy, need_input_grad=True):
        return (dy if scaled_mask is None else dy * scaled_mask), ()
