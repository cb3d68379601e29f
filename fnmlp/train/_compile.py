"""The compiled training step: one graph for the manual forward, backward and update.

Imported lazily, by ``fnmlp.train`` only when a step is compiled, so that ``import fnmlp`` loads
no compiler. Its parts, each a small unit:

- ``step_function``: the pure step over flat tensors, ``(*leaves, x, y, weight[, key]) ->
  (*leaves, loss)``; row weights are always present, so padding rows are just weight 0;
- ``compile_graph``: tracing and compiling one graph. On CPU the step is traced once
  (``make_fx`` under a fake mode) and compiled by inductor directly, with a C++ wrapper and no
  dynamo guards (a large share of a small step); that private-API path is one function,
  ``_compile_with_inductor``, with ``torch.compile(..., options=...)`` as its tested fallback.
  On CUDA it is ``torch.compile(mode="reduce-overhead")``: a CUDA graph, one launch per step;
- ``BatchPadding``: which compiled batch size a batch runs at (a short batch is zero-padded to
  one already compiled rather than compiling a graph of its own);
- ``CompiledStep``: the graphs of one (model, loss, optimizer structure, options), keyed by what
  a graph is specialized on (tree structure, shapes, dtypes, device): fnmlp's own guards;
- ``copy_out_of_graph_pool``: CUDA graph outputs live in the graph's pool, which the next
  replay overwrites; one kernel per dtype copies them out so returned parameters stay valid;
- ``verify``: compares a compiled step with the eager step (compilers have miscompiled
  update expressions, see ``../shared/PITFALLS.md``);
- ``shared_compiled_step``: a bounded (LRU) cache of ``CompiledStep`` s, so that a second
  ``fit`` with the same spec reuses its graphs; it holds graphs, never parameters.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import math
import types
import warnings

import torch
from torch import Tensor

from fnmlp._tree import flatten, through_flat_buckets, tree_builder
from fnmlp.nn._model import value_and_grad
from fnmlp.nn._rowsum import plain_sums
from fnmlp.train._errors import CompileVerificationError

_unique = itertools.count()
_PAD_ROWS = 1024  # a direct call pads by at most max(this, its own rows) rather than recompile
_CACHE_SIZE = 16


def step_function(model, loss, optimizer, spec, keyed: bool, l2: float = 0.0):
    """The pure step over flat tensors: ``(*leaves, x, y, weight[, key]) -> (*leaves, loss)``,
    ``leaves`` those of ``(params, opt_state, state)`` laid out by ``spec``."""
    build = tree_builder(spec)

    def fnmlp_train_step(*args):
        key = args[-1] if keyed else None
        *leaves, x, y, weight = args[:-1] if keyed else args
        params, opt_state, state = build(leaves)
        value, grads, state = value_and_grad(model, params, x, y, loss, state, key=key,
                                             weight=weight, l2=l2)
        params, opt_state = optimizer.unchecked_update(params, grads, opt_state)
        leaves, _ = flatten((params, opt_state, state))
        return (*leaves, value)

    return with_own_code(fnmlp_train_step)


def with_own_code(function):
    """``function`` with a code object of its own (a unique name): each step gets its own
    dynamo cache, so steps for different models never count as recompiles of one another."""
    code = function.__code__
    code = code.replace(co_name=f"{code.co_name}_{next(_unique)}")
    return types.FunctionType(code, function.__globals__, code.co_name, None,
                              function.__closure__)


# --- compiling one graph ----------------------------------------------------------------------


def resolve_compiler(compiler: str, device: torch.device) -> str:
    """``compiler``, with "auto" made inductor on the CPU and dynamo elsewhere."""
    if compiler != "auto":
        return compiler
    return "inductor" if device.type == "cpu" else "dynamo"


def compile_graph(function, args: list[Tensor], *, compiler: str, cuda_graphs: bool):
    """``function`` compiled for ``args``: with inductor directly ("inductor"), falling back to
    ``torch.compile`` with the same options where torch's private APIs differ, or with
    ``torch.compile`` ("dynamo"; a CUDA graph with ``cuda_graphs``); "auto" picks by the
    device of ``args``."""
    compiler = resolve_compiler(compiler, args[0].device)
    if compiler == "inductor":
        try:
            return _compile_with_inductor(function, args)
        except (ImportError, AttributeError) as error:
            warnings.warn(f"fnmlp: inductor's private API is not as expected ({error!r}); "
                          "compiling with torch.compile(options=...) instead", RuntimeWarning,
                          stacklevel=3)
            return torch.compile(function, fullgraph=True, dynamic=False,
                                 options=cpu_inductor_options())
    # Dynamo sets is_compiling() while it traces: its graphs use plain row sums too.
    mode = "reduce-overhead" if cuda_graphs else None
    return torch.compile(function, fullgraph=True, dynamic=False, mode=mode)


def _compile_with_inductor(function, args: list[Tensor]):
    """Trace ``function`` once on fake copies of ``args`` and compile it with inductor (with
    ``_inductor_setup``, the one place that uses torch's private compiler APIs).

    Tracing under a fake mode with a shape environment (static shapes) lets inductor's on-disk
    FX graph cache serve a second process; without one it bypasses the cache. The graph's
    wrapper is C++ (``cpp_wrapper``): no Python between kernels (the seed step ~10% faster,
    measured side by side) and two translation units, wrapper and kernels, each built on a
    precompiled header, instead of a shared object per kernel (a cold compile ~40% shorter).
    """
    import torch._inductor

    from fnmlp.train._inductor_setup import cpu_compile

    graph, fake_args = trace(function, args)
    with cpu_compile(cpu_inductor_options()):
        return torch._inductor.compile(graph, fake_args)


def trace(function, args: list[Tensor]):
    """``(graph, fake_args)``: ``function`` traced into an FX graph of aten ops on fake copies
    of ``args``, with plain row sums (no CPU lane-order emulation in a compiled graph)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    fake_args = [fake_mode.from_tensor(arg, static_shapes=True) for arg in args]
    with fake_mode, plain_sums():
        graph = make_fx(function)(*fake_args)
    return graph, fake_args


def cpu_inductor_options() -> dict:
    """Inductor's options for a CPU step: a C++ wrapper, built apart from the kernels where
    this torch can (``cpp_wrapper_build_separate``, torch >= 2.8)."""
    import torch._inductor.config

    options = {"cpp_wrapper": True}
    if hasattr(torch._inductor.config, "cpp_wrapper_build_separate"):
        options["cpp_wrapper_build_separate"] = True
    return options


# --- batches ----------------------------------------------------------------------------------


class BatchPadding:
    """Per (dtype, device), the sorted batch sizes compiled so far; a batch runs at the smallest
    that holds it, unless padding would cost more than a graph of its own."""

    def __init__(self):
        self._sizes: dict[tuple, list[int]] = {}

    def size_for(self, rows: int, dtype: torch.dtype, device: torch.device) -> int:
        sizes = self._sizes.setdefault((dtype, device), [])
        index = bisect.bisect_left(sizes, rows)
        if index < len(sizes) and sizes[index] <= max(2 * rows, rows + _PAD_ROWS):
            return sizes[index]
        sizes.insert(index, rows)
        return rows


def pad_rows(values: Tensor, rows: int, axis: int = 0) -> Tensor:
    """``values`` zero-padded to ``rows`` along ``axis`` (its rows: (m, ...) by default)."""
    if values.shape[axis] >= rows:
        return values
    shape = list(values.shape)
    shape[axis] = rows
    padded = values.new_zeros(shape)
    padded.narrow(axis, 0, values.shape[axis]).copy_(values)
    return padded


# --- the graphs of one step -------------------------------------------------------------------


class CompiledStep:
    """The compiled graphs of one (model, loss, optimizer structure, options)."""

    def __init__(self, model, loss, optimizer, *, cuda_graphs: bool | None, compiler: str,
                 l2: float = 0.0):
        self.model, self.loss, self.optimizer, self.l2 = model, loss, optimizer, l2
        self.cuda_graphs, self.compiler = cuda_graphs, compiler
        self.graphs: dict[tuple, object] = {}  # what a graph is specialized on -> graph
        self.padding = BatchPadding()
        self._ones: dict[tuple, Tensor] = {}  # (rows, padded rows, dtype, device) -> weights
        self._by_data: dict[tuple, object] = {}  # (spec, data shapes, device) -> last graph
        self._last: tuple = (None, None, None)  # (spec, data signature, graph) of the last call

    def compiler_for(self, device: torch.device) -> str:
        return resolve_compiler(self.compiler, device)

    def uses_cuda_graphs(self, device: torch.device) -> bool:
        return (device.type == "cuda" and self.compiler_for(device) == "dynamo"
                and self.cuda_graphs is not False)

    def __call__(self, leaves: list[Tensor], spec, x: Tensor, y: Tensor, weight: Tensor | None,
                 key: Tensor | None, pad_to: int | None = None, *,
                 own_outputs: bool = False) -> list[Tensor]:
        """The outputs ``[*leaves, loss]`` of one step; a batch shorter than ``pad_to`` (or than
        a compiled batch size near it) is zero-padded, its padding weighted 0. ``own_outputs``:
        ``leaves`` are a graph's outputs of the last step (contiguous, shaped as ``spec``'s
        graph inputs), so only the data decide which graph runs."""
        rows, device = x.shape[0], x.device
        target = self.padding.size_for(max(rows, pad_to or 0), x.dtype, device)
        data = [pad_rows(x, target), pad_rows(y, target),
                self._weights(weight, rows, target, x.dtype, device)]
        if key is not None:
            data.append(key)
        if not all(arg.is_contiguous() for arg in data):
            data = [arg.contiguous() for arg in data]
        # A CPU graph is specialized on the thread count too (inductor's kernels are).
        signature = (*[(arg.shape, arg.dtype) for arg in data], torch.get_num_threads(), device)
        graph, hit = None, False
        if own_outputs:  # the last call's graph by identity first: hashing a spec costs ~8 µs
            last_spec, last_signature, last_graph = self._last
            hit = last_spec is spec and last_signature == signature
            graph = last_graph if hit else self._by_data.get((spec, signature))
        if graph is None:
            if not all(leaf.is_contiguous() for leaf in leaves):
                leaves = [leaf.contiguous() for leaf in leaves]
            # What a directly compiled graph is specialized on; dynamo checks the same.
            specialization = (spec, *signature[:-1], *[(leaf.shape, leaf.dtype)
                                                       for leaf in leaves], device)
            graph = self.graphs.get(specialization)
        graphs = self.uses_cuda_graphs(device)
        args = [*leaves, *data]
        with torch.no_grad():
            if graph is None:
                function = step_function(self.model, self.loss, self.optimizer, spec,
                                         keyed=key is not None, l2=self.l2)
                graph = self.graphs[specialization] = compile_graph(
                    function, args, compiler=self.compiler_for(device), cuda_graphs=graphs)
            if not hit:
                self._by_data[(spec, signature)] = graph
                self._last = (spec, signature, graph)
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            outputs = graph(*args)
        return copy_out_of_graph_pool(outputs) if graphs else list(outputs)

    def _weights(self, weight, rows: int, target: int, dtype, device) -> Tensor:
        if weight is not None:
            return pad_rows(weight, target)
        ones = self._ones.get((rows, target, dtype, device))
        if ones is None:
            ones = torch.zeros(target, dtype=dtype, device=device)
            ones[:rows] = 1
            self._ones[(rows, target, dtype, device)] = ones
        return ones


_SHARED: collections.OrderedDict[tuple, CompiledStep] = collections.OrderedDict()


def shared_compiled_step(model, loss, optimizer, *, cuda_graphs, compiler,
                         l2: float = 0.0) -> CompiledStep:
    """The ``CompiledStep`` for these arguments, shared by every caller; the least recently
    used of more than ``_CACHE_SIZE`` are dropped (with their graphs)."""
    key = (model, loss, optimizer.structure, cuda_graphs, compiler, l2)
    step = _SHARED.get(key)
    if step is None:
        step = _SHARED[key] = CompiledStep(model, loss, optimizer, cuda_graphs=cuda_graphs,
                                           compiler=compiler, l2=l2)
        while len(_SHARED) > _CACHE_SIZE:
            _SHARED.popitem(last=False)
    _SHARED.move_to_end(key)
    return step


def has_graphs(model, loss, optimizer, l2: float) -> bool:
    """Whether a shared compiled step of (model, loss, optimizer structure, l2) holds a graph."""
    return any(key[:3] == (model, loss, optimizer.structure) and key[5] == l2 and step.graphs
               for key, step in _SHARED.items())


# --- outputs ----------------------------------------------------------------------------------


def copy_out_of_graph_pool(outputs) -> list[Tensor]:
    """Fresh tensors for a CUDA graph's outputs, which its next replays overwrite.

    One concatenation (one kernel) per dtype instead of a copy per tensor; the results are
    views of it.
    """
    return through_flat_buckets(outputs)


def verify(outputs: list[Tensor], reference: list[Tensor]) -> None:
    """Raise ``CompileVerificationError`` unless the compiled step's outputs match the eager
    step's (``reference``) within a tolerance for their dtype."""
    for index, (got, expected) in enumerate(zip(outputs, reference)):
        difference = relative_difference(got, expected)
        if not difference <= _tolerance(expected.dtype):
            raise CompileVerificationError(
                f"the compiled step disagrees with the eager step: output {index} differs "
                f"by {difference:.3g} relative; this is a compiler bug, train with "
                "compile=False and report it")


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 1e-2)


def relative_difference(got: Tensor, expected: Tensor) -> float:
    """max|got - expected| / max(max|expected|, eps) over the finite values; inf where only
    one side is non-finite (NaN matches NaN, inf matches inf of the same sign). Integer
    tensors (the step count) must be equal."""
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return math.inf
    if not expected.is_floating_point():
        return 0.0 if torch.equal(got, expected) else math.inf
    same = (got == expected) | (got.isnan() & expected.isnan())
    finite = expected.isfinite()
    if bool((~same & ~(finite & got.isfinite())).any()):
        return math.inf
    if not bool(finite.any()):
        return 0.0
    scale = expected[finite].abs().max().clamp_min(torch.finfo(expected.dtype).eps)
    return ((got[finite] - expected[finite]).abs().max() / scale).item()
