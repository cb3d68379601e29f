"""``Ensemble.fit``: every member trained by one step per batch, with per-member learning rates,
weight decay, bagging, dropout keys and early stopping."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor
from torch.func import vmap

from fnmlp import _validate
from fnmlp._tree import tree_map
from fnmlp.ensemble._ensemble import Ensemble, per_member_targets
from fnmlp.nn._losses import Loss, mse
from fnmlp.nn._model import EVAL, forward
from fnmlp.train._auto import choose_compile
from fnmlp.train._fit import _check_run_options


@dataclasses.dataclass
class EnsembleHistory:
    """Per epoch, one float per member: the mean of its batch losses (NaN for a member without
    weight in the epoch) and its loss on ``valid`` (if given). ``best_epoch``: per member, the
    epoch of its lowest validation loss (None without validation); ``stopped_epoch``: the
    epoch count after which it stopped early (None when it trained to the end);
    ``diverged_epoch``: the epoch whose loss became NaN or inf (the member is then put back to
    that epoch's start and trains no more; None when it never did)."""

    train_loss: list[list[float]] = dataclasses.field(default_factory=list)
    valid_loss: list[list[float]] = dataclasses.field(default_factory=list)
    best_epoch: list[int | None] = dataclasses.field(default_factory=list)
    stopped_epoch: list[int | None] = dataclasses.field(default_factory=list)
    diverged_epoch: list[int | None] = dataclasses.field(default_factory=list)


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
                 compile: bool | str = "auto",
                 compiler: str = "auto", verbose: bool = False) -> EnsembleFitResult:
    """Train all members of ``ensemble`` for ``epochs`` passes over (x, y).

    Arguments:
        params: stacked parameters (``Ensemble.init``); not modified.
        x, y, epochs, batch_size, optimizer, loss, l2, shuffle, generator, opt_state, state,
            compile, compiler, verbose: as ``fnmlp.fit`` ("auto" counts member-steps); every
            member sees the same batches (one shuffle per epoch), unless bagging.
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

    A member whose epoch loss is NaN or inf goes back to that epoch's start and trains no more
    (``history.diverged_epoch``); the others go on.
    """
    _validate.check_positive_int(epochs, "epochs", allow_zero=True)
    _validate.check_positive_int(batch_size, "batch_size")
    _check_run_options(None, 1, False, patience, min_delta, restore_best, None, None, valid)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    like = ensemble.check_params(params)
    model = ensemble.model
    x, y, weight = ensemble.check_batch(x, y, loss, sample_weight, like)
    if x.dim() == 3 or per_member_targets(y, loss):
        raise ValueError("fit takes data shared by the members, x (n, in) and y (n, ...); "
                         "for per-member samples use bagging=True or per-member "
                         "sample_weight (K, n)")
    if valid is not None:
        if not (isinstance(valid, (tuple, list)) and len(valid) == 2):
            raise TypeError("valid must be a pair (x_valid, y_valid)")
        valid = model.check_data(ensemble.member(params, 0), *valid, loss=loss, like=like,
                                 names=("x_valid", "y_valid"))
    model_state = (ensemble.init_state(dtype=like.dtype, device=like.device)
                   if state is None and model.has_state
                   else ensemble.check_model_state(state, like))
    n, size = x.shape[0], ensemble.size
    compile, reason = choose_compile(compile, model, -(-n // batch_size) * epochs * size)
    if verbose:
        print(f"fnmlp: {'compiled' if compile else 'eager'} ensemble step ({reason}, "
              f"counting member-steps)")
    step = ensemble.train_step(loss, optimizer, compile=compile, weight_decay=weight_decay,
                               l2=l2, compiler=compiler)
    if opt_state is None:
        opt_state = ensemble.init_optimizer(optimizer, params, lr=lr)
    else:
        ensemble._check_stacked(opt_state, "opt_state")
        optimizer.check(ensemble.member(params, 0), None, ensemble.member(opt_state, 0))
    for start in range(0, n if weight is None and model.has_batch_statistics else 0,
                       batch_size):  # every batch, before any work
        ensemble.check_training_rows(min(batch_size, n - start), None,
                                     f" (batch {start // batch_size}; choose another "
                                     "batch_size)")
    if (shuffle or bagging or model.has_dropout) and generator is None:
        generator = torch.Generator()
        generator.seed()
    if bagging:
        weight = _bootstrap_counts(size, n, generator, like) * (1 if weight is None else weight)
    dropout_seed = None
    if model.has_dropout:
        dropout_seed = int(torch.randint(0, 2**32, (), generator=generator,
                                         device=generator.device))
    history = EnsembleHistory(best_epoch=[None] * size, stopped_epoch=[None] * size,
                              diverged_epoch=[None] * size)
    best_loss, waited = [math.inf] * size, [0] * size
    best = (params, model_state)
    steps = 0
    with torch.no_grad():
        for epoch in range(epochs):
            active = torch.tensor([history.stopped_epoch[k] is None
                                   and history.diverged_epoch[k] is None for k in range(size)],
                                  device=like.device)
            if not bool(active.any()):
                break
            epoch_start = (params, opt_state, model_state)
            order = None
            if shuffle:
                order = torch.randperm(n, generator=generator,
                                       device=generator.device).to(x.device)
            totals = torch.zeros(size, dtype=torch.float64, device=like.device)
            counts = torch.zeros(size, dtype=torch.float64, device=like.device)
            for batch, start in enumerate(range(0, n, batch_size)):
                rows = slice(start, start + batch_size) if order is None else \
                    order[start:start + batch_size]
                batch_weight = None if weight is None else weight[..., rows]
                if batch_weight is not None and model.has_batch_statistics:
                    ensemble.check_training_rows(batch_weight.shape[-1], batch_weight,
                                                 f" (epoch {epoch}, batch {batch})")
                keys = (ensemble.dropout_keys(dropout_seed, steps, device=x.device)
                        if dropout_seed is not None else None)
                params, opt_state, losses, model_state = step.run(
                    params, opt_state, model_state, x[rows], y[rows], weight=batch_weight,
                    key=keys, active=active)
                stepped = (torch.ones(size, dtype=torch.float64, device=like.device)
                           if batch_weight is None else
                           (batch_weight.reshape(-1, batch_weight.shape[-1]).sum(-1) > 0)
                           .to(torch.float64).expand(size))
                totals = totals + losses.to(torch.float64) * stepped
                counts = counts + stepped
                steps += 1
            # a member without weight all epoch has no loss (NaN); one whose loss is not
            # finite diverged: it goes back to the epoch's start and trains no more
            train_loss = torch.where(counts > 0, totals / counts.clamp_min(1), math.nan)
            diverged = (counts > 0) & ~torch.isfinite(train_loss) & active
            if bool(diverged.any()):
                params, opt_state, model_state = _select(~diverged, (params, opt_state,
                                                                     model_state), epoch_start)
                for k in torch.nonzero(diverged).flatten().tolist():
                    history.diverged_epoch[k] = epoch
            history.train_loss.append(train_loss.tolist())
            logs = f"epoch {epoch + 1}/{epochs}: train loss {_summary(history.train_loss[-1])}"
            if valid is not None:
                valid_loss = _valid_losses(ensemble, loss, params, model_state, *valid)
                history.valid_loss.append(valid_loss)
                logs += f", valid loss {_summary(valid_loss)}"
                improved = _track(epoch, valid_loss, best_loss, waited, history, min_delta,
                                  active & ~diverged)
                if restore_best and any(improved):
                    mask = torch.tensor(improved, device=like.device)
                    best = (_select(mask, (params, model_state), best))
                if patience is not None:
                    for k in range(size):
                        if (history.stopped_epoch[k] is None and bool(active[k])
                                and waited[k] >= patience):
                            history.stopped_epoch[k] = epoch + 1
            if verbose:
                print(logs)
    if restore_best:
        params, model_state = best
    return EnsembleFitResult(params=params, opt_state=opt_state, history=history,
                             state=model_state)


def _bootstrap_counts(size: int, rows: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """(K, n) bootstrap counts: how often each row is drawn in n draws with replacement."""
    draws = torch.randint(0, rows, (size, rows), generator=generator, device=generator.device)
    counts = torch.zeros(size, rows, dtype=like.dtype, device=generator.device)
    counts.scatter_add_(1, draws, torch.ones_like(counts))
    return counts.to(like.device)


def _valid_losses(ensemble: Ensemble, loss: Loss, params, state, x: Tensor, y: Tensor
                  ) -> list[float]:
    def member(p, s):
        return loss(forward(ensemble.model, p, x, s, EVAL)[0], y)

    return vmap(member)(params, state).tolist()


def _track(epoch: int, losses: list[float], best: list[float], waited: list[int],
           history: EnsembleHistory, min_delta: float, active: Tensor) -> list[bool]:
    """Update each active member's best loss and wait count; which members improved."""
    improved = []
    for k, value in enumerate(losses):
        better = bool(active[k]) and value < best[k] - min_delta
        if better:
            best[k], waited[k], history.best_epoch[k] = value, 0, epoch
        elif bool(active[k]):
            waited[k] += 1
        improved.append(better)
    return improved


def _select(mask: Tensor, new, old):
    """Per member: ``new`` where ``mask`` (K,) holds, else ``old``."""
    def pick(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(mask.view(-1, *[1] * (a.dim() - 1)), a, b)

    return tree_map(pick, new, old)


def _summary(values: list[float]) -> str:
    return (f"{values[0]:.6g}" if len(values) == 1 else
            f"min {min(values):.6g} / median {sorted(values)[len(values) // 2]:.6g} / "
            f"max {max(values):.6g}")
