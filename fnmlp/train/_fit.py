"""``fit`` of one network: its checks, then the one training loop (``fnmlp.train._loop``)
over a ``TrainStep`` (or the steps a ``Strategy`` makes: data-parallel ranks)."""

from __future__ import annotations

import dataclasses
import os
from typing import cast

import torch
from torch import Tensor

from fnmlp import _validate
from fnmlp.interop import check_writable
from fnmlp.nn import MLP, Loss, Params, State, check_l2, check_loss, check_loss_weights, mse
from fnmlp.train._auto import choose_compile, choose_steps_per_call, compiled_before
from fnmlp.train._callbacks import CallbackRunner, check_callbacks
from fnmlp.train._epoch_metrics import EpochMetrics, check_metrics, check_metrics_run
from fnmlp.train._errors import NonFiniteLossError
from fnmlp.train._executor import Carry
from fnmlp.train._loop import BatchSource, EarlyStopping, Policy, Run, all_finite, train_loop
from fnmlp.train._policies import (Checkpointer, HistoryKeeper, Reporter, epoch_log_keys,
                                   kept_history)
from fnmlp.train._run import data_fingerprint, restore_run
from fnmlp.train._step import TrainStep, network_identity
from fnmlp.train._thread_scopes import settle_thread
from fnmlp.train._threads import check_threads, describe_threads


@dataclasses.dataclass
class History:
    """One float per epoch: mean of the batch losses, the loss on ``valid`` (if given), the
    learning rate (``lr``: the epoch logs' ``lr``, the rate of the next update) and each
    metric of ``metrics=`` (``metrics["r2"]``, ``metrics["valid_r2"]``: the epoch logs'
    values; ``{}`` without metrics), as Keras's ``history.history``. A resumed checkpointed
    fit's history holds every epoch, equal to an uninterrupted fit's."""

    train_loss: list[float] = dataclasses.field(default_factory=list)
    valid_loss: list[float] = dataclasses.field(default_factory=list)
    lr: list[float] = dataclasses.field(default_factory=list)
    metrics: dict[str, list[float]] = dataclasses.field(default_factory=dict)


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
    l2: float = 0.0,
    sample_weight=None,
    valid: tuple | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    opt_state=None,
    state: State | None = None,
    verbose: bool = False,
    compile: bool | str = "auto",
    compiler: str = "auto",
    verify: bool = False,
    threads: int | str | None = "auto",
    steps_per_call: int | str = "auto",
    checkpoint=None,
    checkpoint_every: int = 1,
    resume: bool = False,
    patience: int | None = None,
    min_delta: float = 0.0,
    restore_best: bool = False,
    on_epoch_end=None,
    callbacks=None,
    metrics=None,
    progress: bool | None = None,
    strategy: Strategy | None = None,
) -> FitResult:
    """Train ``params`` for ``epochs`` passes over (x, y) in minibatches of ``batch_size``.

    Arguments:
        model, params: the network spec and its parameters (not modified).
        x: (n, in_features) inputs; y: (n, out_features) targets, or (n,) class labels for
            cross-entropy. Tensors on the parameters' device, NumPy arrays, DataFrames or
            lists; data of any real dtype takes the parameters' (class labels stay
            integers; ``fnmlp._validate.as_data`` has the rule). x may be a SciPy sparse
            matrix, densified batch by batch (a sparse ``x_valid`` is densified once).
        epochs, batch_size: passes over the data and rows per step (the last batch may be
            smaller).
        optimizer: an fnmlp optimizer; ``opt_state`` continues from an earlier result.
        loss: an fnmlp loss (default ``fnmlp.mse``).
        l2: an L2 penalty on the ``Linear`` weights as scikit-learn's ``alpha``: l2/(2N)·
            sum ||W||² added to every batch's loss, N its rows (or weight sum).
        sample_weight: (n,) non-negative row weights; each batch's loss is their weighted mean
            (a batch whose rows all weigh 0 is skipped).
        valid: ``(x_valid, y_valid)``: adds an evaluation-mode loss per epoch.
        shuffle: draw a permutation per epoch from ``generator`` (else batches in order).
        generator: the source of the shuffles and dropout keys.
        state: the model's state (``BatchNorm``); default ``model.init_state``.
        verbose: print a line per epoch.
        compile: True: the compiled step (``fnmlp.train_step``; one graph for every batch, the
            short last one padded with rows of weight 0); False: the eager step; "auto" (the
            default): compiled only when an estimate made before the first step says
            compiling pays for itself (steps x the time a compiled step saves against the
            compile time, cheap when this process compiled the same step before;
            ``fnmlp.train._auto``); ``verbose`` says which and why. ``compiler`` chooses how
            ("auto", "inductor" or "dynamo"); ``verify`` checks the first compiled step
            against the eager step.
        threads: intra-op threads per step (``fnmlp.train_step``'s): "auto" one thread or
            torch's current count, as measured on this machine for the step's size and as
            other processes leave cores free, chosen once for the fit (kept in its
            checkpoints); or a count (at most torch's current count); or None: torch's count
            as it is, never set. Set for each step (in this thread) and put back after it;
            safe beside fits and torch code in other threads; ``verbose`` says which.
        steps_per_call: the steps run by one call of the step, at most an epoch's batches:
            compiled, a chunk of N steps is one graph (on CUDA one graph replay, the host's
            work paid once per chunk); its losses are read once per epoch. "auto": up to 8
            on CUDA when compiled, else 1. Checkpoints fall at epoch ends, between chunks.
        checkpoint: a file to checkpoint the fit to (``fnmlp.save``'s format) every
            ``checkpoint_every`` epochs and at the end; with ``resume=True`` and the file
            present, the fit continues from it (``params``, ``opt_state`` and ``state`` passed
            in are then ignored) and ends bit-identical to an uninterrupted fit.
        patience, min_delta: stop after ``patience`` epochs without the validation loss
            improving by more than ``min_delta`` (needs ``valid``).
        restore_best: return the parameters and state of the best validation loss (a
            checkpoint keeps the last epoch's, to resume from, and the best ones in its
            ``extra["best_params"]`` and ``extra["best_state"]``).
        on_epoch_end: ``f(epoch, logs) -> stop?`` after every epoch (a callback: ``logs`` as
            ``callbacks`` get them); a true result stops the fit.
        callbacks: a list of ``fnmlp.callbacks.Callback`` (``CSVLogger``, ``TensorBoard``,
            ``ReduceLROnPlateau``, your own); epoch logs hold ``epoch``, ``train_loss``,
            ``valid_loss``, the metrics, ``lr`` (the rate of the next update, read before
            the callbacks run), ``epoch_time`` (s) and ``samples_per_s``.
        metrics: ``{"name": f(prediction, target) -> float}`` (``fnmlp.metrics``), each
            evaluated every epoch in evaluation mode on (x, y) (logs ``name``) and on
            ``valid`` (``valid_name``); a forward pass over each.
        progress: a progress bar over the epochs (tqdm); default: when stderr is a terminal.
        strategy: where the steps run: this process (the default) or data-parallel ranks
            (``fnmlp.fit(..., distributed=True)`` passes ``fnmlp.distributed``'s).

    Returns a ``FitResult``; a loss that turns NaN or inf raises ``NonFiniteLossError`` (after
    checkpointing the last finite parameters, when checkpointing).
    """
    settle_thread()  # this thread's torch thread count, before its first torch work
    if not isinstance(model, MLP):
        raise TypeError(f"fnmlp.train.fit trains one fnmlp.MLP, got {type(model).__name__}; "
                        "an ensemble trains with fnmlp.fit or Ensemble.fit, and a torch.nn "
                        "module converts with fnmlp.from_torch(module)")
    check_loss(loss)
    check_loss_weights(loss, sample_weight)
    _validate.check_positive_int(epochs, "epochs", allow_zero=True)
    _validate.check_positive_int(batch_size, "batch_size")
    check_run_options(checkpoint, checkpoint_every, resume, patience, min_delta, restore_best,
                      on_epoch_end, progress, valid, generator, shuffle=shuffle,
                      verbose=verbose, verify=verify)
    metrics = check_metrics(metrics)
    log_keys = epoch_log_keys(valid is not None, metrics)
    callbacks = check_callbacks(callbacks, on_epoch_end, log_keys=log_keys,
                                members=1)  # each callback's check: before any work
    strategy = strategy or Strategy()
    like = model.check_params(params)
    _validate.check_no_autocast(like.device, "fnmlp.fit")
    choose_compile(compile, model, 0)  # a bad value is refused before any work
    choose_steps_per_call(steps_per_call, compiled=False, device=like.device, batches=1)
    check_threads(threads)
    strategy.setup(like, verify=verify, compiler=compiler)
    x, y = model.check_data(params, x, y, loss=loss, like=like,  # ranks compare dense x
                            sparse=type(strategy) is Strategy)
    l2 = check_l2(l2)
    compile, reason = choose_compile(
        compile, model, -(-x.shape[0] // batch_size) * epochs,
        cached=compile == "auto" and compiled_before(
            network_identity(model, loss, optimizer, l2, None, compiler)), loss=loss)
    compile, reason = strategy.agree_compile(compile, reason)
    if verbose and strategy.lead:
        print(f"fnmlp: {'compiled' if compile else 'eager'} steps ({reason})"
              f"; {describe_threads(threads, model, batch_size)}")
    step = strategy.make_step(model, loss, optimizer, compile=compile, verify=verify,
                              compiler=compiler, l2=l2, threads=threads)
    if not all_finite(params):
        raise ValueError("params contain NaN or inf before training; start from finite "
                         "parameters (e.g. model.init)")
    weight = _validate.as_weights(sample_weight, x.shape[0], like)
    valid = check_valid(model, params, valid, loss, like)
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
    settings = {}
    if checkpoint is not None:  # refused now rather than at the first checkpoint
        settings = checkpoint_settings(model, optimizer, loss, batch_size=batch_size,
                                       shuffle=shuffle, weighted=weight is not None,
                                       rows=x.shape[0], l2=l2, data=(x, y, weight, valid))
    if (shuffle or model.has_dropout) and generator is None:
        generator = torch.Generator()
        generator.seed()
    strategy.check_same_run(x, y, weight, valid, epochs=epochs, batch_size=batch_size,
                            shuffle=shuffle, resume=resume, fingerprint=settings.get("data"))
    run = None
    if resume:
        run = restore_run(checkpoint, model, optimizer, like, generator, settings, epochs)
        if run is not None and not all_finite(run.carry.params):
            raise ValueError(f"{checkpoint} holds non-finite parameters")
    if run is None:
        if opt_state is None:
            opt_state = optimizer.init(params)
        else:
            optimizer.check(params, None, opt_state)
        run = Run(Carry(params, opt_state, state))
        if model.has_dropout:  # the cast: a model with dropout got a generator above
            run.dropout_seed = int(torch.randint(0, 2**32, (), generator=generator,
                                                 device=cast(torch.Generator, generator).device))
    generator = strategy.start(run, generator)
    source = BatchSource(
        x, y, weight, batch_size=batch_size, shuffle=shuffle, generator=generator,
        pad_to=batch_size if compile and x.shape[0] > batch_size else None,
        densify=(lambda rows: _validate.dense_rows(rows, "x", like))
        if _validate.is_sparse(x) else None,
        steps_per_call=choose_steps_per_call(steps_per_call, compiled=compile,
                                             device=like.device,
                                             batches=-(-x.shape[0] // batch_size)),
        check_rows=(lambda w, where: model.check_training_rows(w.shape[0], w, where))
        if model.has_batch_statistics else None)

    def predict(carry, inputs):
        return [model.apply(carry.params, inputs, state=carry.state)]

    check_metrics_run(metrics, predict, run.carry, (x, y), valid)  # before any work
    policies: list[Policy] = [EarlyStopping(step, patience, min_delta)]
    if metrics:
        policies.append(EpochMetrics(metrics, predict, (x, y), valid))
    policies.append(HistoryKeeper())
    policies.append(Reporter(verbose, progress, range(run.epoch, epochs), step.lead))
    if callbacks:
        policies.append(CallbackRunner(
            callbacks, lead=step.lead, optimizer=optimizer, epochs=epochs,
            log_keys=log_keys))
    saver = None if checkpoint is None else Checkpointer(checkpoint, step, generator, settings,
                                                          checkpoint_every)
    try:
        train_loop(step, source, run, epochs=epochs, valid=valid, policies=policies,
                   checkpoint=saver, on_non_finite="raise")
    except NonFiniteLossError as error:
        error.history = _history(run)
        raise
    strategy.finish()
    params, state = (run.best if restore_best and run.best is not None
                     else (run.carry.params, run.carry.state))
    return FitResult(params=params, opt_state=run.carry.opt_state, history=_history(run),
                     state=state)


def _history(run: Run) -> History:
    """One network's history: the run's one-member lists as floats."""
    lr, metrics = kept_history(run)
    return History([losses[0] for losses in run.train_loss],
                   [losses[0] for losses in run.valid_loss],
                   [rates[0] for rates in lr],
                   {name: [values[0] for values in column] for name, column in metrics.items()})


class Strategy:
    """Where one network's steps run: this process. (``fnmlp.distributed`` provides the
    data-parallel one: every rank runs the same fit on its shard of each batch.)"""

    lead = True

    def setup(self, like: Tensor, *, verify: bool, compiler: str) -> None:
        """Called once the parameters are checked, before any work."""

    def agree_compile(self, compile: bool, reason: str) -> tuple[bool, str]:
        return compile, reason

    def make_step(self, model, loss, optimizer, *, compile, verify, compiler, l2, threads):
        return TrainStep(model, loss, optimizer, compile=compile, verify=verify,
                         compiler=compiler, l2=l2, threads=threads)

    def check_same_run(self, x, y, weight, valid, **settings) -> None:
        """Refuse a run that differs between processes (``settings``: the loop's, and
        ``fingerprint``, the checkpointed data's ``data_fingerprint`` or None)."""

    def start(self, run: Run, generator):
        """The generator to shuffle with, once ``run`` is made or restored."""
        return generator

    def finish(self) -> None:
        """Called after the last epoch."""


def check_valid(model, params, valid, loss, like: Tensor):
    """``valid`` as checked tensors ``(x_valid, y_valid)``, or None."""
    if valid is None:
        return None
    if not (isinstance(valid, (tuple, list)) and len(valid) == 2):
        raise TypeError("valid must be a pair (x_valid, y_valid)")
    x, y = model.check_data(params, *valid, loss=loss, like=like, names=("x_valid", "y_valid"),
                            sparse=True)
    if _validate.is_sparse(x):  # its loss is computed on every row each epoch: densified once
        x = _validate.dense_rows(x, "x_valid", like)
    return x, y


def checkpoint_settings(model, optimizer, loss, *, data: tuple | None = None,
                        **settings) -> dict:
    """What must be the same to resume a checkpointed fit; refuses (now rather than at the
    first checkpoint) a model or optimizer that cannot be saved. ``data``: the fit's checked
    training data (x, y, row weights, validation data or None), stored as its fingerprint
    (``data_fingerprint``, hashed once here) so that a resume on other data is refused."""
    from fnmlp.interop import encode_spec

    encode_spec(model)
    encode_spec(optimizer)
    if data is not None:
        settings["data"] = data_fingerprint(*data)
    return {**settings, "loss": encode_spec(loss)}


def check_run_options(checkpoint, checkpoint_every, resume, patience, min_delta, restore_best,
                      on_epoch_end, progress, valid, generator, **flags) -> None:
    """Refuse a bad option of the loop, naming it (before any work). ``flags``: more options
    that must be True or False (``shuffle=``, ``verbose=``, ``verify=``, ``bagging=``)."""
    for name, value in {"resume": resume, "restore_best": restore_best, **flags}.items():
        check_flag(value, name)
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a file path, got {type(checkpoint).__name__}")
    if checkpoint is not None:  # a directory, a missing or read-only folder: before any work
        check_writable(checkpoint)
    _validate.check_positive_int(checkpoint_every, "checkpoint_every")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint= (the file to resume from)")
    if patience is not None:
        _validate.check_positive_int(patience, "patience")
    if not (isinstance(min_delta, (int, float)) and not isinstance(min_delta, bool)
            and min_delta >= 0):
        raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
    if min_delta != 0 and patience is None and not restore_best:
        raise ValueError(f"min_delta={min_delta!r} only acts with patience= (early stopping) or "
                         "restore_best=True (which epoch is best); pass patience= too, or drop "
                         "min_delta")
    if (patience is not None or restore_best) and valid is None:
        raise ValueError("early stopping (patience=, restore_best=) watches the validation "
                         "loss: pass valid=(x_valid, y_valid)")
    if on_epoch_end is not None and not callable(on_epoch_end):
        raise TypeError(f"on_epoch_end must be callable, got {on_epoch_end!r}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def check_flag(value, name: str) -> None:
    """A TypeError naming option ``name`` unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
