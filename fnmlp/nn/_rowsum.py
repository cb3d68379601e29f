"""The row sums of softmax's and log-softmax's backward: autograd's own kernels, or plain sums.

Softmax's backward needs ``sum_j(g_ij * a_ij)`` per row, log-softmax's ``sum_j g_ij``.
PyTorch's vectorized CPU kernels add a row in SIMD lanes, as many as the CPU capability ATen
dispatches to holds (``torch.backends.cpu.get_cpu_capability()``: 4 doubles for AVX2, 8 for
AVX512; the ``ATEN_CPU_CAPABILITY`` environment variable can lower it), the tail folded into
the first lanes, the lanes added at the end. A plain ``sum`` adds in another order, so it
differs from autograd's in the last bits, and a chaotic training run then parts from its
``nn.Module`` twin.

The caller chooses (``exact``; the primitives take it from ``Context.lane_order_sums`` in their
forward and keep it in their residual):

- True: the backward is autograd's own ATen kernel (``aten._softmax_backward_data``,
  ``aten._log_softmax_backward_data``: what the derivatives of ``torch.softmax`` and
  ``torch.log_softmax`` call), so it is bit-identical to autograd on every CPU capability,
  device, dtype and torch version by construction, with no table of lane orders to keep up.
  (Until now the lane order was emulated per capability, for AVX2 and AVX512 only.) Under
  ``vmap`` (ensembles) the kernels' batching rules give each member's rows what they give alone
  (tested).
- False: plain tensor math, the formulas in the primitives' docstrings with one
  ``sum(dim=1, keepdim=True)``: what a step traced to be compiled holds, which a compiler fuses.
"""

from __future__ import annotations

import torch
from torch import Tensor


def softmax_backward(da: Tensor, a: Tensor, exact: bool) -> Tensor:
    """``dz = (da - sum_j da_j a_j) * a`` for ``a = softmax(z, dim=1)``, 2-D.

    ``exact``: autograd's kernel (bit-identical to autograd everywhere); False: plain tensor
    math.
    """
    if exact:
        return torch.ops.aten._softmax_backward_data(da, a, 1, a.dtype)
    return (da - (da * a).sum(dim=1, keepdim=True)) * a


def log_softmax_backward(da: Tensor, a: Tensor, exact: bool) -> Tensor:
    """``dz = da - exp(a) * sum_j da_j`` for ``a = log_softmax(z, dim=1)``, 2-D.

    ``exact``: autograd's kernel (bit-identical to autograd everywhere); False: plain tensor
    math.
    """
    if exact:
        return torch.ops.aten._log_softmax_backward_data(da, a, 1, a.dtype)
    return da - torch.exp(a) * da.sum(dim=1, keepdim=True)
