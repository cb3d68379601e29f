"""Optimizer updates through torch's fused CPU kernels, chosen by the caller.

``Optimizer.unchecked_update(..., fused=True)`` runs an Adam/AdamW or momentum-SGD update as one
call of ``torch._fused_adam_``, ``torch._fused_adamw_`` or ``torch._fused_sgd_`` (the kernels
behind ``torch.optim``'s ``fused=True``) over every leaf at once, on fresh contiguous copies of
the parameters and buffers: nothing passed in changes.

Why it is faster: the per-leaf formulas are ~10 torch operations per leaf, each paying ~4-5 µs of
dispatch on the CPU; on a small network that dispatch is most of the update. One kernel call
walks all leaves' memory in one pass. Measured on the digits network (64-100-10, float32, one
thread): an eager Adam update ~230 µs -> ~90 µs (the copies included).

When it is exact: the kernels compute the same update as the per-leaf formulas (and as
``torch.optim``) in a different order of operations, so the two agree within rounding: ~1e-16
relative per step in float64, ~1e-7 in float32 (tests/optim/test_fused.py), not bit for bit.
Plain SGD is never fused: its per-leaf formula is one fused multiply-add, bit-identical to
``torch.optim.SGD``.

When it applies (``fusable``): decided from the tensors alone -- every parameter and gradient a
plain ``torch.Tensor`` (no subclass) on the CPU, contiguous (the kernels walk raw memory and
ignore strides), all of one dtype, float32 or float64, and none requiring grad while grad mode
is on (the kernels record no autograd history). Otherwise the caller's formulas run, silently.

What it cannot see, and so the caller must: the kernels read the learning rate and the step as
Python numbers (``.item()``) and have no batching rule, so ``fused=True`` is only for code that
runs eagerly -- never under ``torch.compile``, ``make_fx``, ``torch.jit.trace`` or ``torch.func``
transforms (``vmap``), which take ``fused=False`` and trace the per-leaf formulas.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fnmlp._tree import flatten

KERNELS_AVAILABLE = all(hasattr(torch, kernel) for kernel in
                        ("_fused_adam_", "_fused_adamw_", "_fused_sgd_"))
_DTYPES = (torch.float32, torch.float64)


def fusable(params, grads) -> tuple[list[Tensor], object, list[Tensor]] | None:
    """``(leaves, spec, grad_leaves)`` of ``params`` and ``grads`` when the fused kernels can
    take them (see the module docstring), else None. Looks at the tensors only."""
    if not KERNELS_AVAILABLE:
        return None
    leaves, spec = flatten(params)
    grad_leaves = flatten(grads)[0]
    if not leaves or len(grad_leaves) != len(leaves):
        return None
    dtype = leaves[0].dtype
    if dtype not in _DTYPES:
        return None
    recording = torch.is_grad_enabled()
    for t in leaves + grad_leaves:
        if (type(t) is not Tensor or t.dtype != dtype or not t.is_cpu or not t.is_contiguous()
                or (recording and t.requires_grad)):
            return None
    return leaves, spec, grad_leaves


def contiguous_copies(tree) -> list[Tensor]:
    """Fresh contiguous copies of ``tree``'s leaves (what the fused kernels update in place)."""
    return [t.clone(memory_format=torch.contiguous_format) for t in flatten(tree)[0]]


def sgd_momentum(leaves: list[Tensor], grad_leaves: list[Tensor], momentum_buffer, *,
                 lr: float, momentum: float, dampening: float, weight_decay: float,
                 nesterov: bool, maximize: bool, first_step: bool
                 ) -> tuple[list[Tensor], list[Tensor]]:
    """``(new_params, new_buffers)`` leaf lists after one momentum-SGD update
    (``torch.optim.SGD(fused=True)``'s kernel) on copies of ``leaves`` and ``momentum_buffer``
    (a tree structured like the parameters)."""
    params, buffers = contiguous_copies(leaves), contiguous_copies(momentum_buffer)
    torch._fused_sgd_(params, grad_leaves, buffers, weight_decay=weight_decay,
                      momentum=momentum, lr=lr, dampening=dampening, nesterov=nesterov,
                      maximize=maximize, is_first_step=first_step)
    return params, buffers


def adam(leaves: list[Tensor], grad_leaves: list[Tensor], exp_avg, exp_avg_sq,
         max_exp_avg_sq, step: Tensor, *, lr: float, betas: tuple[float, float], eps: float,
         weight_decay: float, amsgrad: bool, decoupled: bool, maximize: bool
         ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """``(new_params, exp_avg, exp_avg_sq, max_exp_avg_sq)`` leaf lists after one Adam update
    (AdamW's with ``decoupled``; ``torch.optim.Adam(fused=True)``'s kernel) on copies of
    ``leaves`` and the buffers (trees structured like the parameters; ``max_exp_avg_sq`` None
    without amsgrad, and then ``[]`` is returned for it). ``step``: the new step count, 0-d."""
    params = contiguous_copies(leaves)
    m, v = contiguous_copies(exp_avg), contiguous_copies(exp_avg_sq)
    v_max = contiguous_copies(max_exp_avg_sq) if amsgrad else []
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    kernel(params, grad_leaves, m, v, v_max, [step] * len(params), lr=lr, beta1=betas[0],
           beta2=betas[1], weight_decay=weight_decay, eps=eps, amsgrad=amsgrad,
           maximize=maximize)
    return params, m, v, v_max
