"""One network's training step: the manual forward, the manual backward and the optimizer
update as one pure function, run eagerly or compiled by the ``Executor``.

``train_step(model, loss, optimizer)`` returns ``step(params, opt_state, x, y) -> (params,
opt_state, loss)``, which checks its input; ``TrainStep.run`` is the unchecked step the training
loop calls (the step kind of one network).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from fnmlp import _validate
from fnmlp.nn import EVAL, MLP, Loss, check_l2, check_loss, dropout_key, forward, value_and_grad
from fnmlp.nn import check_loss_weights
from fnmlp.optim import ClipByGlobalNorm, Optimizer
from fnmlp.train._executor import EAGER, Carry, Executor, Kernels
from fnmlp.train._loop import Batch, StepKind
from fnmlp.train._thread_scopes import settle_thread

COMPILERS = ("auto", "inductor", "dynamo")


def check_step_options(loss, optimizer, compiler: str, compile: bool = False) -> None:
    """Refuse a loss, optimizer or compiler a step cannot take, naming it."""
    check_loss(loss)
    if compile and not getattr(loss, "supports_weights", True):
        raise ValueError(f"a compiled step needs a loss that takes row weights (it pads a "
                         f"short batch with rows of weight 0); {type(loss).__name__} takes "
                         "none: pass compile=False, or give its forward a weight argument")
    if compiler not in COMPILERS:
        raise ValueError(f"compiler must be one of {COMPILERS}, got {compiler!r}")
    if not isinstance(optimizer, (Optimizer, ClipByGlobalNorm)):
        raise TypeError(f"optimizer must be an fnmlp optimizer such as fnmlp.sgd(0.01), "
                        f"got {optimizer!r}")


def network_step(model: MLP, loss: Loss, optimizer, l2: float, kernels: Kernels):
    """The pure step of one network, ``(carry, x, y, weight, key) -> (carry, loss)``."""

    def step(carry: Carry, x: Tensor, y: Tensor, weight: Tensor | None, key: Tensor | None):
        params, opt_state, state = carry
        value, grads, new_state = value_and_grad(
            model, params, x, y, loss, state, key=key, weight=weight, l2=l2,
            lane_order_sums=kernels.lane_order_sums)
        params, opt_state = optimizer.unchecked_update(params, grads, opt_state,
                                                       fused=kernels.fused_optimizer)
        return (params, opt_state, new_state), value

    return step


def network_identity(model: MLP, loss: Loss, optimizer, l2: float, cuda_graphs, compiler: str
                     ) -> tuple:
    """What one network's compiled step depends on besides its inputs (its graphs' key)."""
    return ("network", model, loss, getattr(optimizer, "structure", optimizer), l2,
            cuda_graphs, compiler)


def _row_axes(layout: tuple) -> tuple:
    return (0, 0, 0, None)  # x, y, weight by rows; the dropout key is not


class TrainStep(StepKind):
    """``step(params, opt_state, x, y) -> (params, opt_state, loss)``; see ``train_step``."""

    model: MLP
    optimizer: Optimizer | ClipByGlobalNorm

    def __init__(self, model: MLP, loss: Loss, optimizer, *, compile: bool = True,
                 verify: bool = False, cuda_graphs: bool | None = None, compiler: str = "auto",
                 l2: float = 0.0, threads: int | str | None = "auto",
                 flush_denormals: bool = True):
        if not isinstance(model, MLP):
            raise TypeError(f"model must be an fnmlp.MLP, got {type(model).__name__}; a "
                            "torch.nn module converts with fnmlp.from_torch(module)")
        check_step_options(loss, optimizer, compiler, compile)
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.l2 = check_l2(l2)
        identity = network_identity(model, loss, optimizer, self.l2, cuda_graphs, compiler)
        self.executor = Executor(
            identity, lambda kernels, layout: network_step(model, loss, optimizer, self.l2,
                                                            kernels),
            _row_axes, compile=compile, compiler=compiler, verify=verify,
            cuda_graphs=cuda_graphs, threads=threads, model=model, eager_kernels=EAGER,
            flush_denormals=flush_denormals, stateless=not model.has_state)
        self.compiled = self.executor.compiled

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

        Checks shapes and devices, and takes data of any real dtype in the parameters'
        (``fnmlp._validate.as_data``'s rule; SciPy sparse x is refused: ``x.toarray()``);
        not values: NaN checks would sync every step (``fit`` checks the data once).
        """
        settle_thread()  # ~0.1 µs once this thread is known
        model_state = self.model.state_or_default(None, None) if state is None else state
        carry = Carry(params, opt_state, model_state)
        known = self.executor.knows(carry)
        # a known carry was returned with data: the executor's last_like is a tensor
        like = cast(Tensor, self.executor.last_like) if known else self.model.check_params(params)
        _validate.check_no_autocast(like.device, "the training step (fnmlp.train_step)")
        x, y = self.model.check_data(params, x, y, loss=self.loss, finite=False, like=like)
        self.loss.check_labels(y, self.model.out_features)  # a compiled graph cannot raise
        if not known:
            self.optimizer.check(params, None, opt_state)
            if state is not None:
                self.model.check_state(state, like)
        check_loss_weights(self.loss, sample_weight)
        weight = _validate.as_weights(sample_weight, x.shape[0], like)
        self.model.check_training_rows(x.shape[0], weight)  # a compiled graph cannot raise
        key = self.model.check_key(key, x.device)
        new, value = self.run(carry, Batch(x, y, weight, key, x.shape[0], None, (True,)))
        return (new.params, new.opt_state, value) if state is None else (
            new.params, new.opt_state, value, new.state)

    def run(self, carry: Carry, batch: Batch, active=None) -> tuple[Carry, Tensor]:
        """``(carry, loss)``: ``__call__`` without its checks (the loop's step)."""
        return self.executor(carry, [batch.x, batch.y, batch.weight, batch.key], batch.rows,
                             batch.pad_to)

    def run_chunk(self, carry: Carry, batches, active=None) -> tuple[Carry, Tensor]:
        """``(carry, losses)`` after a step on each batch: compiled, one graph for all."""
        return self.executor.run_chunk(carry, [[b.x, b.y, b.weight, b.key] for b in batches],
                                       [b.rows for b in batches], batches[0].pad_to)

    def dropout_key(self, seed: int, step: int, device: torch.device) -> Tensor:
        return dropout_key(seed, step, device=device)

    def valid_losses(self, carry: Carry, x: Tensor, y: Tensor) -> list[float]:
        prediction = forward(self.model, carry.params, x, carry.state, EVAL)[0]
        return [self.loss(prediction, y).item()]

    def forget(self) -> None:
        """Drop the references to the last outputs (they are kept for reuse)."""
        self.executor.forget()

    def pin_threads(self, extras: dict, rows: int, device: torch.device) -> None:
        self.executor.threads.pin(extras, rows, device)


def train_step(model: MLP, loss: Loss, optimizer, *, compile: bool = True, verify: bool = False,
               cuda_graphs: bool | None = None, compiler: str = "auto",
               l2: float = 0.0, threads: int | str | None = "auto",
               flush_denormals: bool = True) -> TrainStep:
    """A pure training step ``(params, opt_state, x, y) -> (params, opt_state, loss)``.

    Arguments:
        model, loss, optimizer: the network spec, an fnmlp loss and an fnmlp optimizer.
        compile: one compiled graph (True) or the eager functions (False).
        verify: run the first step eagerly too and raise ``CompileVerificationError`` if the
            compiled step disagrees (protects against compiler bugs). Only this step verifies;
            steps sharing its graphs are unaffected.
        cuda_graphs: on a CUDA device, the compiled step is captured as a CUDA graph by fnmlp
            (default: yes): one launch per step; passing back the trees the step returned
            last copies nothing into the graph, anything else is copied in (one copy per
            dtype), and what is returned is fresh (one copy per dtype), never overwritten.
        compiler: "inductor" (trace once, compile with inductor: no per-call guards),
            "dynamo" (``torch.compile(fullgraph=True)``), or "auto" (inductor).
        l2: an L2 penalty on the ``Linear`` weights as scikit-learn's ``alpha`` (see
            ``MLP.value_and_grad``).
        threads: intra-op threads for each step, never more than torch's current count
            (``torch.get_num_threads()``, as ``OMP_NUM_THREADS`` or ``threadpoolctl`` set it):
            "auto" runs a step below ~1 million multiply-adds on one thread and one of ~128
            million or more on all; in between, on all only where this machine measured the
            step clearly (15%) faster on them (its eager kernels timed once per machine and
            step shape, ~10-100 ms, cached in ``$FNMLP_CACHE_DIR`` or ``~/.cache/fnmlp``), and
            on one thread while other processes hold the cores (a busy core stalls every
            barrier); ``FNMLP_THREAD_CALIBRATION=0`` keeps the fixed 16-million rule. Or a
            count. Or None: torch's count as it is, never set. Set for the step in the calling
            thread, put back after it (safe beside steps and torch code in other threads:
            ``fnmlp.train._thread_scopes``); a fit keeps its first choice for all its steps
            (and its checkpoints, so that a resumed fit uses it too).
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
