"""The training loop: epochs of minibatch steps at the edge of the pure core."""

from __future__ import annotations

import dataclasses
import math

import torch

from fnmlp import _validate
from fnmlp._tree import tree_leaves
from fnmlp.nn._dropout import make_key
from fnmlp.nn._losses import Loss, mse
from fnmlp.nn._model import MLP, Params, State, _check_loss, _first_leaf, forward
from fnmlp.nn._primitive import EVAL
from fnmlp.train._errors import NonFiniteLossError
from fnmlp.train._step import train_step


@dataclasses.dataclass
class History:
    """One float per epoch: mean of the batch losses, and the loss on ``valid`` (if given)."""

    train_loss: list[float] = dataclasses.field(default_factory=list)
    valid_loss: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What ``fit`` returns: the trained ``params``, the optimizer's ``opt_state`` (to continue
    training), the ``history`` and the model's ``state`` (``BatchNorm``'s running statistics;
    a tuple of ``()`` for a stateless model)."""

    params: Params
    opt_state: object
    history: History
    state: State = ()


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
    sample_weight=None,
    valid: tuple | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    opt_state=None,
    state: State | None = None,
    verbose: bool = False,
    compile: bool = False,
    compiler: str = "auto",
    verify: bool = False,
) -> FitResult:
    """Train ``params`` for ``epochs`` passes over (x, y) in minibatches of ``batch_size``.

    Arguments:
        model, params: the network spec and its parameters (not modified).
        x: (n, in_features) inputs; y: (n, out_features) targets, or (n,) class labels for
            cross-entropy. Tensors on the parameters' dtype and device, or arrays.
        epochs, batch_size: passes over the data and rows per step (the last batch may be
            smaller).
        optimizer: an fnmlp optimizer; ``opt_state`` continues from an earlier result.
        loss: an fnmlp loss (default ``fnmlp.mse``).
        sample_weight: (n,) non-negative row weights; each batch's loss is their weighted mean
            (a batch whose rows all weigh 0 is skipped).
        valid: ``(x_valid, y_valid)``: adds an evaluation-mode loss per epoch.
        shuffle: draw a permutation per epoch from ``generator`` (else batches in order).
        generator: the source of the shuffles and dropout keys.
        state: the model's state (``BatchNorm``); default ``model.init_state``.
        verbose: print a line per epoch.
        compile: train with the compiled step (``fnmlp.train_step``; one graph for every batch,
            the short last one padded with rows of weight 0); ``compiler`` chooses how
            ("auto", "inductor" or "dynamo"); ``verify`` checks its first step against the
            eager step.

    Returns a ``FitResult``; a loss that turns NaN or inf raises ``NonFiniteLossError``.
    """
    _check_loss(loss)
    _validate.check_positive_int(epochs, "epochs", allow_zero=True)
    _validate.check_positive_int(batch_size, "batch_size")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    step = train_step(model, loss, optimizer, compile=compile, verify=verify, compiler=compiler)
    x, y = model.check_data(params, x, y, loss=loss)
    like = _first_leaf(params)
    if not _all_finite(params):
        raise ValueError("params contain NaN or inf before training; start from finite "
                         "parameters (e.g. model.init)")
    weight = _validate.as_weights(sample_weight, x.shape[0], like)
    if valid is not None:
        if not (isinstance(valid, (tuple, list)) and len(valid) == 2):
            raise TypeError("valid must be a pair (x_valid, y_valid)")
        x_valid, y_valid = model.check_data(params, *valid, loss=loss,
                                            names=("x_valid", "y_valid"))
    if state is None:
        state = model.init_state(dtype=like.dtype, device=like.device)
    else:
        model.check_state(state, like)
    for start in range(0, x.shape[0] if model.has_batch_statistics else 0, batch_size):
        model.check_training_rows(  # every batch, before any work
            min(batch_size, x.shape[0] - start),
            None if weight is None or shuffle else weight[start:start + batch_size],
            f" (batch {start // batch_size} of {x.shape[0]} rows in batches of {batch_size}; "
            "choose another batch_size)")
    if (shuffle or model.has_dropout) and generator is None:
        generator = torch.Generator()
        generator.seed()
    dropout_seed = None
    if model.has_dropout:
        dropout_seed = int(torch.randint(0, 2**32, (), generator=generator,
                                         device=generator.device))

    with torch.no_grad():
        if opt_state is None:
            opt_state = optimizer.init(params)
        else:
            optimizer.check(params, None, opt_state)
        history = History()
        previous = (params, opt_state, state)
        n = x.shape[0]
        pad_to = batch_size if compile and n > batch_size else None
        steps_done = 0
        try:
            for epoch in range(epochs):
                order = None
                if shuffle:
                    order = torch.randperm(n, generator=generator,
                                           device=generator.device).to(x.device)
                batch_losses = []
                for batch, start in enumerate(range(0, n, batch_size)):
                    rows = slice(start, start + batch_size) if order is None else \
                        order[start:start + batch_size]
                    batch_weight = None if weight is None else weight[rows]
                    if batch_weight is not None:
                        if not bool(batch_weight.any()):
                            continue  # every row weighs 0: nothing to learn, no step
                        if shuffle:  # a shuffled batch's weights are known only now
                            model.check_training_rows(len(batch_weight), batch_weight,
                                                      f" (epoch {epoch}, batch {batch})")
                    key = None
                    if dropout_seed is not None:
                        key = make_key(dropout_seed, steps_done, device=x.device)
                    new_params, new_opt_state, value, new_state = step.run(
                        params, opt_state, state, x[rows], y[rows], weight=batch_weight,
                        key=key, pad_to=pad_to)
                    steps_done += 1
                    value = value.item()
                    if not math.isfinite(value):
                        if not _all_finite(params):  # the previous update overflowed: step back
                            params, opt_state, state = previous
                        raise NonFiniteLossError(
                            f"the loss became {value} in epoch {epoch}, batch {batch}; the "
                            "error carries the last finite parameters (.params) and the "
                            "history so far; try a smaller learning rate",
                            epoch=epoch, batch=batch, params=params, opt_state=opt_state,
                            history=history, state=state)
                    previous = (params, opt_state, state)
                    params, opt_state, state = new_params, new_opt_state, new_state
                    batch_losses.append(value)
                history.train_loss.append(sum(batch_losses) / len(batch_losses)
                                          if batch_losses else math.nan)
                if valid is not None:
                    prediction = forward(model, params, x_valid, state, EVAL)[0]
                    history.valid_loss.append(loss(prediction, y_valid).item())
                if verbose:
                    line = f"Epoch: {epoch} - L: {history.train_loss[-1]:.4f}"
                    if valid is not None:
                        line += f" - L_v {history.valid_loss[-1]:.4f}"
                    print(line)
        finally:
            step.forget()
    return FitResult(params=params, opt_state=opt_state, history=history, state=state)


def _all_finite(tree) -> bool:
    return all(bool(torch.isfinite(leaf).all()) for leaf in tree_leaves(tree))
