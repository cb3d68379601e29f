"""Learning-rate schedules: pure functions of the optimizer's step count.

A schedule is ``lr(step) = base · factor(step)`` (cosine: ``eta_min + (base - eta_min) ·
factor``), computed with tensor math from the 0-d step count kept in the optimizer state, so
a compiled step never recompiles as the rate changes.
``step`` counts the updates already made: the first update uses ``factor(0)``, as a
``torch.optim.lr_scheduler`` stepped once after every ``optimizer.step()``.

Schedules compose: ``linear_warmup(schedule, warmup_steps)`` warms up into any schedule,
``sequence(parts, boundaries)`` runs schedules one after another (``SequentialLR``), and
``lambda_lr(lr, fn)`` is ``lr·fn(step)`` (``LambdaLR``; an optimizer's ``lr`` may be such a
function of the step itself). Every one scales with the optimizer state's base rate
(``with_learning_rate``).

    optimizer = fnmlp.adam(fnmlp.schedules.cosine(1e-3, total_steps=1000))
    optimizer = fnmlp.adam(fnmlp.schedules.linear_warmup(
        fnmlp.schedules.cosine(1e-3, total_steps=900), warmup_steps=100))
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable

import torch
from torch import Tensor

from fnmlp import _registry
from fnmlp._validate import check_learning_rate, check_positive_int

__all__ = ["Schedule", "Constant", "StepDecay", "Exponential", "Cosine", "LinearWarmup",
           "Sequential", "Lambda", "constant", "step_decay", "exponential", "cosine",
           "linear_warmup", "sequence", "lambda_lr", "as_lr"]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Base class: ``base`` learning rate times ``factor(step)``."""

    base: float

    def __init_subclass__(cls, **kwargs):
        """fnmlp's own schedules register themselves (a user's: ``fnmlp.register``)."""
        super().__init_subclass__(**kwargs)
        _registry.add_own(cls, "schedule")

    def __post_init__(self):
        check_learning_rate(self.base, "base learning rate")

    def factor(self, step: Tensor) -> Tensor:
        raise NotImplementedError

    def rate(self, base: Tensor, step: Tensor) -> Tensor:
        """The learning rate at ``step`` for base rate ``base`` (the optimizer state's, which
        ``with_learning_rate`` may have changed)."""
        return base * self.factor(step)

    def __call__(self, step) -> Tensor:
        """The learning rate at ``step`` (a number or a tensor of them) for this base."""
        step = torch.as_tensor(step)
        if not step.is_floating_point():
            step = step.to(torch.float64)
        return self.rate(torch.tensor(self.base, dtype=step.dtype, device=step.device), step)


@dataclasses.dataclass(frozen=True)
class Constant(Schedule):
    def factor(self, step):
        return torch.ones_like(step)


@dataclasses.dataclass(frozen=True)
class StepDecay(Schedule):
    """factor = gamma ** floor(step / step_size) (``StepLR``)."""

    step_size: int = 1
    gamma: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        check_positive_int(self.step_size, "step_size")
        _check_gamma(self.gamma)

    def factor(self, step):
        return self.gamma ** torch.floor(step / self.step_size)


@dataclasses.dataclass(frozen=True)
class Exponential(Schedule):
    """factor = gamma ** step (``ExponentialLR``)."""

    gamma: float = 0.99

    def __post_init__(self):
        super().__post_init__()
        _check_gamma(self.gamma)

    def factor(self, step):
        return self.gamma ** step


@dataclasses.dataclass(frozen=True)
class Cosine(Schedule):
    """lr = eta_min + (base - eta_min)·(1 + cos(π·step/total_steps))/2
    (``CosineAnnealingLR``); ``eta_min`` is absolute, whatever the base rate."""

    total_steps: int = 1
    eta_min: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        check_positive_int(self.total_steps, "total_steps")
        eta_min = _real(self.eta_min, "eta_min")
        if not 0 <= eta_min <= float(self.base):
            raise ValueError(f"eta_min must be in [0, lr] (a floor between 0 and the base rate "
                             f"lr={float(self.base)}), got eta_min={eta_min}")

    def factor(self, step):
        """(1 + cos(π·step/total_steps))/2, falling from 1 to 0."""
        return (1 + torch.cos(math.pi * step / self.total_steps)) / 2

    def rate(self, base, step):
        return self.eta_min + (base - self.eta_min) * self.factor(step)


@dataclasses.dataclass(frozen=True)
class LinearWarmup(Schedule):
    """factor rises linearly from ``start_factor`` to 1 over ``warmup_steps``, then stays 1
    (``LinearLR``)."""

    warmup_steps: int = 1
    start_factor: float = 1 / 3

    def __post_init__(self):
        super().__post_init__()
        check_positive_int(self.warmup_steps, "warmup_steps")
        if not 0 < self.start_factor <= 1:
            raise ValueError(f"start_factor must be in (0, 1], got {self.start_factor}")

    def factor(self, step):
        progress = torch.clamp(step, max=self.warmup_steps) / self.warmup_steps
        return self.start_factor + (1 - self.start_factor) * progress


@dataclasses.dataclass(frozen=True)
class Sequential(Schedule):
    """Schedules one after another (``SequentialLR``, optax ``join_schedules``): ``parts[i]``
    runs from step ``boundaries[i - 1]`` (``parts[0]`` from 0), its step counted from there.

    For the state's base rate b, part i runs with base b·parts[i].base/parts[0].base: at the
    initial rate every part has its own base, and scaling the state's rate
    (``with_learning_rate``) scales every part alike. A part that is itself a ``Sequential``
    is spliced in (same rates, one flat list). Take ``parts`` and ``boundaries`` by keyword;
    ``base`` is ``parts[0].base`` (given, it must equal it).
    """

    base: float = math.nan  # parts[0].base (NaN: not given)
    parts: tuple[Schedule, ...] = ()
    boundaries: tuple[int, ...] = ()

    def __post_init__(self):
        if isinstance(self.base, (list, tuple)):
            raise TypeError("Sequential takes parts= and boundaries= by keyword (or use "
                            "fnmlp.schedules.sequence(parts, boundaries))")
        parts, boundaries = _spliced(*_checked_parts(self.parts, self.boundaries))
        if isinstance(self.base, float) and math.isnan(self.base):
            object.__setattr__(self, "base", parts[0].base)
        elif isinstance(self.base, (int, float, Tensor)) and float(self.base) != float(
                parts[0].base):
            raise ValueError(f"base must be parts[0].base ({float(parts[0].base)}), got "
                             f"{self.base}")
        object.__setattr__(self, "parts", parts)
        object.__setattr__(self, "boundaries", boundaries)
        super().__post_init__()

    def rate(self, base, step):
        result = self.parts[0].rate(base, step)
        for start, part in zip(self.boundaries, self.parts[1:]):
            ratio = float(part.base) / float(self.base)
            scaled = base if ratio == 1 else base * ratio
            later = part.rate(scaled, torch.clamp(step - start, min=0))
            result = torch.where(step >= start, later, result)
        return result


def _real(value, name: str) -> float:
    """``value`` (a real number or a 0-d real tensor) as a float, or a TypeError naming it."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex() \
            and value.dtype != torch.bool:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{name} must be a float, got {type(value).__name__}")


def _check_gamma(gamma) -> None:
    value = _real(gamma, "gamma")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"gamma must be finite and > 0 (the factor of each decay), got {value}")


def _checked_parts(parts, boundaries) -> tuple[tuple, tuple]:
    """``parts`` and ``boundaries`` as tuples, or a clear error naming the argument."""
    if not isinstance(parts, (list, tuple)):
        raise TypeError(f"parts must be a list of schedules, got {type(parts).__name__}")
    if not parts:
        raise ValueError("parts must hold at least one schedule")
    for i, part in enumerate(parts):
        if not isinstance(part, Schedule):
            raise TypeError(f"parts[{i}] must be a schedule, got {type(part).__name__} (a "
                            "function of the step becomes one with lambda_lr(lr, fn))")
    if not isinstance(boundaries, (list, tuple)):
        raise TypeError(f"boundaries must be a list of steps, got {type(boundaries).__name__}")
    if len(boundaries) != len(parts) - 1:
        raise ValueError(f"boundaries must hold one step per part after the first: "
                         f"{len(parts) - 1} for {len(parts)} parts, got {len(boundaries)}")
    for i, boundary in enumerate(boundaries):
        check_positive_int(boundary, f"boundaries[{i}]")
    boundaries = tuple(int(b) for b in boundaries)
    if any(b <= a for a, b in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries must be strictly increasing, got {list(boundaries)}")
    return tuple(parts), boundaries


def _spliced(parts: tuple, boundaries: tuple) -> tuple[tuple, tuple]:
    """The parts of nested ``Sequential`` parts spliced in, with their absolute starts (those
    starting after the part's end dropped)."""
    starts, ends = (0, *boundaries), (*boundaries, math.inf)
    flat, flat_starts = [], []
    for part, start, end in zip(parts, starts, ends):
        inner = part.parts if isinstance(part, Sequential) else (part,)
        inner_starts = (0, *part.boundaries) if isinstance(part, Sequential) else (0,)
        for piece, offset in zip(inner, inner_starts):
            if start + offset < end:
                flat.append(piece)
                flat_starts.append(start + offset)
    return tuple(flat), tuple(flat_starts[1:])


@dataclasses.dataclass(frozen=True)
class Lambda(Schedule):
    """lr = base·fn(step) (``LambdaLR``). ``fn`` takes the step as a floating 0-d tensor
    (the state's rate dtype) and returns a number or a 0-d tensor; written with arithmetic and
    torch ops it traces into a compiled step. A Python function cannot be saved in a
    checkpoint."""

    fn: Callable[[Tensor], Tensor | float]

    def __post_init__(self):
        super().__post_init__()
        if not callable(self.fn) or isinstance(self.fn, (Schedule, type)):
            raise TypeError(f"fn must be a function of the step, got {self.fn!r}")
        self._check_first_rate()

    def _check_first_rate(self) -> None:
        """Calls ``fn`` at steps 0 and 1000 now, so that a function that cannot give a rate
        fails here, not in a fit: one that raises (a schedule factory such as
        ``fnmlp.schedules.cosine`` passed uncalled), returns no number, gives a negative rate,
        or computes the rate outside torch (``math.exp(step)``, ``float(step)``,
        ``int(step)``: a Python number that changes with the step), which runs eagerly but
        cannot be traced into a compiled step."""
        values = [self._rate_at(step) for step in (0.0, 1000.0)]
        for step, value in zip((0, 1000), values):
            rate = float(self.base) * float(value)
            # a rate overflowing by step 1000 may be meant for fewer steps: only step 0's
            # must be finite
            if math.isnan(rate) or rate < 0 or step == 0 and math.isinf(rate):
                raise ValueError(f"lr must be finite and >= 0, but the learning-rate function "
                                 f"{self.fn!r} gives {rate} at step {step}")
        if any(not isinstance(v, Tensor) for v in values) and float(values[0]) != float(
                values[1]):
            shown = [repr(v) if isinstance(v, Tensor) else f"the Python number {v!r}"
                     for v in values]
            raise TypeError(
                f"the learning-rate function {self.fn!r} returns a Python number, not a tensor, "
                f"for the step tensor, and the rate changes with the step ({shown[0]} at step "
                f"0, {shown[1]} at step 1000): it "
                "computes the rate outside torch (math.exp, float(step), int(step), or min, "
                "max and if on the step), which "
                "fails once the step is compiled; write it with torch operations on the step "
                "tensor, e.g. torch.exp instead of math.exp, so that it works in a compiled "
                "step")

    def _rate_at(self, step: float) -> Tensor | float:
        """``fn`` at ``step`` (given as the 0-d float64 tensor a fit gives it), checked to be
        a number or a 0-d real tensor."""
        try:
            value = self.fn(torch.tensor(step, dtype=torch.float64))
        except Exception as error:
            raise TypeError(f"the learning-rate function {self.fn!r} failed at step "
                            f"{step:g} ({type(error).__name__}: {error}); it must take the "
                            "step (a 0-d float tensor) and return the rate") from error
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                or isinstance(value, Tensor) and value.dim() == 0
                and value.dtype != torch.bool and not value.is_complex()):
            shown = (f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor)
                     else type(value).__name__)
            raise TypeError(f"the learning-rate function {self.fn!r} must return a number or "
                            f"a 0-d tensor, got {shown} at step {step:g}")
        return value

    def factor(self, step):
        value = torch.as_tensor(self.fn(step), dtype=step.dtype, device=step.device)
        if torch.broadcast_shapes(value.shape, step.shape) != step.shape:
            raise ValueError(f"fn must return a number or a 0-d tensor, got shape "
                             f"{tuple(value.shape)}")
        return value


def constant(lr: float) -> Constant:
    """lr at every step (``ConstantLR(factor=1)``). Arguments: lr: the rate, > 0."""
    return Constant(lr)


def step_decay(lr: float, step_size: int, gamma: float = 0.1) -> StepDecay:
    """lr·gamma^floor(step/step_size) (``StepLR``).

    Arguments:
        lr: the base rate, > 0.
        step_size: steps between decays, >= 1.
        gamma: the factor of each decay, > 0.
    """
    return StepDecay(lr, step_size, gamma)


def exponential(lr: float, gamma: float) -> Exponential:
    """lr·gamma^step (``ExponentialLR``). Arguments: lr: the base rate; gamma: the factor per
    step, > 0."""
    return Exponential(lr, gamma)


def cosine(lr: float, total_steps: int, eta_min: float = 0.0) -> Cosine:
    """eta_min + (lr - eta_min)·(1 + cos(π·step/total_steps))/2 (``CosineAnnealingLR``).

    Arguments:
        lr: the base rate, > 0.
        total_steps: the half period T_max, >= 1.
        eta_min: the floor, absolute, in [0, lr]. Past ``total_steps`` the rate rises again
            (as ``CosineAnnealingLR``'s): to hold the floor, follow the cosine with
            ``constant(eta_min)`` in a ``sequence``.
    """
    return Cosine(lr, total_steps, eta_min)


def linear_warmup(lr: float | Schedule, warmup_steps: int, start_factor: float = 1 / 3
                  ) -> LinearWarmup | Sequential:
    """A linear warm-up over ``warmup_steps``, from ``start_factor`` times the base rate to it
    (``LinearLR`` with end_factor 1); then the rate ``lr``, or the schedule ``lr`` with its
    step counted from the warm-up's end (``SequentialLR([LinearLR, ...], [warmup_steps])``).

    Arguments:
        lr: the base rate, > 0; or a schedule to warm up into (to its base rate, its
            starting rate for every decay here): a ``Sequential`` is returned.
        warmup_steps: steps to reach the base rate, >= 1.
        start_factor: in (0, 1], the first step's factor.
    """
    if isinstance(lr, Schedule):
        return sequence([LinearWarmup(lr.base, warmup_steps, start_factor), lr], [warmup_steps])
    return LinearWarmup(lr, warmup_steps, start_factor)


def sequence(parts, boundaries) -> Sequential:
    """Schedules one after another (optax ``join_schedules``, ``SequentialLR``): ``parts[i]``
    from step ``boundaries[i - 1]`` on, its step counted from there; every part scales with
    the optimizer state's base rate (see ``Sequential``).

    Arguments:
        parts: a list of k >= 1 schedules.
        boundaries: k - 1 strictly increasing steps >= 1, where parts 1 .. k-1 start.
    """
    return Sequential(parts=parts, boundaries=boundaries)


def lambda_lr(lr: float, fn: Callable[[Tensor], Tensor | float]) -> Lambda:
    """lr·fn(step) (``LambdaLR``).

    Arguments:
        lr: the base rate, > 0 (the optimizer state's, which ``with_learning_rate`` scales).
        fn: ``fn(step) -> factor``, ``step`` a floating 0-d tensor; use arithmetic and torch
            ops (not ``math`` or ``int(step)``) so that it traces into a compiled step.
            Cannot be saved in a checkpoint.

    Raises ``TypeError`` when ``fn`` fails at step 0 or 1000, returns no number there, or
    returns a Python number that differs between them (computed outside torch);
    ``ValueError`` for a negative rate there.
    """
    return Lambda(lr, fn)


def as_lr(lr):
    """An optimizer's ``lr`` as it keeps it: a plain function of the step (optax style,
    returning the rate) becomes ``lambda_lr(1.0, lr)``; anything else is returned as is."""
    if callable(lr) and not isinstance(lr, (Schedule, type)):
        return Lambda(1.0, lr)
    return lr
