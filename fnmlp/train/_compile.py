"""Compiling a step: tracing, compiling, padding, the one graph cache, verification.

Its parts, each a small unit:

- ``compile_graph``: tracing and compiling one graph of a step's flat function (made by
  ``fnmlp.train._executor``). On CPU the step is traced once (``make_fx`` under a fake mode) and
  compiled by inductor directly, with no dynamo guards (a large share of a small step) and, on
  the CPU, a C++ wrapper; that private-API path is one function, ``_compile_with_inductor``,
  with ``torch.compile(..., options=...)`` as its tested fallback. On CUDA the compiled
  function is then captured by fnmlp as a CUDA graph (``fnmlp.train._cuda_graph``): one
  launch per call, nothing copied in when the caller passes back what it got;
- ``BatchPadding``: which compiled batch size a batch runs at (a short batch is zero-padded to
  one already compiled rather than compiling a graph of its own);
- ``shared_graphs``: the one bounded (LRU) cache of compiled graphs, keyed by a step's identity
  (kind, model, loss, optimizer structure, options) and then by what a graph is specialized on
  (tree structure, shapes, dtypes, thread count, device): fnmlp's own guards. Every kind of
  step (one network, an ensemble, data-parallel) keeps its graphs here;
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
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

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
    """``compiler``, with "auto" made inductor (on every device)."""
    return "inductor" if compiler == "auto" else compiler


def compile_graph(function, args: list[Tensor], *, compiler: str, cuda_graphs: bool,
                  carried: int = 0, threads: int | None = None):
    """``function`` compiled for ``args``: with inductor directly ("inductor", or "auto"),
    falling back to ``torch.compile`` with the same options where torch's private APIs differ,
    or with ``torch.compile`` ("dynamo"). On CUDA with ``cuda_graphs`` it is then captured as
    a ``CapturedStep`` whose first ``carried`` arguments are the carried leaves. ``threads``:
    the intra-op threads a CPU graph's kernels are built for (None: this thread's count)."""
    compiled = _compile(function, args, resolve_compiler(compiler, args[0].device), threads)
    if cuda_graphs and args[0].device.type == "cuda":
        from fnmlp.train._cuda_graph import CapturedStep

        return CapturedStep(compiled, args, carried)
    return compiled


def _compile(function, args: list[Tensor], compiler: str, threads: int | None = None):
    options = (cpu_inductor_options(args[0].dtype, threads) if args[0].device.type == "cpu"
               else {})
    if compiler == "inductor":
        try:
            return _compile_with_inductor(function, args, options)
        except (ImportError, AttributeError) as error:
            warnings.warn(f"fnmlp: inductor's private API is not as expected ({error!r}); "
                          "compiling with torch.compile(options=...) instead", RuntimeWarning,
                          stacklevel=4)
            return torch.compile(function, fullgraph=True, dynamic=False, options=options)
    return torch.compile(function, fullgraph=True, dynamic=False)


def _compile_with_inductor(function, args: list[Tensor], options: dict):
    """Trace ``function`` once on fake copies of ``args`` and compile it with inductor (with
    ``_inductor_setup``, the one place that uses torch's private compiler APIs).

    Tracing under a fake mode with a shape environment (static shapes) lets inductor's on-disk
    FX graph cache serve a second process; without one it bypasses the cache. The graph's
    wrapper is C++ (``cpp_wrapper``): no Python between kernels (the seed step ~10% faster,
    measured side by side) and two translation units, wrapper and kernels, each built on a
    precompiled header, instead of a shared object per kernel (a cold compile ~40% shorter).
    """
    import torch._inductor

    from fnmlp.train._inductor_setup import compile_locked, cpu_compile

    with compile_locked():  # make_fx and inductor's config are process-wide: one at a time
        graph, fake_args = trace(function, args)
        if args[0].device.type != "cpu":
            return torch._inductor.compile(graph, fake_args, options)
        with cpu_compile(options):
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


def cpu_inductor_options(dtype: torch.dtype | None = None, threads: int | None = None) -> dict:
    """Inductor's options for a CPU step: kernels built for ``threads`` intra-op threads
    (``cpp.threads``; None: the compiling thread's count, as inductor reads it) rather than
    for whatever the config says meanwhile; a C++ wrapper, built apart from the kernels where
    this torch can (``cpp_wrapper_build_separate``, torch >= 2.8); for a float64 step, tanh
    as ``2 / (1 + exp(-2x)) - 1`` (``cpp.use_decompose_tanh``): ATen's vectorized float64
    tanh (Sleef's 1-ulp ``tanh``) costs about two ``exp``, this one ``exp`` and a division,
    within ~1e-16 of it (the seed step ~5% faster on a 2-core AMD EPYC)."""
    import torch._inductor.config

    options: dict[str, bool | int] = {"cpp_wrapper": True}
    if threads is not None:
        options["cpp.threads"] = int(threads)
    if hasattr(torch._inductor.config, "cpp_wrapper_build_separate"):
        options["cpp_wrapper_build_separate"] = True
    if dtype == torch.float64 and hasattr(torch._inductor.config.cpp, "use_decompose_tanh"):
        options["cpp.use_decompose_tanh"] = True
    return options


# --- batches ----------------------------------------------------------------------------------


class BatchPadding:
    """Per (dtype, device), the sorted batch sizes compiled so far; a batch runs at the smallest
    that holds it, unless padding would cost more than a graph of its own."""

    def __init__(self) -> None:
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


Graph = Callable[..., Any]  # a compiled step or chunk: (*leaves, *data) -> (*leaves, loss)


class Graphs:
    """The compiled graphs of one step identity (its kind, model, loss, optimizer structure and
    options): by what a graph is specialized on (tree structure, shapes, dtypes, thread count,
    device) — fnmlp's own guards — and the batch sizes compiled so far."""

    def __init__(self) -> None:
        # a graph, or for the data-parallel step's own keys its pair (gradient, update)
        self.by_specialization: dict[tuple, Any] = {}
        self.by_data: dict[tuple, Graph] = {}  # (spec, data signature) -> the graph last used
        self.padding = BatchPadding()

    def count(self, chunked: bool = False) -> int:
        """How many graphs there are of one step (or, ``chunked``, of chunks of steps)."""
        return sum((key[1] is not None) == chunked for key in self.by_specialization)


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

# --- verification -----------------------------------------------------------------------------


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
