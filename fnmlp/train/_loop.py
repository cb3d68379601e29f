"""The one training loop: a batch source, a kind of step, and policies.

Every fit (``fnmlp.fit`` of a network, ``Ensemble.fit``, data-parallel ``fit(distributed=
True)``, the scikit-learn estimators) runs ``train_loop``:

- ``BatchSource``: each epoch's order (one permutation from the explicit generator and one
  gather of the rows, on the data's device), row weights (bagging counts too), the batches
  without weight skipped, the zero-weight padding of a short batch (``pad_to``), the dropout
  key of each step from the step counter;
- a ``StepKind``: one network (``fnmlp.train.TrainStep``), an ensemble (``EnsembleStep``:
  vmapped members, an ``active`` mask) or data-parallel shards (``DistributedStep``);
- policies, called after every epoch in order: early stopping (one value, or one per
  member), the estimators' rules, metrics, progress and logging, callbacks, checkpoints; and
  around the fit (``on_train_begin``, ``on_train_end``), before each checkpoint
  (``on_checkpoint``) and, for a policy that asks (``batch_logs``), after every batch.

A step's losses stay on the device and are read once per epoch (after every chunk of steps
only when a policy asks for each batch's loss). A loss that became NaN or inf
is found then; one network's fit replays the epoch up to that batch (steps are deterministic)
and raises ``NonFiniteLossError`` with the last finite parameters, while an ensemble puts the
diverged members back to the epoch's start and trains them no more.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, cast

import torch
from torch import Tensor

from fnmlp._tree import flatten
from fnmlp.train._errors import NonFiniteLossError
from fnmlp.train._executor import Carry

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from fnmlp.train._policies import Checkpointer


class Batch(NamedTuple):
    """One step's data: ``x``, ``y``, row ``weight`` (None: all 1), dropout ``key`` (None: no
    dropout), ``rows``, ``pad_to`` (a compiled step pads a short batch to it) and ``stepped``
    (per member, whether the batch has weight for it: its loss counts)."""

    x: Tensor
    y: Tensor
    weight: Tensor | None
    key: Tensor | None
    rows: int
    pad_to: int | None
    stepped: tuple

    @classmethod
    def of(cls, x: Tensor, y: Tensor, weight: Tensor | None = None,
           key: Tensor | None = None) -> Batch:
        """A batch of checked data for ``StepKind.run`` (its rows: ``x``'s next-to-last
        dimension)."""
        return cls(x, y, weight, key, x.shape[-2], None, (True,))


class StepKind:
    """What the loop needs of a kind of step; the defaults are those of one process."""

    members: int = 1  # losses per step
    lead: bool = True  # this process prints and checkpoints (rank 0)
    model: object = None  # what a checkpoint saves (an ``MLP`` or an ``Ensemble``)
    optimizer: object = None

    def run(self, carry: Carry, batch: Batch, active: Tensor | None = None
            ) -> tuple[Carry, Tensor]:
        """``(carry, losses)`` after one step; ``active``: (K,) members that step."""
        raise NotImplementedError

    def run_chunk(self, carry: Carry, batches: Sequence[Batch], active: Tensor | None = None
                  ) -> tuple[Carry, Tensor]:
        """``(carry, losses)`` after a step on each of ``batches`` in turn, ``losses`` stacked
        ((N,) or (N, K)); a kind that can runs them as one call (one compiled graph)."""
        losses = []
        for batch in batches:
            carry, loss = self.run(carry, batch, active)
            losses.append(loss)
        return carry, torch.stack(losses)

    def dropout_key(self, seed: int, step: int, device: torch.device) -> Tensor:
        raise NotImplementedError

    def valid_losses(self, carry: Carry, x: Tensor, y: Tensor) -> list[float]:
        """Each member's loss on (x, y) in evaluation mode."""
        raise NotImplementedError

    def select(self, keep: Sequence[bool], new, old):
        """Per member: ``new`` where ``keep``, else ``old`` (trees of this kind)."""
        return new if keep[0] else old

    def agree(self, flag: bool) -> bool:
        """``flag`` as every process sees it (true if any process's is)."""
        return flag

    def agree_rate(self, carry: Carry) -> Carry:
        """``carry`` with the lead process's base learning rate on every process (after the
        policies, which may set it from what one process saw: its metrics, its times)."""
        return carry

    def forget(self) -> None:
        """Drop references kept between steps."""

    def pin_threads(self, extras: dict, rows: int, device: torch.device) -> None:
        """Fix the step's thread count for a fit (``StepThreads.pin``)."""


class BatchSource:
    """The batches of each epoch over (x, y) with optional row weights.

    Arguments:
        x, y: the rows; ``x`` a tensor, or anything indexable by a NumPy array of rows
            (a scipy sparse matrix) with ``densify`` making a batch of it a tensor.
        weight: (n,) row weights, (K, n) per member, or None.
        batch_size, shuffle, generator: rows per step; a permutation per epoch from
            ``generator`` (else in order).
        pad_to: the size a compiled step pads a short batch to (None: no padding).
        steps_per_call: the loop runs the epoch's steps in chunks of this many, each chunk one
            call of the step (``StepKind.run_chunk``: one compiled graph, one CUDA launch).
        check_rows: ``check_rows(weight, where)``: a check of each shuffled weighted batch
            (``BatchNorm``'s rows of non-zero weight), or None.
    """

    def __init__(self, x, y: Tensor, weight: Tensor | None, *, batch_size: int,
                 shuffle: bool = False, generator: torch.Generator | None = None,
                 pad_to: int | None = None, members: int = 1, steps_per_call: int = 1,
                 densify: Callable | None = None, check_rows: Callable | None = None):
        self.x, self.y, self.weight = x, y, weight
        self.rows = y.shape[0]
        self.batch_size, self.shuffle, self.generator = batch_size, shuffle, generator
        self.pad_to, self.members, self.steps_per_call = pad_to, members, steps_per_call
        self.densify, self.check_rows = densify, check_rows

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.rows // self.batch_size)

    def epoch(self, step: StepKind, run: Run) -> Epoch:
        """The epoch's batches (their dropout keys from ``run.steps_done`` on): one permutation
        and one gather of the rows, then slices made as they are iterated."""
        x, y, weight = self.x, self.y, self.weight
        if self.shuffle:
            generator = cast(torch.Generator, self.generator)  # a shuffling fit passes one
            order = torch.randperm(self.rows, generator=generator,
                                   device=generator.device).to(y.device)
            x = (x.index_select(0, order) if isinstance(x, Tensor)
                 else x[order.cpu().numpy()])
            y = y.index_select(0, order)
            weight = None if weight is None else weight.index_select(weight.dim() - 1, order)
        return Epoch(self, step, run, x, y, weight)

    def _stepped(self, weight: Tensor | None) -> list[tuple]:
        """Per batch, per member: whether it has weight (one sync for the epoch)."""
        count, members = self.batches_per_epoch, self.members
        if weight is None:
            return [(True,) * members] * count
        padded = torch.nn.functional.pad(weight, (0, count * self.batch_size - self.rows))
        sums = padded.reshape(*weight.shape[:-1], count, self.batch_size).sum(-1)
        has = (sums > 0).reshape(-1, count).T  # (batches, weight sets)
        rows = has.tolist()
        return [tuple(r) * (members if len(r) == 1 else 1) for r in rows]


class Epoch:
    """One epoch's batches, made as they are iterated (a sparse batch densified only then);
    iterating again gives the same batches (a fit replays an epoch to a failing step)."""

    def __init__(self, source: BatchSource, step: StepKind, run: Run, x, y: Tensor,
                 weight: Tensor | None):
        self.source, self.step, self.x, self.y, self.weight = source, step, x, y, weight
        self.epoch, self.dropout_seed, self.first_step = (run.epoch, run.dropout_seed,
                                                          run.steps_done)
        size = source.batch_size
        self.plan = [(index, start, stepped) for index, (start, stepped) in
                     enumerate(zip(range(0, source.rows, size), source._stepped(weight)))
                     if any(stepped)]  # a batch without weight for any member: no step

    def __len__(self) -> int:
        return len(self.plan)

    def chunks(self):
        """The batches in lists of at most ``steps_per_call`` (the last may be shorter)."""
        size, chunk = self.source.steps_per_call, []
        for batch in self:
            chunk.append(batch)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def __iter__(self):
        source, x, weight = self.source, self.x, self.weight
        for number, (index, start, stepped) in enumerate(self.plan):
            rows = slice(start, start + source.batch_size)
            xb = x[rows] if source.densify is None else source.densify(x[rows])
            wb = None if weight is None else weight[..., rows]
            if wb is not None and source.check_rows is not None and source.shuffle:
                source.check_rows(wb, f" (epoch {self.epoch}, batch {index})")
            key = None if self.dropout_seed is None else self.step.dropout_key(
                self.dropout_seed, self.first_step + number, self.y.device)
            yield Batch(xb, self.y[rows], wb, key, xb.shape[0], source.pad_to, stepped)


@dataclasses.dataclass
class Run:
    """A fit in progress, at the start of ``epoch``: what a checkpoint holds to continue it
    bit-identically. Per-member lists have one entry for a single network."""

    carry: Carry
    members: int = 1
    epoch: int = 0
    steps_done: int = 0
    train_loss: list = dataclasses.field(default_factory=list)  # per epoch, per member
    valid_loss: list = dataclasses.field(default_factory=list)
    dropout_seed: int | None = None
    # per member; left empty, each is filled in by __post_init__
    best_loss: list[float] = dataclasses.field(default_factory=list)
    best_epoch: list[int | None] = dataclasses.field(default_factory=list)
    waited: list[int] = dataclasses.field(default_factory=list)
    stopped_epoch: list[int | None] = dataclasses.field(default_factory=list)  # (final)
    diverged_epoch: list[int | None] = dataclasses.field(default_factory=list)
    best: tuple | None = None  # (params, state) at each member's best validation loss
    extras: dict = dataclasses.field(default_factory=dict)  # the policies' own state (JSON)
    tensors: dict = dataclasses.field(default_factory=dict)  # and tensors (bagging counts)

    def __post_init__(self):
        k = self.members
        self.best_loss = self.best_loss or [math.inf] * k
        self.best_epoch = self.best_epoch or [None] * k
        self.waited = self.waited or [0] * k
        self.stopped_epoch = self.stopped_epoch or [None] * k
        self.diverged_epoch = self.diverged_epoch or [None] * k

    @property
    def active(self) -> list[bool]:
        return [s is None and d is None for s, d in zip(self.stopped_epoch, self.diverged_epoch)]


class Policy:
    """Something done after every epoch; ``on_epoch_end`` returns True to stop the fit.

    ``logs`` of an epoch: ``epoch``, ``train_losses`` and ``valid_losses`` (per member),
    ``batch_losses`` and ``batch_rows`` (per step), ``rows`` (trained), ``lrs`` (per member,
    the rate of the next update as ``rate_values`` gives it; absent for a step without an
    optimizer), ``epoch_time`` (s) and ``samples_per_s``; a policy may add to them for the
    policies after it."""

    batch_logs: bool = False  # on_batch_end wanted: each chunk's losses read after it runs

    def on_train_begin(self, run: Run) -> None:
        """Called before the first step (``run`` as made or restored)."""

    def on_batch_end(self, run: Run, logs: dict) -> None:
        """After each step, when ``batch_logs``: ``logs`` hold ``epoch``, ``batch`` (the
        step's position in the epoch), ``losses`` and ``lrs`` (per member; the rate that
        update used) and ``rows``. With chunks, called for each batch after the chunk runs."""

    def on_epoch_end(self, run: Run, logs: dict) -> bool:
        return False

    def on_checkpoint(self, run: Run) -> None:
        """Called before ``run`` is checkpointed (the ``.nonfinite`` checkpoint too): state
        that must survive a resume goes into ``run.extras`` (JSON) or ``run.tensors``."""

    def on_train_end(self, run: Run, error: BaseException | None) -> None:
        """Called when the loop ends, however it ends (``error``: the exception leaving it),
        before ``close``."""

    def on_non_finite(self, run: Run, error: NonFiniteLossError) -> None:
        """Called before a ``NonFiniteLossError`` leaves the loop (``run`` at the last finite
        step)."""

    def close(self) -> None:
        """Called when the loop ends, however it ends."""


class EarlyStopping(Policy):
    """A member stops (keeps its parameters; the others go on) after ``patience`` epochs
    without its validation loss improving by more than ``min_delta``; each member's best
    parameters and state are kept in ``run.best`` (for ``restore_best``)."""

    def __init__(self, step: StepKind, patience: int | None, min_delta: float):
        self.step, self.patience, self.min_delta = step, patience, min_delta

    def on_epoch_end(self, run: Run, logs: dict) -> bool:
        losses = logs.get("valid_losses")
        if losses is None:
            return False
        active, improved = run.active, []
        for k, value in enumerate(losses):
            better = active[k] and value < run.best_loss[k] - self.min_delta
            if better:
                run.best_loss[k], run.best_epoch[k], run.waited[k] = value, logs["epoch"], 0
            elif active[k]:
                run.waited[k] += 1
            improved.append(better)
        if any(improved):  # kept even without restore_best: a resumed fit may ask for it
            current = (run.carry.params, run.carry.state)
            run.best = current if run.best is None else self.step.select(improved, current,
                                                                         run.best)
        if self.patience is not None:
            for k in range(run.members):
                if active[k] and run.waited[k] >= self.patience:
                    run.stopped_epoch[k] = logs["epoch"] + 1
        return not any(run.active)


def all_finite(tree) -> bool:
    """Whether every floating leaf of ``tree`` is finite: one sync, and on torch's foreach
    kernels a handful of dispatches whatever the leaf count (~18 µs for a small network,
    against ~75 µs leaf by leaf: a fit checks once per epoch)."""
    leaves = [leaf for leaf in flatten(tree)[0] if leaf.is_floating_point() and leaf.numel()]
    if not leaves:
        return True
    if _FOREACH_MAX:  # max |leaf| is NaN or inf exactly when a value is
        return bool(torch.stack(torch._foreach_max(torch._foreach_abs(leaves))).isfinite().all())
    return bool(torch.stack([leaf.isfinite().all() for leaf in leaves]).all())


_FOREACH_MAX = hasattr(torch, "_foreach_max")


def train_loop(step: StepKind, source: BatchSource, run: Run, *, epochs: int,
               valid: tuple | None = None, policies: Sequence[Policy] = (),
               checkpoint: Checkpointer | None = None, on_non_finite: str = "raise") -> Run:
    """Train ``run`` to ``epochs`` (or until a policy stops it); returns ``run``.

    ``valid``: (x, y) whose loss each member gets per epoch (``logs["valid_losses"]``);
    ``checkpoint``: saves ``run`` after the policies when ``checkpoint.due(run, final)``;
    ``on_non_finite``: "raise" (``NonFiniteLossError``) or "freeze" (an ensemble's diverged
    members go back to the epoch's start and train no more).
    """
    members, previous, error = run.members, None, None
    raisers = _Raisers(policies, checkpoint)
    watchers = [policy for policy in policies if policy.batch_logs]
    optimizer = getattr(step, "optimizer", None)
    step.pin_threads(run.extras, source.batch_size, source.y.device)
    try:
        with torch.no_grad():
            for policy in policies:
                policy.on_train_begin(run)
            for epoch in range(run.epoch, epochs):
                if not any(run.active):
                    break
                run.epoch = epoch
                began = time.perf_counter()
                start, start_steps = run.carry, run.steps_done
                active = _active_mask(run, source)
                batches = source.epoch(step, run)
                losses: list[Tensor] = []
                stepped: list[tuple] = []
                rows: list[int] = []
                for chunk in batches.chunks():
                    rates = None if not watchers else _chunk_rates(optimizer, run.carry,
                                                                   len(chunk))
                    if len(chunk) == 1:
                        run.carry, loss = step.run(run.carry, chunk[0], active)
                    else:
                        run.carry, loss = step.run_chunk(run.carry, chunk, active)
                    run.steps_done += len(chunk)
                    losses.append(loss.reshape(-1, members))
                    if watchers:
                        _batches_end(watchers, run, epoch, len(stepped), losses[-1], chunk,
                                     rates)
                    stepped.extend(batch.stepped for batch in chunk)
                    rows.extend(batch.rows for batch in chunk)
                values = torch.cat(losses).tolist() if losses else []
                trained = time.perf_counter()
                epoch_losses = _epoch_means(values, stepped, members)
                record = _EpochRecord(epoch, start, start_steps, batches, len(run.train_loss),
                                      len(run.valid_loss))
                if on_non_finite == "raise":
                    _raise_on_non_finite_loss(step, run, record, values, previous, raisers)
                else:
                    _freeze_diverged(step, run, epoch_losses, stepped, start)
                run.train_loss.append(epoch_losses)
                logs = {"epoch": epoch, "train_losses": epoch_losses, "batch_losses": values,
                        "batch_rows": rows, "rows": sum(rows)}
                if optimizer is not None:
                    logs["lrs"] = rate_values(optimizer.learning_rate(run.carry.opt_state)
                                              .reshape(-1))
                if valid is not None:
                    logs["valid_losses"] = step.valid_losses(run.carry, *valid)
                    run.valid_loss.append(logs["valid_losses"])
                logs["epoch_time"] = time.perf_counter() - began
                logs["samples_per_s"] = sum(rows) / max(trained - began, 1e-9)
                run.epoch = epoch + 1
                stop = False
                for policy in policies:
                    stop = policy.on_epoch_end(run, logs) or stop
                stop = step.agree(stop)
                if optimizer is not None:
                    run.carry = step.agree_rate(run.carry)
                final = stop or run.epoch == epochs
                due = checkpoint is not None and checkpoint.due(run, final)
                if on_non_finite == "raise" and (final or due):
                    _raise_on_overflow(step, run, record, raisers)  # saved or returned: finite
                if checkpoint is not None and due:
                    for policy in policies:
                        policy.on_checkpoint(run)
                    checkpoint.save(run)
                previous = record
                if stop:
                    break
    except BaseException as caught:
        error = caught
        raise
    finally:
        step.forget()
        _end(run, policies, checkpoint, error)
    return run


def _end(run: Run, policies: Sequence[Policy], checkpoint: Policy | None,
         error: BaseException | None) -> None:
    """Every policy's ``on_train_end``, then every ``close``, each called even when one before
    it raised: the first such exception is raised after them (noted on ``error`` instead when
    an exception already leaves the loop)."""
    failure = None
    for call in ([lambda p=p: p.on_train_end(run, error) for p in policies]
                 + [p.close for p in [*policies, checkpoint] if p is not None]):
        try:
            call()
        except Exception as caught:  # noqa: BLE001 (raised after the others ran)
            failure = failure or caught
    if failure is None:
        return
    if error is None:
        raise failure
    if hasattr(error, "add_note"):
        error.add_note(f"ending the fit raised too: {failure!r}")


def rate_values(rates: Tensor) -> list:
    """``rates.tolist()`` (one read), each value the shortest decimal that reads back to the
    same value in the rates' dtype: a float32 rate of 0.01 is 0.01, not 0.009999999776482582
    (float64 values as they are). Logs, writers and ``Trainer.learning_rate`` show rates so."""
    if rates.dtype == torch.float64 or not rates.is_floating_point():
        return rates.tolist()
    flat = rates.detach().reshape(-1).cpu()
    if flat.dtype in (torch.float32, torch.float16):  # NumPy's str: the shortest round trip
        values = [float(str(value)) for value in flat.numpy()]
    else:
        values = [_shortest(value, flat.dtype) for value in flat.tolist()]
    return torch.tensor(values, dtype=torch.float64).reshape(rates.shape).tolist()


def _shortest(value: float, dtype: torch.dtype) -> float:
    """The shortest decimal that ``dtype`` rounds to ``value`` (a value of that dtype)."""
    if not math.isfinite(value):
        return value
    for digits in range(1, 18):
        candidate = float(f"{value:.{digits}g}")
        if torch.tensor(candidate, dtype=dtype).item() == value:
            return candidate
    return value


def _chunk_rates(optimizer, carry: Carry, count: int) -> Tensor | None:
    """(count, K) rates that the chunk's updates use, from its first step's state (the schedule
    at each step count), or None without an optimizer."""
    if optimizer is None:
        return None
    state = carry.opt_state
    first = optimizer.learning_rate(state).reshape(1, -1)
    if count == 1 or not (dataclasses.is_dataclass(state) and hasattr(state, "step")):
        return first.expand(count, -1)
    # the cast: is_dataclass admits a dataclass type too; an optimizer state is an instance
    return torch.stack([optimizer.learning_rate(dataclasses.replace(
        cast("DataclassInstance", state), step=state.step + i)).reshape(-1)
        for i in range(count)])


def _batches_end(watchers: Sequence[Policy], run: Run, epoch: int, first: int, losses: Tensor,
                 chunk: Sequence[Batch], rates: Tensor | None) -> None:
    """``on_batch_end`` of each watcher for each batch of a chunk that ran: one read."""
    values = losses.tolist()
    batch_rates = None if rates is None else rate_values(rates)
    for offset, batch in enumerate(chunk):
        logs = {"epoch": epoch, "batch": first + offset, "losses": values[offset],
                "rows": batch.rows}
        if batch_rates is not None:
            logs["lrs"] = batch_rates[offset]
        for policy in watchers:
            policy.on_batch_end(run, logs)


def _active_mask(run: Run, source: BatchSource) -> Tensor | None:
    """(K,) booleans of the members that step, for an ensemble (None: all, or one network)."""
    return None if run.members == 1 else torch.tensor(run.active, device=source.y.device)


def _epoch_means(values: list[list[float]], stepped: list[tuple], members: int) -> list[float]:
    """Each member's mean over the batches it stepped in (NaN for none)."""
    means = []
    for k in range(members):
        mine = [row[k] for row, s in zip(values, stepped) if s[k]]
        means.append(sum(mine) / len(mine) if mine else math.nan)
    return means


class _EpochRecord(NamedTuple):
    """What replaying an epoch takes: its start and batches, and the history's length before
    it."""

    epoch: int
    start: Carry
    start_steps: int
    batches: Epoch
    train_entries: int
    valid_entries: int


def _replay(step: StepKind, record: _EpochRecord, steps: int) -> list[Carry]:
    """The carries before each of the epoch's first ``steps`` steps, and after them."""
    carries = [record.start]
    for batch in itertools.islice(record.batches, steps):
        carries.append(step.run(carries[-1], batch)[0])
    return carries


def _raise_on_non_finite_loss(step: StepKind, run: Run, record: _EpochRecord, values: list,
                              previous: _EpochRecord | None, raisers: _Raisers) -> None:
    """For one network: if a loss of the epoch became NaN or inf, put ``run`` back to the last
    finite step (replaying the epoch to it; steps are deterministic) and raise.

    The parameters are checked only then, not after every epoch (~50 µs a check): an update
    that overflowed shows in the next step's loss, and a step whose parameters came in
    non-finite means the update before it overflowed — the epoch's previous step, or the last
    one of the epoch before. (The end of a fit and every checkpoint check the parameters:
    ``_raise_on_overflow``.)"""
    bad = next((i for i, row in enumerate(values) if not math.isfinite(row[0])), None)
    if bad is None:
        return
    carries = _replay(step, record, bad)
    if not all_finite(carries[-1].params):
        if bad == 0 and previous is not None:  # the last update of the epoch before
            _raise_on_overflow(step, run, previous, raisers, checked=False)
        if bad > 0:
            carries.pop()  # the update before the failing loss overflowed: one more step back
    run.carry, run.steps_done = carries[-1], record.start_steps + len(carries) - 1
    _raise(run, f"the loss became {values[bad][0]} in epoch {run.epoch} (counted from 0; "
           f"the verbose line's epoch {run.epoch + 1}), batch {bad} (counted from 0)", bad,
           raisers)


def _raise_on_overflow(step: StepKind, run: Run, record: _EpochRecord, raisers: _Raisers, *,
                       checked: bool = True) -> None:
    """If the epoch's last update made the parameters NaN or inf (``checked=False``: known
    already), put ``run`` back to the step before it, that epoch's history undone, and
    raise."""
    if checked and all_finite(run.carry.params):
        return
    carries = _replay(step, record, len(record.batches) - 1)
    run.carry, run.steps_done = carries[-1], record.start_steps + len(carries) - 1
    run.epoch = record.epoch
    del run.train_loss[record.train_entries:], run.valid_loss[record.valid_entries:]
    _raise(run, f"the parameters became NaN or inf in the last step of epoch {record.epoch} "
           f"(counted from 0; the verbose line's epoch {record.epoch + 1})", None, raisers)


class _Raisers(NamedTuple):
    """Who hears of a ``NonFiniteLossError`` before it leaves the loop: the policies, then the
    checkpointer (which saves the last finite state)."""

    policies: Sequence[Policy]
    checkpoint: Checkpointer | None


def _raise(run: Run, what: str, batch: int | None, raisers: _Raisers) -> None:
    """Raise ``NonFiniteLossError`` for ``run`` (at its last finite step) after each policy's
    ``on_non_finite`` and, when checkpointing, their ``on_checkpoint`` (their state as of now
    goes into the ``.nonfinite`` checkpoint) and the checkpointer's ``on_non_finite``."""
    error = NonFiniteLossError(
        f"{what}; the error carries the last finite parameters (.params) and the history so "
        "far; try a smaller learning rate",
        epoch=run.epoch, batch=batch, params=run.carry.params, opt_state=run.carry.opt_state,
        history=None, state=run.carry.state)
    for policy in raisers.policies:
        policy.on_non_finite(run, error)
    if raisers.checkpoint is not None:
        for policy in raisers.policies:
            policy.on_checkpoint(run)
        raisers.checkpoint.on_non_finite(run, error)
    raise error


def _freeze_diverged(step: StepKind, run: Run, epoch_losses: list[float],
                     stepped: list[tuple], start: Carry) -> None:
    """Members whose epoch loss is NaN or inf go back to the epoch's start, diverged (a member
    without weight all epoch has no loss, NaN, and did not diverge)."""
    active = run.active
    diverged = [active[k] and any(s[k] for s in stepped) and not math.isfinite(value)
                for k, value in enumerate(epoch_losses)]
    if not any(diverged):
        return
    run.carry = Carry(*step.select([not d for d in diverged], tuple(run.carry), tuple(start)))
    for k, d in enumerate(diverged):
        if d:
            run.diverged_epoch[k] = run.epoch
