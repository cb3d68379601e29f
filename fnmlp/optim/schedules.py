"""Learning-rate schedules: pure functions of the optimizer's step count.

A schedule is ``lr(step) = base · factor(step)`` (cosine: ``eta_min + (base - eta_min) ·
factor``), computed with tensor math from the 0-d step count kept in the optimizer state, so
a compiled step never recompiles as the rate changes.
``step`` counts the updates already made: the first update uses ``factor(0)``, as a
``torch.optim.lr_scheduler`` stepped once after every ``optimizer.step()``.

    optimizer = fnmlp.adam(fnmlp.schedules.cosine(1e-3, total_steps=1000))
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from fnmlp import _registry
from fnmlp._validate import check_learning_rate, check_positive_int


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

    def factor(self, step):
        return self.gamma ** torch.floor(step / self.step_size)


@dataclasses.dataclass(frozen=True)
class Exponential(Schedule):
    """factor = gamma ** step (``ExponentialLR``)."""

    gamma: float = 0.99

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


def constant(lr: float) -> Constant:
    """lr at every step (``ConstantLR(factor=1)``). Arguments: lr: the rate, > 0."""
    return Constant(lr)


def step_decay(lr: float, step_size: int, gamma: float = 0.1) -> StepDecay:
    """lr·gamma^floor(step/step_size) (``StepLR``).

    Arguments:
        lr: the base rate, > 0.
        step_size: steps between decays, >= 1.
        gamma: the factor of each decay.
    """
    return StepDecay(lr, step_size, gamma)


def exponential(lr: float, gamma: float) -> Exponential:
    """lr·gamma^step (``ExponentialLR``). Arguments: lr: the base rate; gamma: the factor per
    step."""
    return Exponential(lr, gamma)


def cosine(lr: float, total_steps: int, eta_min: float = 0.0) -> Cosine:
    """eta_min + (lr - eta_min)·(1 + cos(π·step/total_steps))/2 (``CosineAnnealingLR``).

    Arguments:
        lr: the base rate, > 0.
        total_steps: the half period T_max, >= 1.
        eta_min: the floor, absolute.
    """
    return Cosine(lr, total_steps, eta_min)


def linear_warmup(lr: float, warmup_steps: int, start_factor: float = 1 / 3) -> LinearWarmup:
    """lr·factor, the factor rising linearly from ``start_factor`` to 1 over ``warmup_steps``
    (``LinearLR`` with end_factor 1).

    Arguments:
        lr: the base rate, > 0.
        warmup_steps: steps to reach lr, >= 1.
        start_factor: in (0, 1], the first step's factor.
    """
    return LinearWarmup(lr, warmup_steps, start_factor)
