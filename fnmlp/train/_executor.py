"""Running one kind of step: its pure function eagerly, or compiled through the one graph cache.

Every kind of training step (one network, an ensemble, a data-parallel shard) is a pure
function ``f(carry, *data) -> (carry, loss)`` over trees, made by the kind for a choice of
``Kernels`` and a data layout. The ``Executor`` runs it, the same way for every kind:

- eagerly with the kind's eager kernels, or compiled (``fnmlp.train._compile``) over flat
  tensors with the traced kernels, its graphs kept in the shared cache under the kind's
  identity, a short batch zero-padded (weight 0) to a batch size compiled already;
- on the thread count ``threads`` chooses (``fnmlp.train._threads``), with denormals flushed in
  a compiled CPU step on one thread (``fnmlp.train._denormals``);
- with ``verify``: its first compiled call checked against the eager function;
- reusing what it returned last: trees passed back by identity are not flattened again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from fnmlp._tree import flatten, tree_builder
from fnmlp.train import _compile
from fnmlp.train._denormals import flushed_denormals
from fnmlp.train._threads import StepThreads


class Kernels(NamedTuple):
    """How a step computes, chosen by whoever runs it (never read from ambient state).

    ``lane_order_sums``: softmax's row sums in the CPU kernel's SIMD lane order, bit-identical
    to autograd (``fnmlp.nn._rowsum``); ``fused_optimizer``: torch's fused CPU optimizer
    kernels where the tensors allow (``fnmlp.optim._fused``)."""

    lane_order_sums: bool
    fused_optimizer: bool


EAGER = Kernels(lane_order_sums=True, fused_optimizer=True)  # one network, bit-identical
BATCHED = Kernels(lane_order_sums=True, fused_optimizer=False)  # under vmap: no fused kernel
TRACED = Kernels(lane_order_sums=False, fused_optimizer=False)  # what a compiler fuses


class Carry(NamedTuple):
    """What a step carries to the next: parameters, optimizer state, model state."""

    params: object
    opt_state: object
    state: object


StepFunction = Callable[..., tuple]  # (carry, *data) -> (carry, loss)


class Executor:
    """Runs the pure step function of one kind of step (see the module docstring).

    Arguments:
        identity: what the function depends on besides its inputs (kind, model, loss,
            optimizer structure, options): the key of its graphs in the shared cache.
        make: ``make(kernels, layout) -> f(carry, *data) -> (carry, loss)``; ``layout`` is a
            tuple with ``(dim, dtype)`` of each data item (None where absent).
        row_axes: ``row_axes(layout)``: the axis of each data item that holds the batch's rows
            (None: not padded), for zero-padding a short batch in a compiled graph.
        compile, compiler, verify, cuda_graphs: as ``fnmlp.train_step``.
        threads, model, members: the thread choice (``"auto"`` or a count) and what it
            measures a step by.
        eager_kernels: the kernels of the eager function (``EAGER``, or ``BATCHED`` under
            ``vmap``).
        flush_denormals: flush denormals in a compiled CPU step on one thread.
        stateless: the model keeps no state (no tensors in it): the caller's state object
            is passed back as it is, so that the carry returned is known by identity.
    """

    def __init__(self, identity: tuple, make: Callable[[Kernels, tuple], StepFunction],
                 row_axes: Callable[[tuple], tuple], *, compile: bool, compiler: str = "auto",
                 verify: bool = False, cuda_graphs: bool | None = False, threads="auto",
                 model=None, members: int = 1, eager_kernels: Kernels = EAGER,
                 flush_denormals: bool = True, stateless: bool = False):
        self.identity, self.make, self.row_axes = identity, make, row_axes
        self.compiled = bool(compile)
        self.compiler, self.cuda_graphs = compiler, cuda_graphs
        self.eager_kernels, self.flush_denormals = eager_kernels, bool(flush_denormals)
        self.stateless = stateless
        self.threads = StepThreads(threads, model, members=members)
        self.graphs = _compile.shared_graphs(identity) if self.compiled else None
        self._verify_next = bool(verify) and self.compiled
        self._eager: dict[tuple, StepFunction] = {}
        self._ones: dict[tuple, Tensor] = {}
        self._last_graph: tuple = (None, None, None)  # (spec, data signature, graph)
        self.forget()

    # --- what was returned last -----------------------------------------------------------

    def forget(self) -> None:
        """Drop the references to the last outputs (kept so that passing them back is free)."""
        self._last_carry: tuple = (None, None, None)
        self._last_leaves, self._last_spec, self._last_build, self.last_like = (None, None,
                                                                                None, None)

    def knows(self, carry) -> bool:
        """Whether ``carry`` is (by identity) what the last call returned: known valid."""
        last = self._last_carry
        return carry[0] is last[0] and carry[1] is last[1] and carry[2] is last[2]

    # --- running --------------------------------------------------------------------------

    def __call__(self, carry: Carry, data: list, rows: int, pad_to: int | None = None):
        """``(carry, loss)`` after one step on ``data`` (the kind's data items, None where
        absent; ``rows``: the batch's rows, which choose the thread count)."""
        device = data[0].device
        with self.threads(max(rows, pad_to or 0), device):
            if not self.compiled:
                return self._run_eager(carry, data)
            return self._run_compiled(carry, data, rows, pad_to, device)

    def eager_function(self, layout: tuple) -> StepFunction:
        function = self._eager.get(layout)
        if function is None:
            function = self._eager[layout] = self.make(self.eager_kernels, layout)
        return function

    def _run_eager(self, carry: Carry, data: list):
        layout = tuple(None if t is None else (t.dim(), t.dtype) for t in data)
        with torch.no_grad():
            new, loss = self.eager_function(layout)(carry, *data)
        new = Carry(new[0], new[1], carry.state if self.stateless else new[2])
        self._last_carry, self.last_like = new, data[0]
        return new, loss

    def _run_compiled(self, carry: Carry, data: list, rows: int, pad_to, device):
        original = data
        data = self._graph_data(data, rows, pad_to)
        if self.knows(carry) and self._last_leaves is not None:
            leaves, spec, build = self._last_leaves, self._last_spec, self._last_build
            own = True
        else:
            leaves, spec = flatten(tuple(carry))
            build, own = tree_builder(spec), False
        # A CPU graph is specialized on the thread count too (inductor's kernels are).
        signature = (*[None if t is None else (t.shape, t.dtype) for t in data],
                     torch.get_num_threads(), device)
        graph, hit = None, False
        if own:  # the last graph by identity first: hashing a spec costs ~8 µs
            last_spec, last_signature, last_graph = self._last_graph
            hit = last_spec is spec and last_signature == signature
            graph = last_graph if hit else self.graphs.by_data.get((spec, signature))
        if graph is None:
            if not all(leaf.is_contiguous() for leaf in leaves):
                leaves = [leaf.contiguous() for leaf in leaves]
            specialization = (spec, *signature, *[(leaf.shape, leaf.dtype) for leaf in leaves])
            graph = self.graphs.by_specialization.get(specialization)
            if graph is None:
                graph = self._compile(spec, leaves, data, specialization)
        if not hit:
            self.graphs.by_data[(spec, signature)] = graph
            self._last_graph = (spec, signature, graph)
        args = [*leaves, *[t for t in data if t is not None]]
        graphs = self._uses_cuda_graphs(device)
        flush = self.flush_denormals and device.type == "cpu" and torch.get_num_threads() == 1
        with torch.no_grad(), flushed_denormals(flush):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            outputs = graph(*args)
        outputs = _compile.copy_out_of_graph_pool(outputs) if graphs else list(outputs)
        if self._verify_next:
            self._verify(carry, original, outputs)
        leaves = outputs[:-1]
        params, opt_state, state = build(leaves)
        new = Carry(params, opt_state, carry.state if self.stateless else state)
        self._last_carry, self.last_like = new, data[0]
        self._last_leaves, self._last_spec, self._last_build = leaves, spec, build
        return new, outputs[-1]

    def _graph_data(self, data: list, rows: int, pad_to: int | None) -> list:
        """The data as a graph takes it: row weights always present (ones), a short batch
        zero-padded to a compiled batch size, contiguous."""
        x = data[0]
        target = self.graphs.padding.size_for(max(rows, pad_to or 0), x.dtype, x.device)
        if data[2] is None:  # the row weights: the third item of every kind
            data = [*data[:2], self._weights(rows, target, x.dtype, x.device), *data[3:]]
        if target > rows:
            layout = tuple(None if t is None else (t.dim(), t.dtype) for t in data)
            data = [t if axis is None or t is None else _compile.pad_rows(t, target, axis)
                    for t, axis in zip(data, self.row_axes(layout))]
        if not all(t is None or t.is_contiguous() for t in data):
            data = [None if t is None else t.contiguous() for t in data]
        return data

    def _weights(self, rows: int, target: int, dtype, device) -> Tensor:
        """(target,) weights, 1 for the ``rows`` real rows and 0 for padding; made once."""
        ones = self._ones.get((rows, target, dtype, device))
        if ones is None:
            ones = torch.zeros(target, dtype=dtype, device=device)
            ones[:rows] = 1
            self._ones[(rows, target, dtype, device)] = ones
        return ones

    def _uses_cuda_graphs(self, device: torch.device) -> bool:
        return (device.type == "cuda" and self.cuda_graphs is not False
                and _compile.resolve_compiler(self.compiler, device) == "dynamo")

    def _compile(self, spec, leaves: list, data: list, specialization: tuple):
        layout = tuple(None if t is None else (t.dim(), t.dtype) for t in data)
        present = [t is not None for t in data]
        function = flat_function(self.make(TRACED, layout), spec, len(leaves), present)
        args = [*leaves, *[t for t in data if t is not None]]
        with torch.no_grad():
            graph = _compile.compile_graph(
                function, args, compiler=_compile.resolve_compiler(self.compiler,
                                                                  args[0].device),
                cuda_graphs=self._uses_cuda_graphs(args[0].device))
        self.graphs.by_specialization[specialization] = graph
        return graph

    def _verify(self, carry: Carry, data: list, outputs: list) -> None:
        layout = tuple(None if t is None else (t.dim(), t.dtype) for t in data)
        with torch.no_grad():
            new, loss = self.eager_function(layout)(carry, *data)
        _compile.verify(outputs, [*flatten(tuple(new))[0], loss])
        self._verify_next = False


def flat_function(function: StepFunction, spec, count: int, present: list[bool]):
    """``function`` over flat tensors: ``(*leaves, *data) -> (*leaves, loss)``, the ``count``
    leaves laid out by ``spec``, the data items where ``present`` (absent ones are None)."""
    build = tree_builder(spec)

    def fnmlp_train_step(*args):
        given = iter(args[count:])
        data = [next(given) if here else None for here in present]
        new, loss = function(Carry(*build(list(args[:count]))), *data)
        return (*flatten(tuple(new))[0], loss)

    return _compile.with_own_code(fnmlp_train_step)
