"""Compiling a step: tracing, compiling, padding, the one graph cache, verification.

Its parts, each a small unit:

- ``compile_graph``: tracing and compiling one graph of a step's flat function (made by
  ``fnmlp.train._executor``). On CPU the step is traced once (``make_fx`` under a fake mode) and
  compiled by inductor directly, with a C++ wrapper and no dynamo guards (a large share of a
  small step); that private-API path is one function, ``_compile_with_inductor``, with
  ``torch.compile(..., options=...)`` as its tested fallback. On CUDA it is
  ``torch.compile(mode="reduce-overhead")``: a CUDA graph, one launch per step;
- ``BatchPadding``: which compiled batch size a batch runs at (a short batch is zero-padded to
  one already compiled rather than compiling a graph of its own);
- ``shared_graphs``: the one bounded (LRU) cache of compiled graphs, keyed by a step's identity
  (kind, model, loss, optimizer structure, options) and then by what a graph is specialized on
  (tree structure, shapes, dtypes, thread count, device): fnmlp's own guards. Every kind of
  step (one network, an ensemble, data-parallel) keeps its graphs here;
- ``copy_out_of_graph_pool``: CUDA graph outputs live in the graph's pool, which the next
  replay overwrites; one kernel per dtype copies them out so returned parameters stay valid;
- ``verify``: compares a compiled step with the eager step (compilers have miscompiled
  update expressions: inductor has dropped ``alpha`` from an ``add`` over a matmul).
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

from fnmlp._tree import through_flat_buckets
from fnmlp.train._errors import CompileVerificationError

_unique = itertools.count()
_PAD_ROWS = 1024  # a direct call pads by at most max(this, its own rows) rather than recompile
_CACHE_SIZE = 16


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
    of ``args`` (``function`` is made with the traced kernels: plain row sums, no fused
    optimizer kernels; see ``fnmlp.train._executor.Kernels``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    fake_args = [fake_mode.from_tensor(arg, static_shapes=True) for arg in args]
    with fake_mode:
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


# --- the one graph cache ----------------------------------------------------------------------


class Graphs:
    """The compiled graphs of one step identity (its kind, model, loss, optimizer structure and
    options): by what a graph is specialized on (tree structure, shapes, dtypes, thread count,
    device) — fnmlp's own guards — and the batch sizes compiled so far."""

    def __init__(self):
        self.by_specialization: dict[tuple, object] = {}
        self.by_data: dict[tuple, object] = {}  # (spec, data signature) -> the graph last used
        self.padding = BatchPadding()


_SHARED: collections.OrderedDict[tuple, Graphs] = collections.OrderedDict()


def shared_graphs(identity: tuple) -> Graphs:
    """The ``Graphs`` of ``identity``, shared by every step of every kind, so that a second
    ``fit`` with the same spec reuses them; the least recently used of more than
    ``_CACHE_SIZE`` identities are dropped (with their graphs). It holds graphs, never
    parameters."""
    graphs = _SHARED.get(identity)
    if graphs is None:
        graphs = _SHARED[identity] = Graphs()
        while len(_SHARED) > _CACHE_SIZE:
            _SHARED.popitem(last=False)
    _SHARED.move_to_end(identity)
    return graphs


def has_graphs(identity: tuple) -> bool:
    """Whether the cache holds a compiled graph for ``identity``."""
    graphs = _SHARED.get(identity)
    return graphs is not None and bool(graphs.by_specialization)

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
