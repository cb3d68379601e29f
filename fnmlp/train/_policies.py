"""What the loop does after each epoch besides training: report, call back, checkpoint.

Each is a ``Policy`` (``fnmlp.train._loop``) that every kind of fit uses alike; early stopping
lives beside the loop, the estimators' rules in ``fnmlp.sklearn``.
"""

from __future__ import annotations

import os
import sys

from fnmlp.train._loop import Policy, Run, StepKind
from fnmlp.train._run import save_run


def summary(values: list[float]) -> str:
    """One loss, or the members' min / median / max."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    ordered = sorted(values)
    return (f"min {ordered[0]:.6g} / median {ordered[len(ordered) // 2]:.6g} / "
            f"max {ordered[-1]:.6g}")


class Reporter(Policy):
    """A line per epoch (``verbose``) and a tqdm bar over the epochs (``progress``; default:
    when stderr is a terminal), on the lead process only."""

    def __init__(self, verbose: bool, progress: bool | None, epochs: range, lead: bool = True):
        self.verbose = verbose and lead
        shown = (progress if progress is not None else sys.stderr.isatty()) and lead
        self.bar = None
        if shown and len(epochs):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(epochs), unit="epoch", initial=0)

    def on_epoch_end(self, run: Run, logs: dict) -> bool:
        train, valid = logs["train_losses"], logs.get("valid_losses")
        if self.verbose:
            line = f"Epoch: {logs['epoch']} - L: {summary(train)}"
            if valid is not None:
                line += f" - L_v {summary(valid)}"
            print(line)
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


class Callback(Policy):
    """``on_epoch_end(epoch, logs) -> stop?`` with ``logs`` holding ``train_loss`` (and
    ``valid_loss``): a float for one network, a list of floats for an ensemble; and what the
    policies before it added (the estimators' ``valid_score``)."""

    def __init__(self, function):
        self.function = function

    def on_epoch_end(self, run: Run, logs: dict) -> bool:
        def shown(values):
            return values[0] if run.members == 1 else list(values)

        user_logs = {"train_loss": shown(logs["train_losses"])}
        if "valid_losses" in logs:
            user_logs["valid_loss"] = shown(logs["valid_losses"])
        user_logs.update({name: value for name, value in logs.items()
                          if name not in _LOOP_LOGS})  # what policies added (valid_score)
        return bool(self.function(logs["epoch"], user_logs))


_LOOP_LOGS = {"epoch", "train_losses", "valid_losses", "batch_losses", "batch_rows"}


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
