"""``ReduceLROnPlateau``: ``torch.optim.lr_scheduler.ReduceLROnPlateau`` as a callback, fed a
value of each epoch's logs (the validation loss by default) and changing the optimizer's base
rate through ``trainer.learning_rate`` (a tensor of the state: a compiled step never
recompiles)."""

from __future__ import annotations

import math
import numbers

from fnmlp._validate import check_positive_int
from fnmlp.train._callbacks import Callback, Trainer


def _number(value, name: str) -> None:
    """A finite number >= 0, or a ValueError naming ``name``."""
    if (not isinstance(value, numbers.Real) or isinstance(value, bool)
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"{name} must be a number >= 0.0, got {value!r}")


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` once ``monitor`` has not improved for more
    than ``patience`` epochs, exactly as ``torch.optim.lr_scheduler.ReduceLROnPlateau`` stepped
    once per epoch with that value.

    An ensemble's members each have their own plateau (best value, counters, rate), fed their
    own value of ``monitor`` (a value the logs hold once, such as ``epoch_time``, fed to
    every member). Its counters are kept in checkpoints: a resumed fit continues
    bit-identically.

    The rate it reduces, and ``min_lr`` bounds, is the optimizer's *base* rate (the state's,
    ``trainer.learning_rate``), not the scheduled rate of a step. With a schedule that
    multiplies the base rate (step decay, exponential, warm-up, ``lr=fn``), each reduction
    scales the scheduled rates by ``factor``; with ``lr=fn`` (``lambda_lr(1.0, fn)``) the
    base is 1.0, a multiplier of ``fn``'s rates, and ``min_lr`` bounds that multiplier.
    Cosine's ``eta_min`` is absolute, not scaled: its rate is ``eta_min + (base -
    eta_min)·(1 + cos(π·step/total_steps))/2`` with the reduced base, so a reduction scales
    only the part above ``eta_min`` and the cosine still ends at ``eta_min`` (a base reduced
    below ``eta_min`` gives rates between the two).

    Arguments:
        monitor: the key of the epoch logs to watch ("valid_loss" needs ``valid=``; also
            "train_loss" or a metric such as "valid_r2" with ``mode="max"``).
        factor: the factor of each reduction, in (0, 1).
        patience: the epochs without improvement tolerated before a reduction.
        threshold, threshold_mode: an improvement beats the best by ``threshold`` relative to
            it ("rel") or absolute ("abs").
        cooldown: the epochs after a reduction during which bad epochs are not counted.
        min_lr: the lowest base rate (a list of K: one per member of an ensemble).
        mode: "min" (lower is better) or "max".
        eps: a reduction smaller than this is not made.
    """

    def __init__(self, monitor: str = "valid_loss", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 min_lr: float | list[float] = 0.0, mode: str = "min", eps: float = 1e-8):
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be a log key (a string), got {monitor!r}")
        _number(factor, "factor")
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor!r}")
        check_positive_int(patience, "patience", allow_zero=True)
        _number(threshold, "threshold")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        check_positive_int(cooldown, "cooldown", allow_zero=True)
        for value in (min_lr if isinstance(min_lr, (list, tuple)) else [min_lr]):
            _number(value, "min_lr")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        _number(eps, "eps")
        self.monitor, self.factor, self.patience = monitor, factor, patience
        self.threshold, self.threshold_mode, self.cooldown = threshold, threshold_mode, cooldown
        self.min_lr, self.mode, self.eps = min_lr, mode, eps
        self.best: list[float] = []  # per member, from on_train_begin (or a checkpoint)
        self.num_bad_epochs: list[int] = []
        self.cooldown_counter: list[int] = []
        self.last_epoch, self._restored = 0, False
        self.trainer: Trainer  # set by the fit before on_train_begin

    def check(self, log_keys: list[str], members: int) -> None:
        """Refuse, before any work, a ``monitor`` the fit's logs will not have and a ``min_lr``
        list that is not one per member."""
        if self.monitor not in log_keys:
            hint = " (it needs valid=(x_valid, y_valid))" if self.monitor.startswith(
                "valid_") else ""
            raise ValueError(f"ReduceLROnPlateau monitors {self.monitor!r}, which this fit's "
                             f"logs do not have{hint}; they have {list(log_keys)}")
        if isinstance(self.min_lr, (list, tuple)) and len(self.min_lr) != members:
            raise ValueError(f"min_lr has {len(self.min_lr)} values for {members} member(s); "
                             "give one, or one per member")

    def on_train_begin(self, logs: dict) -> None:
        members = self.trainer.members
        if not self._restored:  # a new fit starts a new plateau
            worse = math.inf if self.mode == "min" else -math.inf
            self.best = [worse] * members
            self.num_bad_epochs, self.cooldown_counter = [0] * members, [0] * members
            self.last_epoch = 0
        self._restored = False

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        if self.monitor not in logs:
            raise ValueError(f"ReduceLROnPlateau monitors {self.monitor!r}, which epoch "
                             f"{epoch}'s logs do not have; they have {list(logs)}")
        value, members = logs[self.monitor], self.trainer.members
        values = ([float(v) for v in value] if isinstance(value, (list, tuple))
                  else [float(value)] * members)  # a value of the whole fit: every member's
        rate = self.trainer.learning_rate
        one = not isinstance(rate, list)
        rates: list[float] = list(rate) if isinstance(rate, list) else [rate]
        self.last_epoch += 1
        changed = False
        for k, current in enumerate(values):
            new = self._step(k, current, rates[k])
            changed = changed or new != rates[k]
            rates[k] = new
        if changed:
            self.trainer.learning_rate = rates[0] if one else rates

    def _step(self, k: int, current: float, rate: float) -> float:
        """Member ``k``'s step of torch's scheduler; its new rate."""
        if self._is_better(current, self.best[k]):
            self.best[k], self.num_bad_epochs[k] = current, 0
        else:
            self.num_bad_epochs[k] += 1
        if self.cooldown_counter[k] > 0:
            self.cooldown_counter[k] -= 1
            self.num_bad_epochs[k] = 0  # bad epochs in cooldown are not counted
        if self.num_bad_epochs[k] > self.patience:
            floor = self.min_lr[k] if isinstance(self.min_lr, (list, tuple)) else self.min_lr
            new = max(rate * self.factor, floor)
            if rate - new > self.eps:
                rate = new
            self.cooldown_counter[k], self.num_bad_epochs[k] = self.cooldown, 0
        return rate

    def _is_better(self, a: float, best: float) -> bool:
        if self.mode == "min" and self.threshold_mode == "rel":
            return a < best * (1.0 - self.threshold)
        if self.mode == "min":
            return a < best - self.threshold
        if self.threshold_mode == "rel":
            return a > best * (self.threshold + 1.0)
        return a > best + self.threshold

    def state_dict(self) -> dict:
        return {"best": self.best, "num_bad_epochs": self.num_bad_epochs,
                "cooldown_counter": self.cooldown_counter, "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.num_bad_epochs = list(state["best"]), list(state["num_bad_epochs"])
        self.cooldown_counter, self.last_epoch = (list(state["cooldown_counter"]),
                                                  state["last_epoch"])
        self._restored = True
