"""Running one kind of step: its pure function eagerly, or compiled through the one graph cache.

Every kind of training step (one network, an ensemble, a data-parallel shard) is a pure
function ``f(carry, *data) -> (carry, loss)`` over trees, made by the kind for a choice of
``Kernels`` and a data layout. The ``Executor`` runs it, the same way for every kind:

- eagerly with the kind's eager kernels, or compiled (``fnmlp.train._compile``) over flat
  tensors with the traced kernels, its graphs kept in the shared cache under the kind's
  identity, a short batch zero-padded (weight 0) to a batch size compiled already; on CUDA
  each graph is captured by fnmlp (``fnmlp.train._cuda_graph``): one launch per call;
- one step per call, or a chunk of N steps (``run_chunk``): compiled, one graph of the N
  steps chained (the data items that differ between steps stacked), its losses returned as
  one (N, ...) tensor;
- on the thread count ``threads`` chooses (``fnmlp.train._threads``), with denormals flushed in
  a compiled CPU step on one thread (``fnmlp.train._denormals``);
- with ``verify``: its first compiled call checked against the eager function;
- reusing what it returned last: trees passed back by identity are not flattened again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor

from fnmlp._tree import flatten, tree_builder
from fnmlp.train import _compile
from fnmlp.train._denormals import flushed_denormals
from fnmlp.train._threads import StepThreads


class Kernels(NamedTuple):
    """How a step computes, chosen by whoever runs it (never read from ambient state).

    ``lane_order_sums``: softmax's backward through autograd's own ATen kernels, bit-identical
    to autograd (``fnmlp.nn._rowsum``; off: the plain formula, which a compiler fuses);
    ``fused_optimizer``: torch's fused CPU optimizer
    kernels where the tensors allow (``fnmlp.optim._fused``)."""

    lane_order_sums: bool
    fused_optimizer: bool


EAGER = Kernels(lane_order_sums=True, fused_optimizer=True)  # one network, bit-identical
BATCHED = Kernels(lane_order_sums=True, fused_optimizer=False)  # under vmap: no fused kernel
TRACED = Kernels(lane_order_sums=False, fused_optimizer=False)  # what a compiler fuses


class Carry(NamedTuple):
    """What a step carries to the next: parameters, optimizer state, model state (pytrees,
    each of the kind the step kind's own functions take)."""

    params: Any
    opt_state: Any
    state: Any


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
        compile, compiler, verify, cuda_graphs: as ``fnmlp.train_step`` (``verify`` checks
            the first compiled call, a whole chunk's steps included).
        threads, model, members: the thread choice (``"auto"`` or a count) and what it
            measures a step by.
        eager_kernels: the kernels of the eager function (``EAGER``, or ``BATCHED`` under
            ``vmap``).
        flush_denormals: flush denormals in a compiled CPU step on one thread.
        stateless: the model keeps no state (no tensors in it): the caller's state object
            is passed back as it is, so that the carry returned is known by identity.
    """

    # what was returned last (``forget``): the carry, its leaves, their spec and the builder
    # of the spec's tree (set together; None once forgotten), and the data's first tensor
    _last_carry: tuple
    _last_leaves: list | None
    _last_spec: object
    _last_build: Any
    last_like: Tensor | None

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
        self._stacked_ones: dict[tuple, Tensor] = {}
        self._own_ids: set[int] = set()
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
        with self.threads(max(rows, pad_to or 0), device) as count:
            if not self.compiled:
                return self._run_eager(carry, data)
            return self._run_compiled(carry, [data], [rows], pad_to, device, count, chunk=False)

    def run_chunk(self, carry: Carry, steps: list[list], rows: list[int],
                  pad_to: int | None = None):
        """``(carry, losses)`` after ``len(steps)`` steps in order (each a data list as for
        ``__call__``), ``losses`` stacked ((N, ...)): compiled, one graph of N steps (on CUDA
        one replay); eager, the steps one by one (bit-identical to calling them so)."""
        device = steps[0][0].device
        with self.threads(max(max(rows), pad_to or 0), device) as count:
            if not self.compiled:
                losses = []
                for data in steps:
                    carry, loss = self._run_eager(carry, data)
                    losses.append(loss)
                return carry, torch.stack(losses)
            return self._run_compiled(carry, steps, rows, pad_to, device, count, chunk=True)

    def eager_function(self, layout: tuple) -> StepFunction:
        function = self._eager.get(layout)
        if function is None:
            function = self._eager[layout] = self.make(self.eager_kernels, layout)
        return function

    def _run_eager(self, carry: Carry, data: list):
        layout = _layout(data)
        with torch.no_grad():
            new, loss = self.eager_function(layout)(carry, *data)
        new = Carry(new[0], new[1], carry.state if self.stateless else new[2])
        self._last_carry, self.last_like = new, data[0]
        return new, loss

    def _run_compiled(self, carry: Carry, steps: list[list], rows: list[int], pad_to,
                      device, threads: int, *, chunk: bool):
        """The compiled step (or chunk) on ``threads`` intra-op threads: the count the block
        around it set, which its graph is specialized on (never read from torch here, so that
        nothing another thread does picks another graph)."""
        graphs = cast(_compile.Graphs, self.graphs)  # a compiled executor's: never None
        x = steps[0][0]
        target = graphs.padding.size_for(max(max(rows), pad_to or 0), x.dtype, device)
        prepared = [self._graph_data(data, count, target) for data, count in zip(steps, rows)]
        form, data = None, prepared[0]
        if chunk:  # items that differ between the steps are stacked, the others passed once
            varying = tuple(item is not None and any(p[i] is not item for p in prepared)
                            for i, item in enumerate(data))
            data = [self._stacked([p[i] for p in prepared]) if vary else item
                    for i, (item, vary) in enumerate(zip(data, varying))]
            form = (len(steps), varying)
        if self.knows(carry) and self._last_leaves is not None:
            leaves, spec, build = self._last_leaves, self._last_spec, self._last_build
            own = True
        else:
            leaves, spec = flatten(tuple(carry))
            build, own = tree_builder(spec), False
        # A CPU graph is specialized on the thread count too (inductor's kernels are).
        signature = (form, *[None if t is None else (t.shape, t.dtype) for t in data],
                     threads, device)
        graph, hit = None, False
        if own:  # the last graph by identity first: hashing a spec costs ~8 µs
            last_spec, last_signature, last_graph = self._last_graph
            hit = last_spec is spec and last_signature == signature
            graph = last_graph if hit else graphs.by_data.get((spec, signature))
        if graph is None:
            if not all(leaf.is_contiguous() for leaf in leaves):
                leaves = [leaf.contiguous() for leaf in leaves]
            specialization = (spec, *signature, *[(leaf.shape, leaf.dtype) for leaf in leaves])
            graph = graphs.by_specialization.get(specialization)
            if graph is None:
                graph = self._compile(spec, leaves, data, _layout(prepared[0]), form,
                                      specialization, threads)
        if not hit:
            graphs.by_data[(spec, signature)] = graph
            self._last_graph = (spec, signature, graph)
        args = [*leaves, *[t for t in data if t is not None]]
        flush = self.flush_denormals and device.type == "cpu" and threads == 1
        with torch.no_grad(), flushed_denormals(flush):
            outputs = list(graph(*args))
        if self._verify_next:
            self._verify(carry, steps, outputs, chunk)
        leaves = outputs[:-1]
        params, opt_state, state = build(leaves)
        new = Carry(params, opt_state, carry.state if self.stateless else state)
        self._last_carry, self.last_like = new, x
        self._last_leaves, self._last_spec, self._last_build = leaves, spec, build
        return new, outputs[-1]

    def _graph_data(self, data: list, rows: int, target: int) -> list:
        """The data as a graph takes it: row weights always present (ones), a short batch
        zero-padded to ``target`` rows (a batch size compiled already), contiguous."""
        x = data[0]
        if data[2] is None:  # the row weights: the third item of every kind
            data = [*data[:2], self._weights(rows, target, x.dtype, x.device), *data[3:]]
        if target > rows:
            data = [t if axis is None or t is None else _compile.pad_rows(t, target, axis)
                    for t, axis in zip(data, self.row_axes(_layout(data)))]
        if not all(t is None or t.is_contiguous() for t in data):
            data = [None if t is None else t.contiguous() for t in data]
        return data

    def _stacked(self, items: list[Tensor]) -> Tensor:
        """``items`` stacked; the executor's own constants (the row weights made by
        ``_weights``) stacked once per pattern."""
        key = tuple(id(item) for item in items)
        if not self._own_ids.issuperset(key):  # ids of tensors kept alive in ``_ones``
            return torch.stack(items)
        stacked = self._stacked_ones.get(key)
        if stacked is None:
            stacked = self._stacked_ones[key] = torch.stack(items)
        return stacked

    def _weights(self, rows: int, target: int, dtype, device) -> Tensor:
        """(target,) weights, 1 for the ``rows`` real rows and 0 for padding; made once."""
        ones = self._ones.get((rows, target, dtype, device))
        if ones is None:
            ones = torch.zeros(target, dtype=dtype, device=device)
            ones[:rows] = 1
            self._ones[(rows, target, dtype, device)] = ones
            self._own_ids.add(id(ones))
        return ones

    def _compile(self, spec, leaves: list, data: list, layout: tuple, form, specialization,
                 threads: int):
        """The graph of one step (``form`` None) or of a chunk (``(steps, varying)``), its CPU
        kernels built for ``threads`` threads."""
        present = [t is not None for t in data]
        function = self.make(TRACED, layout)
        flat = (flat_function(function, spec, len(leaves), present) if form is None else
                flat_chunk_function(function, spec, len(leaves), present, *form))
        args = [*leaves, *[t for t in data if t is not None]]
        device = args[0].device
        with torch.no_grad():
            graph = _compile.compile_graph(
                flat, args, compiler=self.compiler,
                cuda_graphs=device.type == "cuda" and self.cuda_graphs is not False,
                carried=len(leaves), threads=threads)
        cast(_compile.Graphs, self.graphs).by_specialization[specialization] = graph
        return graph

    def _verify(self, carry: Carry, steps: list[list], outputs: list, chunk: bool) -> None:
        """Check a compiled call's outputs against the eager steps (all of a chunk's)."""
        losses = []
        with torch.no_grad():
            for data in steps:
                new, loss = self.eager_function(_layout(data))(carry, *data)
                carry = Carry(*new)
                losses.append(loss)
        loss = torch.stack(losses) if chunk else losses[0]
        _compile.verify(outputs, [*flatten(tuple(carry))[0], loss])
        self._verify_next = False


def _layout(data: list) -> tuple:
    """Each data item's ``(dim, dtype)`` (None where absent): what a step function is made
    for."""
    return tuple(None if t is None else (t.dim(), t.dtype) for t in data)


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


def flat_chunk_function(function: StepFunction, spec, count: int, present: list[bool],
                        steps: int, varying: tuple):
    """``steps`` steps of ``function`` chained, over flat tensors: ``(*leaves, *data) ->
    (*leaves, losses)``; the data items where ``varying`` are stacked per step ((steps, ...)),
    the others shared by every step; ``losses`` (steps, ...)."""
    build = tree_builder(spec)

    def fnmlp_train_chunk(*args):
        given = iter(args[count:])
        items = [next(given) if here else None for here in present]
        carry, losses = Carry(*build(list(args[:count]))), []
        for index in range(steps):
            data = [item[index] if vary else item for item, vary in zip(items, varying)]
            new, loss = function(carry, *data)
            carry = Carry(*new)
            losses.append(loss)
        return (*flatten(tuple(carry))[0], torch.stack(losses))

    return _compile.with_own_code(fnmlp_train_chunk)
