"""Denormal floats flushed to zero inside a compiled CPU step, as XLA does by default.

Values below the smallest normal float (~1.2e-38 in float32, ~2.2e-308 in float64) take a
slow microcode path on x86 CPUs, ~100x slower per operation. Saturated sigmoids and softmaxes
produce them in training: the seed network trained on one batch in float32 reaches them within
a few hundred steps, and its compiled step then takes 775 µs instead of 241 µs on one thread
(measured side by side; JAX's step, whose XLA kernels flush denormals, does not slow down).

A compiled step already agrees with the eager step only to rounding (1e-13 relative), and
flushing changes values by less than the smallest normal float, so compiled CPU steps flush
denormals to zero (FTZ/DAZ, ``torch.set_flush_denormal``) for their own duration when they run
on one thread (the mode is per thread: on several threads only the calling one would flush).
The eager step never does: it stays bit-identical to the ``nn.Module`` twin. The mode is put
back after the step; a mode the caller set is left as it is.
"""

from __future__ import annotations

import contextlib
import struct

import torch

# The smallest float64 denormal, made from its bits (no floating-point conversion that a
# flushing thread could flush). Python's float arithmetic runs on the calling thread's FPU mode,
# so multiplying it by one is a probe of that mode without any tensor work (~0.1 µs).
_SMALLEST = struct.unpack("<d", struct.pack("<q", 1))[0]
_ONE = 1.0
_UNCHANGED = contextlib.nullcontext()


def flushing() -> bool:
    """Whether this thread flushes denormals now (a denormal times one gives zero)."""
    return _SMALLEST * _ONE == 0.0


class _Flushed:
    """Flush for the block, then stop (entered once per compiled step: a class, no generator)."""

    def __enter__(self):
        self.was_set = torch.set_flush_denormal(True)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.was_set:
            torch.set_flush_denormal(False)


def flushed_denormals(enabled: bool = True):
    """Denormals flushed to zero in this thread for the block (where the CPU supports it), then
    the mode put back; a no-op when ``enabled`` is false or the thread flushes already."""
    return _Flushed() if enabled and not flushing() else _UNCHANGED
