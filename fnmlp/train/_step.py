"""One network's training step: the manual forward, the manual backward and the optimizer
update as one pure function, run eagerly or compiled by the ``Executor``.

``train_step(model, loss, optimizer)`` returns ``step(params, opt_state, x, y) -> (params,
opt_state, loss)``, which checks its input; ``TrainStep.run`` is the unchecked step the training
loop calls (the step kind of one network).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fnmlp import _validate
from fnmlp.nn import EVAL, MLP, Loss, check_l2, check_loss, dropout_key, forward, value_and_grad
from fnmlp.optim import ClipByGlobalNorm, Optimizer
from fnmlp.train._executor import EAGER, Carry, Executor, Kernels
from fnmlp.train._loop import Batch, StepKind

COMPILERS = ("auto", "inductor", "dynamo")


def check_step_options(loss, optimizer, compiler: str) -> None:
    """Refuse a loss, optimizer or compiler a step cannot take, naming it."""
    check_loss(loss)
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

    def __init__(self, model: MLP, loss: Loss, optimizer, *, compile: bool = True,
                 verify: bool = False, cuda_graphs: bool | None = None, compiler: str = "auto",
                 l2: float = 0.0, threads: int | str = "auto", flush_denormals: bool = True):
        if not isinstance(model, MLP):
            raise TypeError(f"model must be an fnmlp.MLP, got {type(model).__name__}")
        check_step_options(loss, optimizer, compiler)
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

        Checks shapes, dtypes and devices (not values: NaN checks would sync every step;
        ``fit`` checks the data once).
        """
        model_state = self.model.state_or_default(None, None) if state is None else state
        carry = Carry(params, opt_state, model_state)
        known = self.executor.knows(carry)
        like = self.executor.last_like if known else self.model.check_params(params)
        x, y = self.model.check_data(params, x, y, loss=self.loss, finite=False, like=like)
        self.loss.check_labels(y, self.model.out_features)  # a compiled graph cannot raise
        if not known:
            self.optimizer.check(params, None, opt_state)
            if state is not None:
                self.model.check_state(state, like)
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

    def dropout_key(self, seed: int, step: int, device: torch.device) -> Tensor:
        return dropout_key(seed, step, device=device)

    def valid_losses(self, carry: Carry, x: Tensor, y: Tensor) -> list[float]:
        prediction = forward(self.model, carry.params, x, carry.state, EVAL)[0]
        return [self.loss(prediction, y).item()]

    def forget(self) -> None:
        """Drop the references to the last outputs (they are kept for reuse)."""
        self.executor.forget()


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
