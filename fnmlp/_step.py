"""The training step as one pure function, optionally compiled into one graph.

``train_step(model, loss, optimizer)`` returns ``step(params, opt_state, x, y) -> (params,
opt_state, loss)``: the manual forward, the manual backward and the optimizer update. Compiled,
it is a single ``torch.compile(fullgraph=True)`` graph over flat tensors:

- a batch is zero-padded to the smallest batch size already compiled that holds it, and the
  padding is masked in the loss, so the short last batch of an epoch reuses the full batch's
  graph (dynamo would specialize sizes 0 and 1 anyway);
- the learning rate lives in the optimizer state as a 0-d tensor, so changing it never
  recompiles;
- on CPU the graph is traced once (``make_fx``) and compiled by inductor directly, skipping
  dynamo's per-call guard evaluation (tens of µs, a large share of a small step); fnmlp checks
  what the graph was specialized on (shapes, dtypes, devices, contiguity) itself, and compiles a
  new graph when that changes. ``compiler="dynamo"`` uses ``torch.compile(fullgraph=True)``
  instead, with its guards;
- on CUDA the graph is captured as a CUDA graph (``mode="reduce-overhead"``): a step costs about
  one graph launch. Its outputs live in the graph's memory pool, which later replays overwrite,
  so the step copies them out with one kernel: returned parameters stay valid, as a pure
  function's must. ``cuda_graphs=False`` turns the capture off.
"""

from __future__ import annotations

import bisect
import itertools
import math
import types

import torch
from torch import Tensor

from fnmlp._losses import Loss
from fnmlp._model import MLP, value_and_grad
from fnmlp._tree import flatten, tree_builder, unflatten

_unique = itertools.count()


class CompileVerificationError(RuntimeError):
    """The compiled step disagreed with the eager step (a compiler bug); use compile=False."""


def _step_function(model: MLP, loss: Loss, optimizer, spec):
    """The pure step over flat tensors: (*leaves, x, y, valid_rows[, key]) -> (*leaves, loss)."""
    keyed = model.has_dropout
    build = tree_builder(spec)

    def fnmlp_train_step(*args):
        key = args[-1] if keyed else None
        *leaves, x, y, valid_rows = args[:-1] if keyed else args
        params, opt_state = build(leaves)
        value, grads = value_and_grad(model, params, x, y, loss, valid_rows, key)
        params, opt_state = optimizer.update(params, grads, opt_state)
        leaves, _ = flatten((params, opt_state))
        return (*leaves, value)

    # A code object of its own gives each step its own dynamo cache, so steps for different
    # models never count as recompiles of one another.
    code = fnmlp_train_step.__code__
    code = code.replace(co_name=f"{code.co_name}_{next(_unique)}")
    return types.FunctionType(code, fnmlp_train_step.__globals__, code.co_name,
                              None, fnmlp_train_step.__closure__)


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 1e-2)


class TrainStep:
    """``step(params, opt_state, x, y) -> (params, opt_state, loss)``; see ``train_step``."""

    def __init__(self, model: MLP, loss: Loss, optimizer, *, compile: bool = True,
                 verify: bool = False, cuda_graphs: bool | None = None, compiler: str = "auto"):
        if compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, got {compiler!r}")
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.compile, self.verify, self.cuda_graphs = compile, verify, cuda_graphs
        self.compiler = compiler
        self._compiled = {}  # what a graph is specialized on -> compiled flat function
        # Per (dtype, device), the sorted batch sizes compiled; direct calls pad up to one.
        self._batch_sizes: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        self._valid_rows: dict[tuple[int, torch.device], Tensor] = {}
        self._verified = not verify
        # What this step returned last: (params, opt_state, their leaves, spec). Parameters
        # it made are known valid, and their leaves need no flattening when passed back.
        self._last = (None, None, None, None)

    def __call__(self, params, opt_state, x: Tensor, y: Tensor, valid_rows: int | None = None,
                 key: Tensor | None = None):
        """One step on (x, y). With ``valid_rows``, only the leading rows of x and y count.
        ``key`` (``fnmlp.dropout_key``, a new one every step) is required with dropout.

        Checks shapes, dtypes and devices (not values: NaN checks would sync every step;
        ``fit`` checks the data once).
        """
        x, y = self.model.check_data(params, x, y, loss=self.loss, finite=False,
                                     params_checked=params is self._last[0])
        if valid_rows is not None and not 0 < valid_rows <= x.shape[0]:
            raise ValueError(f"valid_rows must be in 1..{x.shape[0]}, got {valid_rows}")
        key = self.model.check_key(key, x.device)
        return self.run(params, opt_state, x, y, valid_rows, key)

    def run(self, params, opt_state, x: Tensor, y: Tensor, valid_rows: int | None = None,
            key: Tensor | None = None):
        """``__call__`` without its checks, for callers that validated the data already."""
        rows = x.shape[0]
        if not self.compile:
            if valid_rows is not None and valid_rows != rows:
                x, y = x[:valid_rows], y[:valid_rows]
            return self._eager_step(params, opt_state, x, y, key)
        if valid_rows is None:  # a direct call: pad to the smallest batch size that holds it
            valid_rows = rows
            target = self._padded_size(rows, x.dtype, x.device)
            if target != rows:
                x, y = pad_rows(x, target), pad_rows(y, target)
        last_params, last_state, leaves, spec = self._last
        if params is not last_params or opt_state is not last_state:
            leaves, spec = flatten((params, opt_state))
        outputs = self._run(leaves, spec, x, y, valid_rows, key)
        if not self._verified:
            self._verify(params, opt_state, x[:valid_rows], y[:valid_rows], key, outputs)
        leaves = outputs[:-1]
        params, opt_state = unflatten(leaves, spec)
        self._last = (params, opt_state, leaves, spec)
        return params, opt_state, outputs[-1]

    def _padded_size(self, rows: int, dtype: torch.dtype, device: torch.device) -> int:
        """The compiled batch size a direct call of ``rows`` rows runs at: the smallest one
        holding it, unless padding would cost more than a batch of its own (then ``rows``,
        compiled anew)."""
        sizes = self._batch_sizes.setdefault((dtype, device), [])
        index = bisect.bisect_left(sizes, rows)
        if index < len(sizes) and sizes[index] <= max(2 * rows, rows + _PAD_ROWS):
            return sizes[index]
        sizes.insert(index, rows)
        return rows

    def request_verification(self) -> None:
        """Check the next compiled step against the eager step (see ``train_step``)."""
        self._verified = not self.compile

    def uses_cuda_graphs(self, device: torch.device) -> bool:
        if not self.compile or device.type != "cuda" or self._compiler_for(device) != "dynamo":
            return False
        return self.cuda_graphs is not False

    def _compiler_for(self, device: torch.device) -> str:
        if self.compiler != "auto":
            return self.compiler
        return "inductor" if device.type == "cpu" else "dynamo"

    def _run(self, leaves, spec, x, y, valid_rows: int, key: Tensor | None):
        device = x.device
        count = self._valid_rows.get((valid_rows, device))
        if count is None:
            count = self._valid_rows[(valid_rows, device)] = torch.tensor(valid_rows,
                                                                          device=device)
        args = [*leaves, x, y, count] + ([key] if self.model.has_dropout else [])
        if not all(arg.is_contiguous() for arg in args):
            args = [arg.contiguous() for arg in args]
        # What a directly compiled graph is specialized on; dynamo checks the same by guards.
        key = (spec, *[(arg.shape, arg.dtype) for arg in args], device)
        function = self._compiled.get(key)
        graphs = self.uses_cuda_graphs(device)
        with torch.no_grad():
            if function is None:
                function = self._compiled[key] = self._compile(spec, args)
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            outputs = function(*args)
        return _copy_out_of_graph_pool(outputs) if graphs else outputs

    def _compile(self, spec, args: list[Tensor]):
        function = _step_function(self.model, self.loss, self.optimizer, spec)
        device = args[0].device
        if self._compiler_for(device) == "inductor":
            return _compile_with_inductor(function, args)
        mode = "reduce-overhead" if self.uses_cuda_graphs(device) else None
        return torch.compile(function, fullgraph=True, dynamic=False, mode=mode)

    def _eager_step(self, params, opt_state, x: Tensor, y: Tensor, key: Tensor | None):
        with torch.no_grad():
            value, grads = value_and_grad(self.model, params, x, y, self.loss, key=key)
            params, opt_state = self.optimizer.update(params, grads, opt_state)
        return params, opt_state, value

    def _verify(self, params, opt_state, x, y, key, outputs):
        params, opt_state, value = self._eager_step(params, opt_state, x, y, key)
        reference = [*flatten((params, opt_state))[0], value]
        for index, (got, expected) in enumerate(zip(outputs, reference)):
            difference = _relative_difference(got, expected)
            if not difference <= _tolerance(expected.dtype):
                raise CompileVerificationError(
                    f"the compiled step disagrees with the eager step: output {index} differs "
                    f"by {difference:.3g} relative; this is a compiler bug, train with "
                    "compile=False and report it")
        self._verified = True


def _relative_difference(got: Tensor, expected: Tensor) -> float:
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


def _compile_with_inductor(function, args: list[Tensor]):
    """Trace ``function`` once on fake copies of ``args`` and compile it with inductor.

    Tracing under a fake mode with a shape environment (static shapes) lets inductor's on-disk
    FX graph cache serve a second process; without one it bypasses the cache. The graph's
    wrapper is C++ (``cpp_wrapper``): no Python between kernels (the seed step ~10% faster,
    measured side by side) and two translation units, wrapper and kernels, each built on a
    precompiled header, instead of a shared object per kernel (a cold compile ~40% shorter).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    fake_args = [fake_mode.from_tensor(arg, static_shapes=True) for arg in args]
    with fake_mode:
        graph = make_fx(function)(*fake_args)
    with torch._inductor.config.patch(_CPU_INDUCTOR_OPTIONS):
        return torch._inductor.compile(graph, fake_args)


_CPU_INDUCTOR_OPTIONS = {"cpp_wrapper": True}
if hasattr(torch._inductor.config, "cpp_wrapper_build_separate"):  # torch >= 2.8
    _CPU_INDUCTOR_OPTIONS["cpp_wrapper_build_separate"] = True


def _copy_out_of_graph_pool(outputs) -> list[Tensor]:
    """Fresh tensors for a CUDA graph's outputs, which its next replays overwrite.

    One concatenation (one kernel) per dtype instead of a copy per tensor; the results are
    views of it.
    """
    copies: list = [None] * len(outputs)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, output in enumerate(outputs):
        by_dtype.setdefault(output.dtype, []).append(index)
    for indices in by_dtype.values():
        flat = torch.cat([outputs[i].reshape(-1) for i in indices])
        pieces = flat.split([outputs[i].numel() for i in indices])
        for i, piece in zip(indices, pieces):
            copies[i] = piece.view(outputs[i].shape)
    return copies


def pad_rows(values: Tensor, rows: int) -> Tensor:
    """``values`` (m, ...) zero-padded to (rows, ...)."""
    padded = values.new_zeros((rows, *values.shape[1:]))
    padded[: values.shape[0]] = values
    return padded


COMPILERS = ("auto", "inductor", "dynamo")
_PAD_ROWS = 1024  # a direct call pads by at most max(this, its own rows) rather than recompile
_CACHE: dict[tuple, TrainStep] = {}


def train_step(model: MLP, loss: Loss, optimizer, *, compile: bool = True, verify: bool = False,
               cuda_graphs: bool | None = None, compiler: str = "auto") -> TrainStep:
    """A pure training step ``(params, opt_state, x, y) -> (params, opt_state, loss)``.

    Arguments:
        model, loss, optimizer: the network spec, an fnmlp loss and an fnmlp optimizer.
        compile: one ``torch.compile`` graph (True) or the eager functions (False).
        verify: run the first step eagerly too and raise ``CompileVerificationError`` if the
            compiled step disagrees (protects against compiler bugs).
        cuda_graphs: capture a CUDA graph on CUDA devices (default: yes).
        compiler: "inductor" (trace once, compile with inductor, no per-call guards),
            "dynamo" (``torch.compile(fullgraph=True)``), or "auto": inductor on CPU, dynamo
            (with CUDA graphs) on CUDA.

    Steps for the same (model, loss, optimizer structure, options) are shared, so a second
    ``fit`` with the same spec, dtype and device reuses the compiled graph. A direct call with
    a batch smaller than one already compiled is zero-padded to it and masked, so a short last
    batch costs no new graph.
    """
    if not compile:
        return TrainStep(model, loss, optimizer, compile=False)
    key = (model, loss, optimizer.structure, cuda_graphs, compiler)
    step = _CACHE.get(key)
    if step is None:
        step = _CACHE[key] = TrainStep(model, loss, optimizer, cuda_graphs=cuda_graphs,
                                       compiler=compiler)
    if verify:
        step.request_verification()
    return step
