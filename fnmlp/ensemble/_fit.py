"""``Ensemble.fit``: every member trained by one step per batch, through the one training loop
(``fnmlp.train.engine``), with per-member learning rates, weight decay, bagging, dropout keys,
early stopping, checkpoints and resume."""

from __future__ import annotations

import dataclasses
from typing import cast

import torch
from torch import Tensor

from fnmlp import _validate
from fnmlp.ensemble._ensemble import Ensemble, per_member_targets
from fnmlp.nn import Loss, check_loss_weights, mse
from fnmlp.train.engine import (BatchSource, CallbackRunner, Carry, Checkpointer, EarlyStopping,
                                EpochMetrics, HistoryKeeper, Policy, Reporter, Run, check_callbacks,
                                check_metrics, check_metrics_run, check_run_options, check_threads,
                                check_valid, checkpoint_settings, choose_compile,
                                choose_steps_per_call, epoch_log_keys, kept_history, restore_run,
                                settle_thread, train_loop)


@dataclasses.dataclass
class EnsembleHistory:
    """Per epoch, one float per member: the mean of its batch losses (NaN for a member without
    weight in the epoch) and its loss on ``valid`` (if given). ``best_epoch``: per member, the
    epoch of its lowest validation loss (None without validation); ``stopped_epoch``: the
    epoch count after which it stopped early (None when it trained to the end);
    ``diverged_epoch``: the epoch whose loss became NaN or inf (the member is then put back to
    that epoch's start and trains no more; None when it never did). ``lr``: per epoch, each
    member's learning rate as the epoch logs held it; ``metrics``: each metric of
    ``metrics=`` (``"r2"``, ``"valid_r2"``), per epoch one float per member (``{}`` without
    metrics). A resumed checkpointed fit's history holds every epoch, equal to an
    uninterrupted fit's."""

    train_loss: list[list[float]] = dataclasses.field(default_factory=list)
    valid_loss: list[list[float]] = dataclasses.field(default_factory=list)
    best_epoch: list[int | None] = dataclasses.field(default_factory=list)
    stopped_epoch: list[int | None] = dataclasses.field(default_factory=list)
    diverged_epoch: list[int | None] = dataclasses.field(default_factory=list)
    lr: list[list[float]] = dataclasses.field(default_factory=list)
    metrics: dict[str, list[list[float]]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class EnsembleFitResult:
    """What ``Ensemble.fit`` returns: stacked ``params``, ``opt_state`` and ``state``, and the
    ``history``."""

    params: object
    opt_state: object
    history: EnsembleHistory
    state: object = ()


def fit_ensemble(ensemble: Ensemble, params, x, y, *, epochs: int, batch_size: int, optimizer,
                 loss: Loss = mse, lr=None, weight_decay=None, l2: float = 0.0,
                 sample_weight=None, bagging: bool = False, valid: tuple | None = None,
                 shuffle: bool = False, generator: torch.Generator | None = None,
                 opt_state=None, state=None, patience: int | None = None,
                 min_delta: float = 0.0, restore_best: bool = False,
                 compile: bool | str = "auto", compiler: str = "auto", verify: bool = False,
                 threads: int | str | None = "auto", steps_per_call: int | str = "auto",
                 verbose: bool = False, progress: bool | None = None, on_epoch_end=None,
                 callbacks=None, metrics=None, checkpoint=None, checkpoint_every: int = 1,
                 resume: bool = False) -> EnsembleFitResult:
    """Train all members of ``ensemble`` for ``epochs`` passes over (x, y).

    Arguments:
        params: stacked parameters (``Ensemble.init``); not modified.
        x, y, epochs, batch_size, optimizer, loss, l2, shuffle, generator, opt_state, state,
            compile, compiler, verify, threads, steps_per_call, verbose, progress,
            checkpoint, checkpoint_every, resume: as ``fnmlp.fit`` ("auto" counts
            member-steps); every member sees the same batches (one shuffle per epoch), unless
            bagging.
        lr: one learning rate or one per member (ignored with ``opt_state``, which holds them).
        weight_decay: one weight decay per member (see ``Ensemble.train_step``).
        sample_weight: (n,) row weights, or (K, n) one set per member.
        bagging: each member trains on its own bootstrap sample of the rows (n draws with
            replacement from ``generator``), given as row counts (weights), so the members
            still share each batch's rows and its first layer's product.
        valid: (x_valid, y_valid): each member's validation loss per epoch.
        patience, min_delta: a member stops (its parameters freeze; the others go on) after
            ``patience`` epochs without its validation loss improving by more than
            ``min_delta``; the fit ends when every member has stopped.
        restore_best: return each member's parameters from its best validation epoch.
        on_epoch_end: ``f(epoch, logs) -> stop?``, ``logs`` as ``callbacks`` get them.
        callbacks, metrics: as ``fnmlp.fit``'s; per-member values in the logs (losses,
            metrics on each member's prediction, ``lr``) are lists of K floats, and
            ``ReduceLROnPlateau`` keeps a plateau per member.

    A member whose epoch loss is NaN or inf goes back to that epoch's start and trains no more
    (``history.diverged_epoch``); the others go on.
    """
    settle_thread()  # this thread's torch thread count, before its first torch work
    _validate.check_positive_int(epochs, "epochs", allow_zero=True)
    _validate.check_positive_int(batch_size, "batch_size")
    check_run_options(checkpoint, checkpoint_every, resume, patience, min_delta, restore_best,
                      on_epoch_end, progress, valid, generator, shuffle=shuffle,
                      verbose=verbose, verify=verify, bagging=bagging)
    metrics = check_metrics(metrics)
    log_keys = epoch_log_keys(valid is not None, metrics)
    callbacks = check_callbacks(callbacks, on_epoch_end, log_keys=log_keys,
                                members=ensemble.size)  # each callback's check: before any work
    check_threads(threads)
    like = ensemble.check_params(params)
    _validate.check_no_autocast(like.device, "Ensemble.fit")
    choose_steps_per_call(steps_per_call, compiled=False, device=like.device, batches=1)
    model = ensemble.model
    check_loss_weights(loss, True if bagging else None, "bagging (bootstrap counts as weights)")
    x, y, weight = ensemble.check_batch(x, y, loss, sample_weight, like, sparse=True)
    if x.ndim == 3 or per_member_targets(y, loss):
        raise ValueError("fit takes data shared by the members, x (n, in) and y (n, ...); "
                         "for per-member samples use bagging=True or per-member "
                         "sample_weight (K, n)")
    valid = check_valid(model, ensemble.member(params, 0), valid, loss, like)
    model_state = (ensemble.init_state(dtype=like.dtype, device=like.device)
                   if state is None and model.has_state
                   else ensemble.check_model_state(state, like))
    n, size = x.shape[0], ensemble.size
    compile, reason = choose_compile(compile, model, -(-n // batch_size) * epochs * size,
                                     loss=loss)
    if verbose:
        print(f"fnmlp: {'compiled' if compile else 'eager'} ensemble step ({reason}, "
              f"counting member-steps)")
    step = ensemble.train_step(loss, optimizer, compile=compile, weight_decay=weight_decay,
                               l2=l2, compiler=compiler, verify=verify, threads=threads)
    if opt_state is None:
        opt_state = ensemble.init_optimizer(optimizer, params, lr=lr)
    else:
        ensemble.check_stacked(opt_state, "opt_state")
        optimizer.check(ensemble.member(params, 0), None, ensemble.member(opt_state, 0))
    for start in range(0, n if weight is None and model.has_batch_statistics else 0,
                       batch_size):  # every batch, before any work
        ensemble.check_training_rows(min(batch_size, n - start), None,
                                     f" (batch {start // batch_size}; choose another "
                                     "batch_size)")
    settings = {}
    if checkpoint is not None:  # refused now rather than at the first checkpoint
        settings = checkpoint_settings(
            ensemble, optimizer, loss, batch_size=batch_size, shuffle=shuffle,
            bagging=bagging, weighted=weight is not None, rows=n, l2=step.l2,
            weight_decay=step.weight_decay, data=(x, y, weight, valid))
    if (shuffle or bagging or model.has_dropout) and generator is None:
        generator = torch.Generator()
        generator.seed()
    run = None
    if resume:
        run = restore_run(checkpoint, ensemble, optimizer, like, generator, settings, epochs,
                          members=size)
    if run is None:
        run = Run(Carry(params, opt_state, model_state), members=size)
        draws = cast(torch.Generator, generator)  # made above when bagging or dropout draws
        if bagging:  # the draws are part of the run: a resumed fit trains on the same samples
            run.tensors["bagging_weight"] = _bootstrap_counts(size, n, draws, like) * (
                1 if weight is None else weight)
        if model.has_dropout:
            run.dropout_seed = int(torch.randint(0, 2**32, (), generator=draws,
                                                 device=draws.device))
    weight = run.tensors.get("bagging_weight", weight)
    source = BatchSource(
        x, y, weight, batch_size=batch_size, shuffle=shuffle, generator=generator,
        pad_to=batch_size if compile and n > batch_size else None, members=size,
        steps_per_call=choose_steps_per_call(steps_per_call, compiled=compile,
                                             device=like.device, batches=-(-n // batch_size)),
        densify=(lambda rows: _validate.dense_rows(rows, "x", like))
        if _validate.is_sparse(x) else None,
        check_rows=(lambda w, where: ensemble.check_training_rows(w.shape[-1], w, where))
        if model.has_batch_statistics else None)

    def predict(carry, inputs):
        return list(ensemble.apply(carry.params, inputs, state=carry.state))

    check_metrics_run(metrics, predict, run.carry, (x, y), valid)  # before any work
    policies: list[Policy] = [EarlyStopping(step, patience, min_delta)]
    if metrics:
        policies.append(EpochMetrics(metrics, predict, (x, y), valid))
    policies.append(HistoryKeeper())
    policies.append(Reporter(verbose, progress, range(run.epoch, epochs)))
    if callbacks:
        policies.append(CallbackRunner(
            callbacks, lead=True, optimizer=optimizer, epochs=epochs,
            log_keys=log_keys, member=ensemble.member))
    saver = None if checkpoint is None else Checkpointer(checkpoint, step, generator, settings,
                                                          checkpoint_every)
    train_loop(step, source, run, epochs=epochs, valid=valid, policies=policies,
               checkpoint=saver, on_non_finite="freeze")
    lr_history, metric_history = kept_history(run)
    history = EnsembleHistory(
        train_loss=run.train_loss, valid_loss=run.valid_loss,
        best_epoch=run.best_epoch if valid is not None else [None] * size,
        stopped_epoch=run.stopped_epoch, diverged_epoch=run.diverged_epoch,
        lr=lr_history, metrics=metric_history)
    params, model_state = (run.best if restore_best and run.best is not None
                           else (run.carry.params, run.carry.state))
    return EnsembleFitResult(params=params, opt_state=run.carry.opt_state, history=history,
                             state=model_state)


def _bootstrap_counts(size: int, rows: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """(K, n) bootstrap counts: how often each row is drawn in n draws with replacement."""
    draws = torch.randint(0, rows, (size, rows), generator=generator, device=generator.device)
    counts = torch.zeros(size, rows, dtype=like.dtype, device=generator.device)
    counts.scatter_add_(1, draws, torch.ones_like(counts))
    return counts.to(like.device)
