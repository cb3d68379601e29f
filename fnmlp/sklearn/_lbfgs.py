"""``solver="lbfgs"``: scikit-learn's full-batch quasi-Newton fit, ``scipy.optimize.minimize``
with L-BFGS-B over fnmlp's explicit ``value_and_grad``.

As scikit-learn: the parameters are one float64 vector, the objective is the loss on every row
plus alpha's L2 penalty (alpha/(2n)·sum ||W||², n the rows or the weight sum), computed in
float64 whatever the input's dtype, and the options are ``maxfun=max_fun``,
``maxiter=max_iter``, ``gtol=tol``; ``n_iter_`` and the ConvergenceWarning come from
scikit-learn's ``_check_optimize_result``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy
import scipy.optimize
import torch
from sklearn.utils.optimize import _check_optimize_result

from fnmlp._tree import flatten, unflatten
from fnmlp.nn import MLP, Loss, value_and_grad
from fnmlp.train.engine import Reporter, StepThreads, describe_threads, settle_thread

if TYPE_CHECKING:
    from fnmlp.sklearn._base import BaseMLP

F64 = torch.float64
# scikit-learn passes iprint=-1 to scipy < 1.15 only (deprecated from 1.15)
_IPRINT = tuple(int(part) for part in scipy.__version__.split(".")[:2]) < (1, 15)


class FlatObjective:
    """scikit-learn's L-BFGS objective on one float64 vector: the value and the gradient of
    ``loss`` (with the ``l2`` penalty) over every row, by fnmlp's explicit backward rules."""

    def __init__(self, model: MLP, params, x: torch.Tensor, y: torch.Tensor, loss: Loss,
                 weight: torch.Tensor | None, l2: float):
        self.model, self.x, self.y, self.loss, self.weight, self.l2 = model, x, y, loss, weight, l2
        leaves, self.spec = flatten(params)
        self.shapes = [leaf.shape for leaf in leaves]
        self.sizes = [leaf.numel() for leaf in leaves]
        self.device = leaves[0].device
        self.state = model.init_state(dtype=F64, device=self.device)

    def vector(self, params) -> np.ndarray:
        """``params`` (any dtype or device) as one float64 vector."""
        leaves, _ = flatten(params)
        return torch.cat([leaf.detach().reshape(-1).to(F64) for leaf in leaves]).cpu().numpy()

    def params(self, vector: np.ndarray, dtype: torch.dtype = F64) -> tuple:
        """The parameters ``vector`` holds (copied), in ``dtype`` on the model's device."""
        flat = torch.tensor(vector, dtype=dtype, device=self.device)
        leaves = [piece.reshape(shape) for piece, shape in zip(flat.split(self.sizes),
                                                                 self.shapes)]
        return unflatten(leaves, self.spec)

    def check(self, vector: np.ndarray) -> None:
        """Every check of ``MLP.value_and_grad`` (data, targets, weights, l2), once."""
        self.model.value_and_grad(self.params(vector), self.x, self.y, self.loss,
                                  sample_weight=self.weight, l2=self.l2)

    def __call__(self, vector: np.ndarray) -> tuple[float, np.ndarray]:
        """``(objective, gradient)`` at ``vector``, as scipy's ``jac=True`` takes them."""
        with torch.no_grad():
            value, grads, _ = value_and_grad(self.model, self.params(vector), self.x, self.y,
                                             self.loss, self.state, weight=self.weight,
                                             l2=self.l2)
            grad = torch.cat([g.reshape(-1) for g in flatten(grads)[0]])
        return float(value), grad.cpu().numpy()


def check_lbfgs_model(estimator: BaseMLP) -> None:
    """Refuse what a deterministic full-batch objective cannot hold, and the options of the
    stochastic loop, naming them (before any work)."""
    model = estimator._build_model(1, 1)
    if model.has_dropout or model.has_state:
        what = "Dropout" if model.has_dropout else "running statistics (BatchNorm)"
        raise ValueError(f"solver='lbfgs' minimizes one deterministic full-batch loss; layers "
                         f"with {what} need a stochastic solver such as 'adam'")
    if estimator.checkpoint is not None or estimator.resume:
        raise ValueError("checkpoint= and resume= are for the stochastic solvers; "
                         "solver='lbfgs' keeps no checkpoint")


def fit_lbfgs(estimator: BaseMLP, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
              loss: Loss) -> None:
    """Fit ``estimator.params_`` by L-BFGS-B from where they are (a fresh draw, a warm start
    or weights set through ``coefs_``) on float64 tensors ``x``, ``y`` and ``weight`` (None:
    every row weighs 1), and set ``n_iter_`` and ``loss_``."""
    settle_thread()  # this thread's torch thread count, before its first torch work
    dtype = flatten(estimator.params_)[0][0].dtype
    objective = FlatObjective(estimator.model_, estimator.params_, x, y, loss, weight,
                              float(estimator.alpha))
    start = objective.vector(estimator.params_)
    objective.check(start)
    if estimator.verbose:
        print(f"fnmlp: L-BFGS-B (scipy) over all {x.shape[0]} rows in float64, "
              f"{start.size} parameters; "
              f"{describe_threads('auto', estimator.model_, x.shape[0])}")
    watch = _Watch(estimator)
    threads = StepThreads("auto", estimator.model_)(x.shape[0], x.device)  # as a step's
    try:
        with threads:
            result = scipy.optimize.minimize(
                objective, start, method="L-BFGS-B", jac=True, callback=watch,
                options={"maxfun": estimator.max_fun, "maxiter": estimator.max_iter,
                         "gtol": estimator.tol, **({"iprint": -1} if _IPRINT else {})})
    finally:
        watch.close()
    if watch.stopped:  # on_epoch_end asked to stop: not a failure to converge
        estimator.n_iter_ = min(result.nit, estimator.max_iter)
    else:
        estimator.n_iter_ = _check_optimize_result("lbfgs", result, estimator.max_iter)
    estimator.loss_ = float(result.fun)
    estimator.params_ = objective.params(result.x, dtype)


class _Watch:
    """scipy's per-iteration callback: ``verbose`` lines, the ``progress`` bar and the
    ``on_epoch_end`` callback (a true result stops the fit)."""

    def __init__(self, estimator: BaseMLP):
        self.estimator, self.iteration, self.stopped = estimator, 0, False
        self.bar = Reporter(False, bool(estimator.progress), range(estimator.max_iter))

    def __call__(self, intermediate_result) -> None:
        """After an iteration (scipy passes ``intermediate_result`` by this name)."""
        loss = float(intermediate_result.fun)
        self.iteration += 1
        if self.estimator.verbose:
            print("Iteration %d, loss = %.8f" % (self.iteration, loss))
        self.bar.on_epoch_end(None, {"epoch": self.iteration - 1, "train_losses": [loss]})
        callback, epoch = self.estimator.on_epoch_end, self.iteration - 1
        if callback is not None and callback(epoch, {"epoch": epoch, "train_loss": loss}):
            self.stopped = True
            raise StopIteration

    def close(self) -> None:
        self.bar.close()
