"""The one protocol every building block follows (the affine map, each activation, the norms,
dropout): a hashable, static description with four pure functions.

    init(generator, n_in, dtype, device) -> (n_out, params)
    init_state(n_in, dtype, device)      -> state
    forward(params, x, state, context)   -> (y, residual, new_state)
    backward(params, residual, dy, need_input_grad=True) -> (dx, dparams)

``x`` is (m, n_in) and ``y`` (m, n_out). ``params`` and ``state`` are pytrees of tensors (``()``
for a primitive with none); ``forward`` never mutates ``state``, it returns the new one.
``residual`` is whatever ``backward`` needs, kept by the caller between the two passes; ``dy``
is the loss's cotangent of ``y`` and ``backward`` returns those of ``x`` (None when
``need_input_grad`` is false: the first layer's is never needed) and of ``params``, structured
like ``params``. ``MLP`` composes primitives in series: one forward loop, one reverse loop.

fnmlp's own primitives register themselves (``fnmlp._registry``) as they are defined; a user's
is made savable, loadable and twinnable by one call of ``fnmlp.register`` (in every process
that saves or loads it), and its backward is checked against finite differences and autograd
by ``fnmlp.testing.check_primitive(primitive, x)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from fnmlp._registry import add_own


class Context(NamedTuple):
    """What one call of a network tells each of its primitives.

    ``train``: training mode (batch statistics, dropout) or evaluation mode (running
    statistics, no dropout). ``key``: the dropout key of this step (``fnmlp.dropout_key``), or
    None for no dropout. ``row_weight``: (m,) weights of the rows, or None for all equal; rows
    of weight 0 (padding) must not influence the other rows (batch statistics skip them).
    ``lane_order_sums``: a backward that sums rows (softmax's, log-softmax's) runs autograd's own
    kernel, which adds in the SIMD lane order of the CPU (bit-identical to autograd on every
    CPU and device; ``fnmlp.nn._rowsum``); False for plain sums, which a step traced to be
    compiled takes. A primitive reads it in ``forward`` and keeps it in its residual for
    ``backward``.
    """

    train: bool = True
    key: Tensor | None = None
    row_weight: Tensor | None = None
    lane_order_sums: bool = True


EVAL = Context(train=False)


@dataclasses.dataclass(frozen=True)
class Primitive:
    """Base class of the building blocks; subclasses are frozen dataclasses (hashable specs).

    Defaults describe a parameterless, stateless, width-preserving primitive; override what
    differs. ``uses_key`` marks primitives that draw randomness from ``Context.key``;
    ``min_training_rows`` is how many rows of non-zero weight a training batch needs;
    ``penalized`` names the params fields an L2 penalty (scikit-learn's ``alpha``) applies to.
    """

    uses_key: ClassVar[bool] = False
    min_training_rows: ClassVar[int] = 1
    penalized: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, abstract: bool = False, **kwargs):
        """Register fnmlp's own primitives by class name; ``abstract=True`` marks a base class
        (``Activation``), which is no spec."""
        super().__init_subclass__(**kwargs)
        if not abstract:
            add_own(cls, "primitive")

    def out_features(self, n_in: int) -> int:
        """The output width for an input width ``n_in``."""
        return n_in

    def init(self, generator: torch.Generator, n_in: int, dtype: torch.dtype,
             device: torch.device) -> tuple[int, Any]:
        """``(n_out, params)``: fresh parameters drawn from ``generator``."""
        return self.out_features(n_in), ()

    def init_state(self, n_in: int, dtype: torch.dtype, device: torch.device) -> Any:
        """The initial state (running statistics); ``()`` for a stateless primitive."""
        return ()

    def forward(self, params, x: Tensor, state, context: Context) -> tuple[Tensor, Any, Any]:
        """``(y (m, n_out), residual, new_state)`` for ``x`` (m, n_in); pure."""
        raise NotImplementedError

    def backward(self, params, residual, dy: Tensor, need_input_grad: bool = True
                 ) -> tuple[Tensor | None, Any]:
        """``(dx (m, n_in) or None, dparams shaped like params)`` for ``dy`` (m, n_out)."""
        raise NotImplementedError
