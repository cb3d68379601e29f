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

import torch

# The smallest float32 denormal, made from its bits (a float conversion could flush it).
_SMALLEST = torch.tensor([1], dtype=torch.int32).view(torch.float32)


def flushing() -> bool:
    """Whether this thread flushes denormals now (a denormal times one gives zero)."""
    return (_SMALLEST * 1.0).item() == 0.0


@contextlib.contextmanager
def flushed_denormals(enabled: bool = True):
    """Denormals flushed to zero in this thread for the block (where the CPU supports it), then
    the mode put back; a no-op when ``enabled`` is false or the thread flushes already."""
    if not enabled or flushing() or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
