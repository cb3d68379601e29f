"""The training step as one pure function, eager or compiled into one graph.

``train_step(model, loss, optimizer)`` returns ``step(params, opt_state, x, y) -> (params,
opt_state, loss)``: the manual forward, the manual backward and the optimizer update. This module
checks the input, reuses the leaves it returned last, and dispatches to the eager functions or
to the compiled graphs (``fnmlp.train._compile``, imported only when a step is compiled).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fnmlp import _validate
from fnmlp._tree import flatten, tree_builder
from fnmlp.nn._losses import Loss
from fnmlp.nn._model import MLP, check_loss, check_l2, value_and_grad
from fnmlp.optim._optimizers import ClipByGlobalNorm, Optimizer
from fnmlp.train._denormals import flushed_denormals
from fnmlp.train._threads import StepThreads

COMPILERS = ("auto", "inductor", "dynamo")


def eager_step(model: MLP, loss: Loss, optimizer, params, opt_state, state, x: Tensor,
               y: Tensor, weight: Tensor | None, key: Tensor | None, l2: float = 0.0):
    """``(params, opt_state, loss, state)`` after one step of the eager functions."""
    with torch.no_grad():
        value, grads, state = value_and_grad(model, params, x, y, loss, state, key=key,
                                             weight=weight, l2=l2)
        params, opt_state = optimizer.unchecked_update(params, grads, opt_state)  # checked by callers
    return params, opt_state, value, state


class _LastOutputs:
    """What a step returned last: trees it made are known valid (their checks are skipped),
    and a compiled step's leaves need no flattening when they are passed back."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.trees, self.leaves, self.spec, self.like = (None, None, None), None, None, None
        self.builder = None  # ``tree_builder(spec)``, kept: hashing a spec costs ~8 µs

    def knows(self, trees: tuple) -> bool:
        last = self.trees
        return trees[0] is last[0] and trees[1] is last[1] and trees[2] is last[2]

    def remember(self, trees: tuple, like: Tensor, leaves: list | None = None,
                 spec=None, builder=None) -> None:
        self.trees, self.like, self.leaves, self.spec = trees, like, leaves, spec
        self.builder = builder


class TrainStep:
    """``step(params, opt_state, x, y) -> (params, opt_state, loss)``; see ``train_step``."""

    def __init__(self, model: MLP, loss: Loss, optimizer, *, compile: bool = True,
                 verify: bool = False, cuda_graphs: bool | None = None, compiler: str = "auto",
                 l2: float = 0.0, threads: int | str = "auto", flush_denormals: bool = True):
        if compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, got {compiler!r}")
        self._threads = StepThreads(threads, model)  # checks ``threads``
        check_loss(loss)
        if not isinstance(optimizer, (Optimizer, ClipByGlobalNorm)):
            raise TypeError(f"optimizer must be an fnmlp optimizer such as fnmlp.sgd(0.01), "
                            f"got {optimizer!r}")
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.l2 = check_l2(l2)
        self.flush_denormals = bool(flush_denormals)
        self.compiled = None
        if compile:
            from fnmlp.train._compile import shared_compiled_step

            self.compiled = shared_compiled_step(model, loss, optimizer, cuda_graphs=cuda_graphs,
                                                 compiler=compiler, l2=self.l2)
        self._verify_next = verify and compile
        self._last = _LastOutputs()

    def __call__(self, params, opt_state, x, y, *, state=None, sample_weight=None,
                 key: Tensor | None = None):
        """One step on (x, y).

        Arguments:
            params, opt_state: the parameters and the optimizer's state.
            x: (m, in_features); y: targets as the loss wants them.
            state: the model's state, required with ``BatchNorm``; when given, the new state
                is returned as a fourth value.
            sample_weight: (m,) non-negative row weights.
            key: the dropout key (``fnmlp.dropout_key``, a new one every step), required with
                dropout.

        Checks shapes, dtypes and devices (not values: NaN checks would sync every step;
        ``fit`` checks the data once).
        """
        model_state = self.model.state_or_default(None, None) if state is None else state
        known = self._last.knows((params, opt_state, model_state))
        like = self._last.like if known else self.model.check_params(params)
        x, y = self.model.check_data(params, x, y, loss=self.loss, finite=False, like=like)
        self.loss.check_labels(y, self.model.out_features)  # a compiled graph cannot raise
        if not known:
            self.optimizer.check(params, None, opt_state)
            if state is not None:
                self.model.check_state(state, like)
        weight = _validate.as_weights(sample_weight, x.shape[0], like)
        self.model.check_training_rows(x.shape[0], weight)  # a compiled graph cannot raise
        key = self.model.check_key(key, x.device)
        params, opt_state, value, new_state = self.run(params, opt_state, model_state, x, y,
                                                       weight=weight, key=key)
        return (params, opt_state, value) if state is None else (params, opt_state, value,
                                                                new_state)

    def run(self, params, opt_state, state, x: Tensor, y: Tensor, *,
            weight: Tensor | None = None, key: Tensor | None = None, pad_to: int | None = None):
        """``(params, opt_state, loss, state)``: ``__call__`` without its checks, for callers
        that validated the data. ``pad_to``: pad a compiled step's short batch to this size."""
        with self._threads(max(x.shape[0], pad_to or 0), x.device):
            return self._run(params, opt_state, state, x, y, weight, key, pad_to)

    def _run(self, params, opt_state, state, x, y, weight, key, pad_to):
        if self.compiled is None:
            params, opt_state, value, new_state = eager_step(
                self.model, self.loss, self.optimizer, params, opt_state, state, x, y, weight, key,
                self.l2)
            if not self.model.has_state:  # no tensors: keep the caller's object
                new_state = state
            self._last.remember((params, opt_state, new_state), x)
            return params, opt_state, value, new_state
        trees = (params, opt_state, state)
        own = self._last.knows(trees) and self._last.leaves is not None
        if own:
            leaves, spec, build = self._last.leaves, self._last.spec, self._last.builder
        else:
            leaves, spec = flatten(trees)
            build = tree_builder(spec)
        flush = self.flush_denormals and x.device.type == "cpu" and torch.get_num_threads() == 1
        with flushed_denormals(flush):
            outputs = self.compiled(leaves, spec, x, y, weight, key, pad_to, own_outputs=own)
        if self._verify_next:
            self._verify(trees, x, y, weight, key, outputs)
        leaves = outputs[:-1]
        new_params, opt_state, new_state = build(leaves)
        if not self.model.has_state:  # no tensors: keep the caller's object (leaf reuse)
            new_state = state
        self._last.remember((new_params, opt_state, new_state), x, leaves, spec, build)
        return new_params, opt_state, outputs[-1], new_state

    def forget(self) -> None:
        """Drop the references to the last outputs (they are kept for reuse)."""
        self._last.clear()

    def _verify(self, trees, x, y, weight, key, outputs) -> None:
        from fnmlp.train._compile import verify

        params, opt_state, value, state = eager_step(self.model, self.loss, self.optimizer,
                                                     *trees, x, y, weight, key, self.l2)
        verify(outputs, [*flatten((params, opt_state, state))[0], value])
        self._verify_next = False


def train_step(model: MLP, loss: Loss, optimizer, *, compile: bool = True, verify: bool = False,
               cuda_graphs: bool | None = None, compiler: str = "auto",
               l2: float = 0.0, threads: int | str = "auto",
               flush_denormals: bool = True) -> TrainStep:
    """A pure training step ``(params, opt_state, x, y) -> (params, opt_state, loss)``.

    Arguments:
        model, loss, optimizer: the network spec, an fnmlp loss and an fnmlp optimizer.
        compile: one compiled graph (True) or the eager functions (False).
        verify: run the first step eagerly too and raise ``CompileVerificationError`` if the
            compiled step disagrees (protects against compiler bugs). Only this step verifies;
            steps sharing its graphs are unaffected.
        cuda_graphs: capture a CUDA graph on CUDA devices (default: yes).
        compiler: "inductor" (trace once, compile with inductor, no per-call guards),
            "dynamo" (``torch.compile(fullgraph=True)``), or "auto": inductor on CPU, dynamo
            (with CUDA graphs) on CUDA.
        l2: an L2 penalty on the ``Linear`` weights as scikit-learn's ``alpha`` (see
            ``MLP.value_and_grad``).
        threads: intra-op threads for each step, never more than torch's current count
            (``torch.get_num_threads()``, as ``OMP_NUM_THREADS`` or ``threadpoolctl`` set it):
            "auto" runs a step below ~16 million multiply-adds on one thread (tiny kernels
            cannot pay for a second thread's fork and barrier, and a busy core stalls every
            barrier), larger ones on all; or a count. Set for the step, put back after it.
        flush_denormals: a compiled CPU step on one thread flushes denormal floats to zero
            for its duration, as XLA does (they are ~100x slower; ``fnmlp.train._denormals``);
            False keeps IEEE gradual underflow. The eager step never flushes.

    Compiled graphs are shared by every step of the same (model, loss, optimizer structure,
    options), so a second ``fit`` with the same spec, dtype and device reuses them. A batch
    smaller than one already compiled is zero-padded to it (the padding weighted 0), so a
    short last batch costs no new graph.
    """
    return TrainStep(model, loss, optimizer, compile=compile, verify=verify,
                     cuda_graphs=cuda_graphs, compiler=compiler, l2=l2, threads=threads,
                     flush_denormals=flush_denormals)
