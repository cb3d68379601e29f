"""What the loop does after each epoch besides training: report, call back, checkpoint.

Each is a ``Policy`` (``fnmlp.train._loop``) that every kind of fit uses alike; early stopping
lives beside the loop, the estimators' rules in ``fnmlp.sklearn``.
"""

from __future__ import annotations

import math
import os
import sys

from fnmlp.train._loop import Policy, Run, StepKind
from fnmlp.train._run import json_floats, json_floats_back, save_run


def summary(values: list[float]) -> str:
    """One loss, or the members' min / median / max."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    ordered = sorted(values)
    return (f"min {ordered[0]:.6g} / median {ordered[len(ordered) // 2]:.6g} / "
            f"max {ordered[-1]:.6g}")


def rate_summary(values: list[float]) -> str:
    """A learning rate: one value when every member has it, else as ``summary``."""
    return f"{values[0]:.4g}" if len(set(values)) == 1 else summary(values)


_LOOP_LOGS = {"epoch", "train_losses", "valid_losses", "batch_losses", "batch_rows", "rows",
              "lrs", "epoch_time", "samples_per_s", "metrics"}


def epoch_log_keys(valid: bool, metrics=()) -> list[str]:
    """The keys of ``epoch_logs`` for a fit (with an optimizer) with (or without) ``valid``
    and these metric names, in their order."""
    keys = ["epoch", "train_loss", *(["valid_loss"] if valid else []), *metrics,
            *([f"valid_{name}" for name in metrics] if valid else [])]
    return keys + ["lr", "epoch_time", "samples_per_s"]


def epoch_logs(logs: dict, ensemble: bool = False) -> dict:
    """The logs a user sees of an epoch (callbacks, writers, an ``on_epoch_end`` function,
    the estimators' too): ``epoch``, ``train_loss``, ``valid_loss``, the metrics (``r2``,
    ``valid_r2``), ``lr``, ``epoch_time``, ``samples_per_s``, then what policies added (the
    estimators' ``valid_score``). Per-member values are a float for one network, a list for
    an ensemble (``ensemble``; of one member too)."""

    def shown(values):
        return list(values) if ensemble else values[0]

    user = {"epoch": logs["epoch"], "train_loss": shown(logs["train_losses"])}
    if "valid_losses" in logs:
        user["valid_loss"] = shown(logs["valid_losses"])
    for name, values in logs.get("metrics", {}).items():
        user[name] = shown(values)
    if "lrs" in logs:
        user["lr"] = shown(logs["lrs"])
    for name in ("epoch_time", "samples_per_s"):
        if name in logs:
            user[name] = logs[name]
    user.update({name: value for name, value in logs.items() if name not in _LOOP_LOGS})
    return user


def verbose_line(logs: dict, epochs: int) -> str:
    """``epoch 3/32  loss 0.1234  valid_loss 0.2345  r2 0.9100  lr 0.01  0.12 s  8,312
    samples/s`` (an ensemble's values as ``summary``: min / median / max)."""
    parts = [f"epoch {logs['epoch'] + 1}/{epochs}", f"loss {summary(logs['train_losses'])}"]
    if "valid_losses" in logs:
        parts.append(f"valid_loss {summary(logs['valid_losses'])}")
    parts += [f"{name} {summary(values)}" for name, values in logs.get("metrics", {}).items()]
    if "lrs" in logs:
        parts.append(f"lr {rate_summary(logs['lrs'])}")
    if "epoch_time" in logs:
        parts.append(f"{logs['epoch_time']:.2f} s")
    if "samples_per_s" in logs:
        parts.append(f"{logs['samples_per_s']:,.0f} samples/s")
    return "  ".join(parts)


class Reporter(Policy):
    """A line per epoch (``verbose``: ``verbose_line``) and a tqdm bar over the epochs
    (``progress``; default: when stderr is a terminal), on the lead process only."""

    def __init__(self, verbose: bool, progress: bool | None, epochs: range, lead: bool = True):
        self.verbose, self.epochs = verbose and lead, epochs.stop
        shown = (progress if progress is not None else sys.stderr.isatty()) and lead
        self.bar = None
        if shown and len(epochs):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(epochs), unit="epoch", initial=0)

    def on_epoch_end(self, run: Run | None, logs: dict) -> bool:
        """Reads ``logs`` only: ``run`` may be None (the lbfgs solver, which has no loop)."""
        train, valid = logs["train_losses"], logs.get("valid_losses")
        if self.verbose:
            print(verbose_line(logs, self.epochs))
        if self.bar is not None:
            postfix = {"loss": summary(train)}
            if valid is not None:
                postfix["valid"] = summary(valid)
            self.bar.set_postfix(postfix)
            self.bar.update(1)
        return False

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class EpochFunction(Policy):
    """``on_epoch_end(epoch, logs) -> stop?`` as a policy (the estimators'), ``logs`` those
    ``epoch_logs`` builds, as a fit's callbacks get them, with what the policies before it
    added (the estimators' ``valid_score``). (``fnmlp.fit``'s ``on_epoch_end=`` runs among its
    callbacks, through ``CallbackRunner``, with the same logs.)"""

    def __init__(self, function, ensemble: bool = False):
        self.function, self.ensemble = function, ensemble

    def on_epoch_end(self, run: Run, logs: dict) -> bool:
        return bool(self.function(logs["epoch"], epoch_logs(logs, self.ensemble)))


class HistoryKeeper(Policy):
    """Each epoch's ``lr`` and metric values (``r2``, ``valid_r2``; per member) kept in
    ``run.extras["history"]``: ``{"lr": [...], "metrics": {name: [...]}}``, per epoch a list
    per member, non-finite floats as ``json_floats`` strings. So a checkpoint keeps them (JSON
    gives every finite float back exactly) and a resumed fit's history equals an uninterrupted
    one's; ``kept_history`` reads them back. An epoch undone by a ``NonFiniteLossError`` (the
    parameters overflowed in its last step) is dropped, as its losses are."""

    def on_epoch_end(self, run: Run, logs: dict) -> bool:
        kept = run.extras.setdefault("history", {"lr": [], "metrics": {}})
        epoch, members = logs["epoch"], run.members
        columns = ([(kept["lr"], logs["lrs"])] if "lrs" in logs else []) + [
            (kept["metrics"].setdefault(name, []), values)
            for name, values in logs.get("metrics", {}).items()]
        for column, values in columns:
            # NaN for epochs without a value (resumed from a checkpoint that did not keep
            # them, or a metric this fit added): the lists stay aligned with the epochs
            column.extend([json_floats([math.nan] * members)] * (epoch - len(column)))
            column.append(json_floats(list(values)))
        return False

    def on_non_finite(self, run: Run, error) -> None:
        """``run.epoch`` epochs are kept (the failing epoch, or the one that overflowed, has
        gone from the losses): their values only."""
        kept = run.extras.get("history")
        if kept is not None:
            for column in [kept["lr"], *kept["metrics"].values()]:
                del column[run.epoch:]


def kept_history(run: Run) -> tuple[list[list[float]], dict[str, list[list[float]]]]:
    """``HistoryKeeper``'s ``(lr, metrics)`` of ``run``: per epoch, one float per member."""
    kept = run.extras.get("history", {"lr": [], "metrics": {}})
    return (json_floats_back(kept["lr"]),
            {name: json_floats_back(values) for name, values in kept["metrics"].items()})


class Checkpointer(Policy):
    """Saves the run (``fnmlp.save``'s format, atomically) every ``every`` epochs, at the end
    and when the fit stops, from the lead process; before a ``NonFiniteLossError`` leaves the
    fit, the last finite state goes to ``<path>.nonfinite``."""

    def __init__(self, path, step: StepKind, generator, settings: dict, every: int = 1):
        self.path, self.step, self.generator = path, step, generator
        self.settings, self.every = settings, every

    def due(self, run: Run, final: bool) -> bool:
        """Whether the run is saved after this epoch (``run.epoch``: the epochs done); alike on
        every rank (each checks the parameters then), though only the lead one writes."""
        return final or run.epoch % self.every == 0

    def save(self, run: Run) -> None:
        if self.step.lead:
            self._save(self.path, run)

    def on_non_finite(self, run: Run, error) -> None:
        if self.step.lead:
            path = f"{os.fspath(self.path)}.nonfinite"
            self._save(path, run)
            error.args = (f"{error.args[0]}; the last finite state is saved at {path}",)

    def _save(self, path, run: Run) -> None:
        save_run(path, run, self.step.model, self.step.optimizer, self.generator,
                 self.settings)
