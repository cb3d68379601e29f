"""Row sums in the order PyTorch's CPU kernels add them.

Softmax's backward needs ``sum_j(g_ij * a_ij)`` per row. PyTorch's vectorized CPU kernel adds the
row in SIMD lanes (one lane per vector slot, the tail folded into the first lanes), then adds the
lanes together. Reproducing that order makes fnmlp's softmax backward bit-identical to autograd's
in eager mode, which keeps long, chaotic training runs identical to the ``nn.Module`` twin.

The caller chooses (``row_sum(products, lane_order)``; the primitives take it from
``Context.lane_order_sums`` in their forward and keep it in their residual): a step that is
traced to be compiled passes False, a plain sum, which differs from autograd's only in the last
bits and which a compiler fuses. Where the order is not known (other devices, other SIMD widths,
other dtypes) the sum is plain whatever was asked.

The order is looked up by ``torch.backends.cpu.get_cpu_capability()`` (what ATen dispatches its
vectorized CPU kernels to: "AVX2", "AVX512", ...; the ``ATEN_CPU_CAPABILITY`` environment
variable can lower it) and the dtype, read once at import.
"""

from __future__ import annotations

import functools

import torch

# (cpu capability, dtype) -> (lanes, how the lanes are added at the end); verified by
# tests/nn/test_row_sums.py and tests/nn/test_primitives.py (bit identity with autograd).
_KNOWN_CPU_ORDERS = {
    ("AVX2", torch.float64): (4, "sequential"),
    ("AVX2", torch.float32): (8, "halving"),
    ("AVX512", torch.float64): (8, "sequential"),
    ("AVX512", torch.float32): (16, "halving"),
}


def _read_cpu_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old or unusual builds
        return "unknown"


_CPU_CAPABILITY = _read_cpu_capability()  # a constant: dynamo traces the lookup below


def _cpu_capability() -> str:
    """The CPU capability ATen's kernels run at, as read at import."""
    return _CPU_CAPABILITY


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


def row_sum(products: torch.Tensor, lane_order: bool) -> torch.Tensor:
    """Sum over dim 1 of a 2-D tensor, keepdim; shape (m, n) -> (m, 1).

    ``lane_order``: add in the SIMD lane order of PyTorch's CPU kernel (bit-identical to
    autograd's softmax backward) where that order is known for this CPU and dtype; False (or an
    unknown order) is a plain ``products.sum(dim=1, keepdim=True)``.
    """
    if lane_order and products.device.type == "cpu" and products.dim() == 2:
        order = _KNOWN_CPU_ORDERS.get((_CPU_CAPABILITY, products.dtype))
        if order is not None:
            return _lanes_sum(products, *order)
    return products.sum(dim=1, keepdim=True)
