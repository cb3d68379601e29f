"""What a fit carries from epoch to epoch, and its checkpoints: everything needed to continue a
killed fit so that it ends bit-identical to an uninterrupted one (the parameters, model and
optimizer states, history, step count, dropout seed, the generator's state, early stopping's
bookkeeping)."""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from fnmlp.interop._checkpoint import load, save


@dataclasses.dataclass
class Run:
    """A fit in progress, at the start of ``epoch``."""

    params: object
    opt_state: object
    state: object
    epoch: int = 0
    steps_done: int = 0
    train_loss: list = dataclasses.field(default_factory=list)
    valid_loss: list = dataclasses.field(default_factory=list)
    dropout_seed: int | None = None
    best_loss: float = math.inf
    best_epoch: int = -1
    waited: int = 0
    best: tuple | None = None  # (params, state) at the best validation loss
    stopped: bool = False  # by early stopping: final
    previous: tuple | None = dataclasses.field(default=None, repr=False)  # the step before

    def improved(self, valid_loss: float, min_delta: float) -> bool:
        """Early stopping's bookkeeping after an epoch; True when the loss improved."""
        if valid_loss < self.best_loss - min_delta:
            self.best_loss, self.best_epoch, self.waited = valid_loss, self.epoch, 0
            return True
        self.waited += 1
        return False


_KEYS = ("epoch", "steps_done", "train_loss", "valid_loss", "dropout_seed", "best_loss",
         "best_epoch", "waited", "stopped")


def save_run(path, run: Run, model, optimizer, generator: torch.Generator | None,
             settings: dict) -> None:
    """Checkpoint ``run`` (atomically; see ``fnmlp.save``); ``settings``: what must be the same
    to resume it (batch size, shuffling, loss, ...)."""
    extra = {}
    if generator is not None:
        extra["generator"] = generator.get_state()
    if run.best is not None:
        extra["best_params"], extra["best_state"] = run.best
    fit_state = {key: getattr(run, key) for key in _KEYS}
    fit_state["settings"] = settings
    fit_state["best_loss"] = None if math.isinf(run.best_loss) else run.best_loss
    fit_state["train_loss"] = [_json_float(v) for v in run.train_loss]
    fit_state["valid_loss"] = [_json_float(v) for v in run.valid_loss]
    save(path, model, run.params, state=run.state, opt_state=run.opt_state,
         optimizer=optimizer, metadata={"fnmlp_fit": fit_state}, extra=extra)


def restore_run(path, model, optimizer, like: torch.Tensor, generator: torch.Generator | None,
                settings: dict, epochs: int) -> Run | None:
    """The run checkpointed at ``path`` (None if there is no file yet), checked against this
    fit (model, optimizer, ``settings``, the parameters' dtype and device, ``epochs``), its
    generator state put into ``generator``."""
    if not os.path.exists(path):
        return None
    checkpoint = load(path, map_location=like.device)
    if checkpoint.model != model:
        raise ValueError(f"{path} holds a fit of another model: {checkpoint.model}")
    if checkpoint.optimizer != optimizer:
        raise ValueError(f"{path} holds a fit with another optimizer: {checkpoint.optimizer!r}; "
                         "resume with the same one (to change it, load the checkpoint and fit "
                         "from its params and state)")
    fit_state = checkpoint.metadata.get("fnmlp_fit")
    if fit_state is None:
        raise ValueError(f"{path} is a checkpoint, but not of a fit (no fit state to resume)")
    for name, value in fit_state.get("settings", {}).items():
        if settings.get(name) != value:
            raise ValueError(f"{path} holds a fit with {name}={value!r}, this one has "
                             f"{settings.get(name)!r}; resume with the same settings")
    first = next(iter(torch.utils._pytree.tree_leaves(checkpoint.params)))
    if first.dtype != like.dtype:
        raise ValueError(f"{path} holds {first.dtype} parameters, this fit's are {like.dtype}")
    if fit_state["epoch"] > epochs:
        raise ValueError(f"{path} holds a fit at epoch {fit_state['epoch']}, past epochs={epochs}")
    run = Run(checkpoint.params, checkpoint.opt_state, checkpoint.state,
              **{key: fit_state[key] for key in _KEYS})
    run.train_loss = [float(v) for v in run.train_loss]  # "nan" back to a float
    run.valid_loss = [float(v) for v in run.valid_loss]
    run.best_loss = math.inf if run.best_loss is None else run.best_loss
    if "best_params" in checkpoint.extra:
        run.best = (checkpoint.extra["best_params"], checkpoint.extra["best_state"])
    if "generator" in checkpoint.extra and generator is not None:
        generator.set_state(checkpoint.extra["generator"].cpu())
    return run


def _json_float(value: float):
    return value if math.isfinite(value) else str(value)  # JSON has no NaN
