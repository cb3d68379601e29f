"""The training loop: epochs of minibatch steps at the edge of the pure core."""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import torch

from fnmlp import _validate
from fnmlp._tree import tree_leaves
from fnmlp.nn._dropout import make_key
from fnmlp.nn._losses import Loss, mse
from fnmlp.nn._model import MLP, Params, State, check_loss, check_l2, forward
from fnmlp.nn._primitive import EVAL
from fnmlp.train._errors import NonFiniteLossError
from fnmlp.train._auto import choose_compile, compiled_before
from fnmlp.train._threads import check_threads, describe_threads
from fnmlp.train._run import Run, restore_run, save_run
from fnmlp.train._step import TrainStep, train_step


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
    threads: int | str = "auto",
    checkpoint=None,
    checkpoint_every: int = 1,
    resume: bool = False,
    patience: int | None = None,
    min_delta: float = 0.0,
    restore_best: bool = False,
    on_epoch_end=None,
    progress: bool | None = None,
    distributed: bool = False,
) -> FitResult:
    """Train ``params`` for ``epochs`` passes over (x, y) in minibatches of ``batch_size``.

    Arguments:
        model, params: the network spec and its parameters (not modified); an
            ``fnmlp.Ensemble`` and its stacked parameters train every member at once
            (``Ensemble.fit``: its extra options, per-member rates and bagging, are there).
        x: (n, in_features) inputs; y: (n, out_features) targets, or (n,) class labels for
            cross-entropy. Tensors on the parameters' dtype and device, or arrays.
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
        threads: intra-op threads per step (``fnmlp.train_step``'s): "auto" runs a small
            step (below ~16 million multiply-adds) on one thread, a larger one on torch's
            current count; or a count (at most torch's current count). Set for each step and
            put back after it; ``verbose`` says which.
        checkpoint: a file to checkpoint the fit to (``fnmlp.save``'s format) every
            ``checkpoint_every`` epochs and at the end; with ``resume=True`` and the file
            present, the fit continues from it (``params``, ``opt_state`` and ``state`` passed
            in are then ignored) and ends bit-identical to an uninterrupted fit.
        patience, min_delta: stop after ``patience`` epochs without the validation loss
            improving by more than ``min_delta`` (needs ``valid``).
        restore_best: return the parameters and state of the best validation loss.
        on_epoch_end: ``f(epoch, logs) -> stop?``, ``logs`` a dict with ``train_loss`` (and
            ``valid_loss``); a true result stops the fit.
        progress: a progress bar over the epochs (tqdm); default: when stderr is a terminal.
        distributed: data-parallel over the ranks ``torchrun`` started (``fnmlp.distributed``):
            every rank runs this fit on the same data; each global batch's rows are split
            across the ranks, their gradients summed by one all-reduce, and the result is the
            one-process fit of the same global batches (to rounding). Rank 0's parameters (and
            shuffling stream) are broadcast first; only rank 0 prints and checkpoints.

    Returns a ``FitResult``; a loss that turns NaN or inf raises ``NonFiniteLossError`` (after
    checkpointing the last finite parameters, when checkpointing).
    """
    from fnmlp.ensemble import Ensemble

    if isinstance(model, Ensemble):  # every member in one step: Ensemble.fit
        unsupported = {"checkpoint": checkpoint, "resume": resume, "verify": verify,
                       "on_epoch_end": on_epoch_end, "progress": progress,
                       "distributed": distributed,
                       "threads": None if threads == "auto" else threads}
        given = [name for name, value in unsupported.items() if value not in (None, False)]
        if given:
            raise ValueError(f"fit of an Ensemble does not support {', '.join(given)} yet")
        return model.fit(params, x, y, epochs=epochs, batch_size=batch_size,
                         optimizer=optimizer, loss=loss, l2=l2, sample_weight=sample_weight,
                         valid=valid, shuffle=shuffle, generator=generator, opt_state=opt_state,
                         state=state, patience=patience, min_delta=min_delta,
                         restore_best=restore_best, compile=compile, compiler=compiler,
                         verbose=verbose)
    check_loss(loss)
    _validate.check_positive_int(epochs, "epochs", allow_zero=True)
    _validate.check_positive_int(batch_size, "batch_size")
    _check_run_options(checkpoint, checkpoint_every, resume, patience, min_delta, restore_best,
                       on_epoch_end, progress, valid)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    like = model.check_params(params)
    choose_compile(compile, model, 0)  # a bad value is refused before any work
    check_threads(threads)
    lead = True
    if distributed:
        from fnmlp import distributed as data_parallel

        if verify or compiler != "auto" or threads != "auto":
            raise ValueError("verify=, compiler= and threads= are not supported with "
                             "distributed=True")
        data_parallel.init(device=like.device)
        lead = data_parallel.rank() == 0
        verbose, progress = verbose and lead, progress if lead else False
    x, y = model.check_data(params, x, y, loss=loss, like=like)
    compile, reason = choose_compile(
        compile, model, -(-x.shape[0] // batch_size) * epochs,
        cached=compile == "auto" and compiled_before(model, loss, optimizer, check_l2(l2)))
    if distributed and data_parallel.any_rank(compile) != compile:  # all ranks alike
        compile, reason = True, "another rank compiles"
    if verbose:
        print(f"fnmlp: {'compiled' if compile else 'eager'} steps ({reason})"
              + ("" if distributed else f"; {describe_threads(threads, model, batch_size)}"))
    if distributed:
        step = data_parallel.DistributedStep(model, loss, optimizer, compile=compile, l2=l2)
    else:
        step = train_step(model, loss, optimizer, compile=compile, verify=verify,
                          compiler=compiler, l2=l2, threads=threads)
    if not _all_finite(params):
        raise ValueError("params contain NaN or inf before training; start from finite "
                         "parameters (e.g. model.init)")
    weight = _validate.as_weights(sample_weight, x.shape[0], like)
    if valid is not None:
        if not (isinstance(valid, (tuple, list)) and len(valid) == 2):
            raise TypeError("valid must be a pair (x_valid, y_valid)")
        valid = model.check_data(params, *valid, loss=loss, like=like,
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
    settings = {}
    if checkpoint is not None:  # refused now rather than at the first checkpoint
        from fnmlp.interop._spec import encode_spec

        encode_spec(model)  # a custom primitive or optimizer cannot be checkpointed
        encode_spec(optimizer)
        settings = {"batch_size": batch_size, "shuffle": shuffle, "loss": encode_spec(loss),
                    "weighted": weight is not None, "rows": x.shape[0], "l2": step.l2}
    if (shuffle or model.has_dropout) and generator is None:
        generator = torch.Generator()
        generator.seed()
    if distributed:  # the same data and loop on every rank, or a clear error before any work
        data_parallel.check_same_run(x, y, weight, valid, epochs=epochs, batch_size=batch_size,
                                     shuffle=shuffle, resume=resume)
    run = None
    if resume:
        run = restore_run(checkpoint, model, optimizer, like, generator, settings, epochs)
        if run is not None and not _all_finite(run.params):
            raise ValueError(f"{checkpoint} holds non-finite parameters")
    if run is None:
        if opt_state is None:
            opt_state = optimizer.init(params)
        else:
            optimizer.check(params, None, opt_state)
        run = Run(params, opt_state, state)
        if model.has_dropout:
            run.dropout_seed = int(torch.randint(0, 2**32, (), generator=generator,
                                                 device=generator.device))
    if distributed:  # every rank goes on from rank 0's parameters and shuffling stream
        data_parallel.check_same({"epoch": run.epoch, "steps done": run.steps_done},
                                 "the run each rank starts or resumes (its checkpoint file)")
        run.params, run.opt_state, generator = data_parallel.start_alike(
            run.params, run.opt_state, generator)

    epochs_left = range(run.epoch, epochs if not run.stopped else run.epoch)
    with torch.no_grad(), _progress_bar(progress, epochs_left) as bar:
        try:
            for epoch in epochs_left:
                run.epoch = epoch
                try:
                    train_loss = _train_epoch(run, step, model, x, y, weight, batch_size,
                                              shuffle, generator, compile)
                except NonFiniteLossError as error:
                    if checkpoint is not None and lead:  # the last finite state too
                        save_run(f"{os.fspath(checkpoint)}.nonfinite", run, model, optimizer,
                                 generator, settings)
                        error.args = (f"{error.args[0]}; the last finite state is saved at "
                                      f"{os.fspath(checkpoint)}.nonfinite",)
                    raise
                logs = {"train_loss": train_loss}
                run.train_loss.append(train_loss)
                if valid is not None:
                    if distributed:  # each rank its shard of the rows, summed
                        logs["valid_loss"] = step.evaluate(run.params, *valid)
                    else:
                        prediction = forward(model, run.params, valid[0], run.state, EVAL)[0]
                        logs["valid_loss"] = loss(prediction, valid[1]).item()
                    run.valid_loss.append(logs["valid_loss"])
                    if run.improved(logs["valid_loss"], min_delta):
                        run.best = (run.params, run.state)  # kept for restore_best on resume
                _report(epoch, logs, verbose, bar)
                early = patience is not None and run.waited >= patience  # final, even resumed
                asked = on_epoch_end is not None and bool(on_epoch_end(epoch, logs))
                if distributed:  # one rank's callback stops every rank
                    asked = data_parallel.any_rank(asked)
                run.epoch, run.stopped = epoch + 1, early
                if checkpoint is not None and lead and (early or asked or run.epoch == epochs
                                                        or run.epoch % checkpoint_every == 0):
                    save_run(checkpoint, run, model, optimizer, generator, settings)
                if early or asked:
                    break
        finally:
            step.forget()
    if distributed:  # return once rank 0's last checkpoint is written
        data_parallel.wait_for_all("waiting for rank 0 to finish", data_parallel.DEFAULT_TIMEOUT)
    params, state = run.best if restore_best and run.best is not None else (run.params,
                                                                            run.state)
    return FitResult(params=params, opt_state=run.opt_state,
                     history=History(run.train_loss, run.valid_loss), state=state)


def _train_epoch(run: Run, step: TrainStep, model: MLP, x, y, weight, batch_size: int,
                 shuffle: bool, generator, compile: bool) -> float:
    """One pass over (x, y), advancing ``run``; the mean of the batch losses."""
    n = x.shape[0]
    pad_to = batch_size if compile and n > batch_size else None
    order = None
    if shuffle:
        order = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
    batch_losses = []
    if run.previous is None:
        run.previous = (run.params, run.opt_state, run.state)
    for batch, start in enumerate(range(0, n, batch_size)):
        rows = slice(start, start + batch_size) if order is None else \
            order[start:start + batch_size]
        batch_weight = None if weight is None else weight[rows]
        if batch_weight is not None:
            if not bool(batch_weight.any()):
                continue  # every row weighs 0: nothing to learn, no step
            if shuffle:  # a shuffled batch's weights are known only now
                model.check_training_rows(len(batch_weight), batch_weight,
                                          f" (epoch {run.epoch}, batch {batch})")
        key = None
        if run.dropout_seed is not None:
            key = make_key(run.dropout_seed, run.steps_done, device=x.device)
        params, opt_state, value, state = step.run(
            run.params, run.opt_state, run.state, x[rows], y[rows], weight=batch_weight,
            key=key, pad_to=pad_to)
        value = value.item()
        if not math.isfinite(value):
            if not _all_finite(run.params):  # the previous update overflowed: step back
                run.params, run.opt_state, run.state = run.previous
                run.steps_done -= 1
            _raise_non_finite(run, f"the loss became {value} in epoch {run.epoch}, batch {batch}",
                              batch)
        run.steps_done += 1
        run.previous = (run.params, run.opt_state, run.state)
        run.params, run.opt_state, run.state = params, opt_state, state
        batch_losses.append(value)
    if not _all_finite(run.params):  # the epoch's last update overflowed
        run.params, run.opt_state, run.state = run.previous
        run.steps_done -= 1
        _raise_non_finite(run, f"the parameters became NaN or inf in the last step of epoch "
                               f"{run.epoch}", None)
    return sum(batch_losses) / len(batch_losses) if batch_losses else math.nan


def _raise_non_finite(run: Run, what: str, batch: int | None) -> None:
    raise NonFiniteLossError(
        f"{what}; the error carries the last finite parameters (.params) and the history so "
        "far; try a smaller learning rate",
        epoch=run.epoch, batch=batch, params=run.params, opt_state=run.opt_state,
        history=History(list(run.train_loss), list(run.valid_loss)), state=run.state)


def _report(epoch: int, logs: dict, verbose: bool, bar) -> None:
    if verbose:
        line = f"Epoch: {epoch} - L: {logs['train_loss']:.4f}"
        if "valid_loss" in logs:
            line += f" - L_v {logs['valid_loss']:.4f}"
        print(line)
    if bar is not None:
        bar.set_postfix({"loss": f"{logs['train_loss']:.4g}",
                         **({"valid": f"{logs['valid_loss']:.4g}"} if "valid_loss" in logs
                            else {})})


class _progress_bar:  # noqa: N801 (a context manager used like a function)
    """A tqdm bar over ``epochs`` when asked (or, by default, when stderr is a terminal)."""

    def __init__(self, progress: bool | None, epochs: range):
        shown = progress if progress is not None else sys.stderr.isatty()
        self.bar = None
        if shown and len(epochs):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(epochs), unit="epoch", initial=0)
        self._epochs = epochs

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def set_postfix(self, values: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(values)
            self.bar.update(1)


def _check_run_options(checkpoint, checkpoint_every, resume, patience, min_delta, restore_best,
                       on_epoch_end, progress, valid) -> None:
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a file path, got {type(checkpoint).__name__}")
    _validate.check_positive_int(checkpoint_every, "checkpoint_every")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint= (the file to resume from)")
    if patience is not None:
        _validate.check_positive_int(patience, "patience")
    if not (isinstance(min_delta, (int, float)) and not isinstance(min_delta, bool)
            and min_delta >= 0):
        raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
    if (patience is not None or restore_best) and valid is None:
        raise ValueError("early stopping (patience=, restore_best=) watches the validation "
                         "loss: pass valid=(x_valid, y_valid)")
    if on_epoch_end is not None and not callable(on_epoch_end):
        raise TypeError(f"on_epoch_end must be callable, got {on_epoch_end!r}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")


def _all_finite(tree) -> bool:
    return all(bool(torch.isfinite(leaf).all()) for leaf in tree_leaves(tree))
