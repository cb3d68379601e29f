"""Row sums in the order PyTorch's CPU kernels add them.

Softmax's backward needs ``sum_j(g_ij * a_ij)`` per row. PyTorch's vectorized CPU kernel adds the
row in SIMD lanes (one lane per vector slot, the tail folded into the first lanes), then adds the
lanes together. Reproducing that order makes fnmlp's softmax backward bit-identical to autograd's
in eager mode, which keeps long, chaotic training runs identical to the ``nn.Module`` twin.
Where the order is not known (other devices, other SIMD widths) and in compiled graphs (dynamo's
and fnmlp's own traces, see ``plain_sums``) a plain sum is used: it differs from autograd's only
in the last bits, and a compiler fuses it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

# (cpu capability, dtype) -> (lanes, how the lanes are added at the end); verified by
# tests/test_primitives.py::test_softmax_backward_is_bit_identical_on_cpu.
_KNOWN_CPU_ORDERS = {
    ("AVX2", torch.float64): (4, "sequential"),
    ("AVX2", torch.float32): (8, "halving"),
    ("AVX512", torch.float64): (8, "sequential"),
    ("AVX512", torch.float32): (16, "halving"),
}
_PLAIN = contextvars.ContextVar("fnmlp_plain_row_sums", default=False)


@contextlib.contextmanager
def plain_sums():
    """Within this block ``row_sum`` is a plain sum: for tracing a graph to compile (a bare
    ``make_fx`` does not set ``torch.compiler.is_compiling()``)."""
    token = _PLAIN.set(True)
    try:
        yield
    finally:
        _PLAIN.reset(token)


@functools.cache
def _cpu_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old or unusual builds
        return "unknown"


def _lanes_sum(products: torch.Tensor, lanes: int, finish: str) -> torch.Tensor:
    rows, width = products.shape
    if width == 0:
        return products.new_zeros(rows, 1)
    if width < lanes:  # the kernel reduces a short row lane after lane
        columns = [products[:, i] for i in range(width)]
        return functools.reduce(torch.add, columns).unsqueeze(1)
    full = width - width % lanes
    chunks = products[:, :full].reshape(rows, full // lanes, lanes)
    acc = chunks[:, 0]
    for i in range(1, full // lanes):
        acc = acc + chunks[:, i]
    if width > full:  # the tail is folded into the first lanes
        tail = width - full
        acc = torch.cat([acc[:, :tail] + products[:, full:], acc[:, tail:]], dim=1)
    if finish == "sequential":
        return functools.reduce(torch.add, [acc[:, i] for i in range(lanes)]).unsqueeze(1)
    while acc.shape[1] > 1:  # "halving": lane i += lane i + half, as SIMD shuffles do
        half = acc.shape[1] // 2
        acc = acc[:, :half] + acc[:, half:]
    return acc


def row_sum(products: torch.Tensor) -> torch.Tensor:
    """Sum over dim 1 of a 2-D tensor, keepdim; shape (m, n) -> (m, 1)."""
    if (
        products.device.type == "cpu"
        and products.dim() == 2
        and not torch.compiler.is_compiling()
        and not _PLAIN.get()
    ):
        order = _KNOWN_CPU_ORDERS.get((_cpu_capability(), products.dtype))
        if order is not None:
            return _lanes_sum(products, *order)
    return products.sum(dim=1, keepdim=True)
