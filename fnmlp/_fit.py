"""The training loop: epochs of minibatch steps at the edge of the pure core."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from fnmlp import _validate
from fnmlp._losses import Loss, mse
from fnmlp._model import MLP, Params, _check_loss, forward
from fnmlp._dropout import make_key
from fnmlp._step import pad_rows, train_step
from fnmlp._tree import tree_leaves


@dataclasses.dataclass
class History:
    """One float per epoch: mean of the batch losses, and the loss on ``valid`` (if given)."""

    train_loss: list[float] = dataclasses.field(default_factory=list)
    valid_loss: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class FitResult:
    params: Params
    opt_state: object
    history: History


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf. Carries the last finite parameters and the history so far."""

    def __init__(self, message, *, epoch, batch, params, opt_state, history):
        super().__init__(message)
        self.epoch, self.batch = epoch, batch
        self.params, self.opt_state, self.history = params, opt_state, history


def fit(
    model: MLP,
    params: Params,
    x,
    y,
    *,
    epochs: int,
    batch_size: int,
    optimizer,
    loss: Loss = mse,
    valid: tuple | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    opt_state=None,
    verbose: bool = False,
    compile: bool = False,
    verify: bool = False,
) -> FitResult:
    """Train ``params`` for ``epochs`` passes over (x, y) in minibatches of ``batch_size``.

    Batches are taken in order (the last one may be smaller) unless ``shuffle=True``, which draws
    a permutation per epoch from ``generator``. ``valid=(x_valid, y_valid)`` adds a validation
    loss per epoch. ``opt_state`` continues from an earlier result. ``compile=True`` trains with
    the compiled step (``fnmlp.train_step``; one graph for every batch, the short last one
    padded and masked); ``verify=True`` checks its first step against the eager step.
    Returns a ``FitResult``.
    """
    _check_loss(loss)
    _validate.check_positive_int(epochs, "epochs", allow_zero=True)
    _validate.check_positive_int(batch_size, "batch_size")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an fnmlp optimizer such as fnmlp.sgd(0.01), "
                        f"got {optimizer!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    x, y = model.check_data(params, x, y, loss=loss)
    if valid is not None:
        if not (isinstance(valid, (tuple, list)) and len(valid) == 2):
            raise TypeError("valid must be a pair (x_valid, y_valid)")
        x_valid, y_valid = model.check_data(params, *valid, loss=loss,
                                            names=("x_valid", "y_valid"))
    if (shuffle or model.has_dropout) and generator is None:
        generator = torch.Generator()
        generator.seed()
    dropout_seed = None
    if model.has_dropout:
        dropout_seed = int(torch.randint(0, 2**32, (), generator=generator,
                                         device=generator.device))
    step = train_step(model, loss, optimizer, compile=compile, verify=verify)

    with torch.no_grad():
        if opt_state is None:
            opt_state = optimizer.init(params)
        history = History()
        previous = (params, opt_state)
        n = x.shape[0]
        steps_done = 0
        for epoch in range(epochs):
            if shuffle:
                order = torch.randperm(n, generator=generator, device=generator.device)
                x_epoch, y_epoch = x[order.to(x.device)], y[order.to(x.device)]
            else:
                x_epoch, y_epoch = x, y
            batch_losses = []
            for batch, (xb, yb, rows) in enumerate(_batches(x_epoch, y_epoch, batch_size,
                                                            pad=compile)):
                key = None
                if dropout_seed is not None:
                    key = make_key(dropout_seed, steps_done, device=x.device)
                new_params, new_state, value = step.run(params, opt_state, xb, yb, rows, key)
                steps_done += 1
                value = value.item()
                if not math.isfinite(value):
                    if not _all_finite(params):  # the previous update overflowed: step back
                        params, opt_state = previous
                    raise NonFiniteLossError(
                        f"the loss became {value} in epoch {epoch}, batch {batch}; the error "
                        "carries the last finite parameters (.params) and the history so far; "
                        "try a smaller learning rate",
                        epoch=epoch, batch=batch, params=params, opt_state=opt_state,
                        history=history,
                    )
                previous = (params, opt_state)
                params, opt_state = new_params, new_state
                batch_losses.append(value)
            history.train_loss.append(sum(batch_losses) / len(batch_losses))
            if valid is not None:
                history.valid_loss.append(loss(forward(model, params, x_valid), y_valid).item())
            if verbose:
                line = f"Epoch: {epoch} - L: {history.train_loss[-1]:.4f}"
                if valid is not None:
                    line += f" - L_v {history.valid_loss[-1]:.4f}"
                print(line)
    return FitResult(params=params, opt_state=opt_state, history=history)


def _batches(x: Tensor, y: Tensor, batch_size: int, *, pad: bool):
    """(x_batch, y_batch, valid_rows) in order; with ``pad``, a short last batch is zero-padded
    to ``batch_size`` so that a compiled step sees one shape."""
    n = x.shape[0]
    for start in range(0, n, batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        rows = xb.shape[0]
        if pad and rows < batch_size and n > batch_size:
            xb, yb = pad_rows(xb, batch_size), pad_rows(yb, batch_size)
        yield xb, yb, rows


def _all_finite(tree) -> bool:
    return all(bool(torch.isfinite(leaf).all()) for leaf in tree_leaves(tree))
