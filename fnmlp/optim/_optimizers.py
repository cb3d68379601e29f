"""Functional optimizers: ``init(params) -> state`` and ``update(params, grads, state) ->
(params, state)``, each following its ``torch.optim`` counterpart's arithmetic.

Nothing is mutated. What changes during training lives in the state as tensors: the step count
(0-d int64, exact at any length of training), the learning rate (0-d, in the parameters' float
dtype), per-parameter buffers shaped like the parameters. A compiled step thus
never recompiles for a new learning rate or a schedule. ``lr`` is a float, a 0-d tensor, or a
schedule from ``fnmlp.schedules`` (then the state's rate is the schedule's base).

``update`` checks its arguments and runs the per-leaf formulas (what compiled and batched steps
trace); ``unchecked_update(params, grads, state, *, fused=False)`` is the same update without
the checks, for other packages' steps. With ``fused=True`` the caller says the update runs
eagerly, and Adam/AdamW and SGD with momentum then go through torch's fused CPU kernel where the
tensors allow (``fnmlp.optim._fused``: one call for every leaf instead of ~10 operations per
leaf, within rounding of the formulas).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import ClassVar, Protocol

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from fnmlp import _registry
from fnmlp._tree import flatten, pytree_dataclass, tree_builder, unflatten_traced
from fnmlp._validate import check_learning_rate
from fnmlp.optim import _fused
from fnmlp.optim.schedules import Schedule, as_lr


def _leafwise(fn, params, *trees):
    """Apply ``fn(p, *others) -> tuple`` leaf by leaf; return one tree per output (None for an
    output that is None at every leaf: an absent buffer).

    One flattening for eager code and tracing alike: fnmlp's own (several times faster than
    torch's pytree for these small trees, and traced by dynamo and ``make_fx``), rebuilt by
    walking the spec (``unflatten_traced``: no generated code, which dynamo cannot trace)."""
    leaves, spec = flatten(params)
    others = [flatten(tree)[0] if tree is not None else [None] * len(leaves) for tree in trees]
    results = [fn(leaf, *(other[i] for other in others)) for i, leaf in enumerate(leaves)]
    outputs = []
    for k in range(len(results[0])):
        column = [r[k] for r in results]
        absent = all(value is None for value in column)
        outputs.append(None if absent else unflatten_traced(column, spec))
    return tuple(outputs)


def _zeros_like(params, fill: float = 0.0):
    return pytree.tree_map(lambda t: torch.full_like(t, fill), params)


def _rate_dtype(like: Tensor) -> torch.dtype:
    """The learning rate's dtype for parameters like ``like``: theirs, or float32 for half."""
    return like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32


def _scalar(value, like: Tensor) -> Tensor:
    dtype = _rate_dtype(like)
    if isinstance(value, Tensor):
        return value.detach().to(dtype=dtype, device=like.device).clone()
    return torch.tensor(value, dtype=dtype, device=like.device)


def _check_range(name: str, value, low: float, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be a number in {left}{low}, {high}{right}, got {value!r}")


def _first_tensor(tree, name: str) -> Tensor:
    leaves = flatten(tree)[0]
    if not leaves:
        raise ValueError(f"{name} holds no tensors")
    return leaves[0]


def _check_like(tree, name: str, leaves: list, spec, params) -> None:
    """Raise unless ``tree`` is structured like ``params`` (``leaves``, ``spec``), leaf by
    leaf of the same shape, dtype and device."""
    others, other_spec = flatten(tree)
    if other_spec != spec:
        raise ValueError(f"{name} must be structured like params ({len(leaves)} tensors in "
                         f"the same tree), got {len(others)} tensors in "
                         f"{type(tree).__name__}")
    for i, (p, g) in enumerate(zip(leaves, others)):
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            path = torch.utils._pytree.keystr(
                torch.utils._pytree.tree_flatten_with_path(params)[0][i][0])
            raise ValueError(f"{name}{path} is {tuple(g.shape)} {g.dtype} on {g.device} but "
                             f"params{path} is {tuple(p.shape)} {p.dtype} on {p.device}")


class OptimizerState(Protocol):
    """What every optimizer's state holds besides its per-parameter buffers."""

    @property
    def step(self) -> Tensor: ...

    @property
    def learning_rate(self) -> Tensor: ...


def steps_taken(state) -> Tensor:
    """The state's count of updates made, as a 0-d tensor in its learning rate's dtype."""
    return state.step.to(state.learning_rate.dtype)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """Base class. ``lr``: a positive float, a 0-d tensor, an ``fnmlp.schedules`` schedule, or
    a function of the step returning the rate (kept as ``schedules.lambda_lr(1.0, fn)``)."""

    lr: float | Tensor | Schedule

    def __init_subclass__(cls, **kwargs):
        """fnmlp's own optimizers register themselves (a user's: ``fnmlp.register``)."""
        super().__init_subclass__(**kwargs)
        _registry.add_own(cls, "optimizer")

    def __post_init__(self):
        object.__setattr__(self, "lr", as_lr(self.lr))  # a function of the step: a schedule
        if not isinstance(self.lr, Schedule):
            check_learning_rate(self.lr)

    @property
    def schedule(self) -> Schedule | None:
        return self.lr if isinstance(self.lr, Schedule) else None

    @property
    def base_lr(self) -> float | Tensor:
        return self.lr.base if isinstance(self.lr, Schedule) else self.lr

    @property
    def structure(self) -> tuple:
        """What a compiled update depends on: the type, the hyper-parameters and the schedule
        (the learning rate itself is in the state)."""
        fields = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                  if f.name != "lr"]
        return (type(self), self.schedule, *fields)

    def learning_rate(self, state) -> Tensor:
        """The rate for the next update: the schedule's rate at the state's step, for the
        state's (base) rate; without a schedule, the state's rate."""
        if self.schedule is None:
            return state.learning_rate
        return self.schedule.rate(state.learning_rate, steps_taken(state))

    def with_learning_rate(self, state, lr: float | Tensor):
        """A state whose (base) learning rate is ``lr``; no recompile of a compiled step."""
        check_learning_rate(lr)
        return dataclasses.replace(state, learning_rate=_scalar(lr, state.learning_rate))

    def _counters(self, params) -> dict:
        like = _first_tensor(params, "params")
        return {"step": torch.zeros((), dtype=torch.int64, device=like.device),
                "learning_rate": _scalar(self.base_lr, like)}

    state_type: ClassVar[type[OptimizerState]]

    def buffers(self) -> dict[str, bool]:
        """The state's per-parameter buffers: name -> whether these options keep it."""
        raise NotImplementedError

    def update(self: Optimizer | ClipByGlobalNorm, params, grads, state, *,
               fused: bool = False):
        """``(new_params, new_state)`` after one update with ``grads``.

        Arguments:
            params: a pytree of tensors (any shapes).
            grads: a pytree structured like ``params``, each gradient shaped like its
                parameter, of its dtype and on its device.
            state: this optimizer's state for these params (``init(params)`` or the last
                ``update``).
            fused: as ``unchecked_update``'s: True only where this call runs eagerly (not
                under ``torch.compile``, ``make_fx`` or ``vmap``); the default runs the per-leaf
                formulas, which trace anywhere.

        Checks that the three match (structure, shapes, dtypes, devices) before any work, and
        records no autograd history, whatever ``requires_grad`` the inputs have.
        """
        self.check(params, grads, state)
        with torch.no_grad():
            return self.unchecked_update(params, grads, state, fused=fused)

    def unchecked_update(self, params, grads, state, *, fused: bool = False):
        """``(new_params, new_state)``: ``update`` without its checks, for other packages'
        training steps (which check once, up front). Pure: nothing passed in is mutated.

        Arguments:
            params, grads, state: as ``update``'s, trusted to fit together (a mismatch fails
                inside torch, or worse, silently broadcasts).
            fused: run the update through torch's fused CPU kernel where the tensors allow it
                (Adam, AdamW and SGD with momentum; ``fnmlp.optim._fused``: CPU, contiguous,
                one float32 or float64 dtype, plain tensors, none requiring grad under grad
                mode), else the per-leaf formulas, silently; the results agree within
                rounding (~1e-16 relative per step in float64), not bit for bit. The caller
                promises that the call runs eagerly: the kernels read the rate as a number and
                have no batching rule, so steps that are traced (``torch.compile``,
                ``make_fx``) or batched (``vmap``) pass False, the per-leaf formulas.

        Records autograd history if grad mode is on and the inputs require grad (``update``
        turns it off).
        """
        raise NotImplementedError

    def check(self: Optimizer | ClipByGlobalNorm, params, grads, state) -> None:
        """Raise unless ``params``, ``grads`` (None: not checked) and ``state`` fit together."""
        if torch.compiler.is_compiling():
            return
        leaves, spec = flatten(params)
        if not leaves:
            raise ValueError("params holds no tensors")
        if grads is not None:
            _check_like(grads, "grads", leaves, spec, params)
        name = self.state_type.__name__
        if not isinstance(state, self.state_type):
            raise TypeError(f"state must be the {name} that this optimizer's init(params) "
                            f"returns, got {type(state).__name__}")
        like = leaves[0]
        step, rate = state.step, state.learning_rate
        if not (isinstance(step, Tensor) and step.dim() == 0 and step.dtype == torch.int64):
            raise TypeError(f"state.step must be a 0-d int64 tensor, got {step!r}")
        if not (isinstance(rate, Tensor) and rate.dim() == 0 and rate.dtype == _rate_dtype(like)
                and rate.device == like.device and step.device == like.device):
            raise ValueError(f"state.learning_rate is {getattr(rate, 'dtype', rate)} on "
                             f"{getattr(rate, 'device', '?')} but the parameters are "
                             f"{like.dtype} on {like.device}; make the state with "
                             "optimizer.init(params)")
        for field, kept in self.buffers().items():
            buffer = getattr(state, field)
            if kept and buffer is None:
                raise ValueError(f"state.{field} is None but {self!r} keeps it: the state "
                                 "comes from another optimizer; make it with init(params)")
            if not kept and buffer is not None:
                raise ValueError(f"state.{field} is set but {self!r} keeps none: the state "
                                 "comes from another optimizer; make it with init(params)")
            if kept:
                _check_like(buffer, f"state.{field}", leaves, spec, params)


@pytree_dataclass
class SGDState:
    step: Tensor
    learning_rate: Tensor
    momentum_buffer: object  # like params, or None without momentum


@dataclasses.dataclass(frozen=True)
class SGD(Optimizer):
    """``torch.optim.SGD``: g += wd·p; b = g at the first step, else μ·b + (1 - τ)·g;
    g = g + μ·b (nesterov) or b; p -= lr·g."""

    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check_flags(self, "nesterov", "maximize")
        _check_range("momentum", self.momentum, 0.0)
        _check_range("dampening", self.dampening, 0.0, 1.0, high_open=False)
        _check_range("weight_decay", self.weight_decay, 0.0)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening 0")

    state_type = SGDState

    def init(self, params) -> SGDState:
        buffer = _zeros_like(params) if self.momentum else None
        return SGDState(momentum_buffer=buffer, **self._counters(params))

    def buffers(self):
        return {"momentum_buffer": bool(self.momentum)}

    def unchecked_update(self, params, grads, state: SGDState, *, fused: bool = False):
        fusable = _fused.fusable(params, grads) if fused and self.momentum else None
        if fusable is not None:  # plain SGD: one multiply-add a leaf, never fused
            leaves, spec, grad_leaves = fusable
            new_params, buffers = _fused.sgd_momentum(
                leaves, grad_leaves, state.momentum_buffer, lr=self.learning_rate(state).item(),
                momentum=self.momentum, dampening=self.dampening,
                weight_decay=self.weight_decay, nesterov=self.nesterov, maximize=self.maximize,
                first_step=bool(state.step == 0))
            build = tree_builder(spec)
            return build(new_params), SGDState(step=state.step + 1,
                                               learning_rate=state.learning_rate,
                                               momentum_buffer=build(buffers))
        neg_lr = -self.learning_rate(state)
        first = state.step == 0 if self.momentum else None

        def one(p, g, buffer):
            if self.maximize:
                g = -g
            if self.weight_decay:
                g = g + p * self.weight_decay
            if self.momentum:
                buffer = torch.where(first, g, buffer * self.momentum
                                     + g * (1 - self.dampening))
                g = g + buffer * self.momentum if self.nesterov else buffer
            # addcmul is one fused multiply-add like torch.optim's add(alpha=-lr), and avoids
            # the add-with-alpha form that inductor has miscompiled (alpha dropped:
            # pytorch/pytorch#167313).
            return torch.addcmul(p, g, neg_lr), buffer

        new_params, buffers = _leafwise(one, params, grads, state.momentum_buffer)
        return new_params, SGDState(step=state.step + 1, learning_rate=state.learning_rate,
                                    momentum_buffer=buffers if self.momentum else None)


@pytree_dataclass
class AdamState:
    step: Tensor
    learning_rate: Tensor
    exp_avg: object
    exp_avg_sq: object
    max_exp_avg_sq: object  # like params with amsgrad, else None


@dataclasses.dataclass(frozen=True)
class Adam(Optimizer):
    """``torch.optim.Adam`` (``AdamW`` with ``decoupled=True``): m ← lerp(m, g, 1 - β1),
    v ← β2·v + (1 - β2)·g², p -= lr/(1 - β1^t) · m / (sqrt(v̂)/sqrt(1 - β2^t) + ε),
    v̂ = v or its running max (amsgrad). Weight decay adds wd·p to g, or with ``decoupled`` scales
    p by 1 - lr·wd first."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    decoupled: bool = False
    maximize: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check_flags(self, "amsgrad", "decoupled", "maximize")
        betas = self.betas
        if isinstance(betas, list) or (isinstance(betas, tuple) and any(
                isinstance(beta, Tensor) for beta in betas)):
            betas = tuple(_number(beta, "betas") for beta in betas)
            object.__setattr__(self, "betas", betas)
        if not (isinstance(betas, tuple) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        _check_range("beta1", self.betas[0], 0.0, 1.0)
        _check_range("beta2", self.betas[1], 0.0, 1.0)
        _check_range("eps", self.eps, 0.0, low_open=True)
        _check_range("weight_decay", self.weight_decay, 0.0)

    state_type = AdamState

    def init(self, params) -> AdamState:
        return AdamState(exp_avg=_zeros_like(params), exp_avg_sq=_zeros_like(params),
                         max_exp_avg_sq=_zeros_like(params) if self.amsgrad else None,
                         **self._counters(params))

    def buffers(self):
        return {"exp_avg": True, "exp_avg_sq": True, "max_exp_avg_sq": self.amsgrad}

    def unchecked_update(self, params, grads, state: AdamState, *, fused: bool = False):
        fusable = _fused.fusable(params, grads) if fused else None
        if fusable is not None:
            leaves, spec, grad_leaves = fusable
            step = state.step + 1
            new_params, m, v, v_max = _fused.adam(
                leaves, grad_leaves, state.exp_avg, state.exp_avg_sq, state.max_exp_avg_sq, step,
                lr=self.learning_rate(state).item(), betas=self.betas, eps=self.eps,
                weight_decay=self.weight_decay, amsgrad=self.amsgrad, decoupled=self.decoupled,
                maximize=self.maximize)
            build = tree_builder(spec)
            return build(new_params), AdamState(
                step=step, learning_rate=state.learning_rate, exp_avg=build(m),
                exp_avg_sq=build(v), max_exp_avg_sq=build(v_max) if self.amsgrad else None)
        lr = self.learning_rate(state)
        step = steps_taken(state) + 1
        beta1, beta2 = self.betas
        step_size = lr / (1 - beta1 ** step)
        correction2_sqrt = torch.sqrt(1 - beta2 ** step)

        def one(p, g, m, v, v_max):
            if self.maximize:
                g = -g
            if self.weight_decay and self.decoupled:
                p = p * (1 - lr * self.weight_decay)
            elif self.weight_decay:
                g = g + p * self.weight_decay
            m = torch.lerp(m, g, 1 - beta1)
            v = torch.addcmul(v * beta2, g, g, value=1 - beta2)
            if self.amsgrad:
                v_max = torch.maximum(v_max, v)
            denom = torch.sqrt(v_max if self.amsgrad else v) / correction2_sqrt + self.eps
            return p - step_size * (m / denom), m, v, v_max

        new_params, m, v, v_max = _leafwise(one, params, grads, state.exp_avg, state.exp_avg_sq,
                                            state.max_exp_avg_sq)
        return new_params, AdamState(step=state.step + 1, learning_rate=state.learning_rate,
                                     exp_avg=m, exp_avg_sq=v,
                                     max_exp_avg_sq=v_max if self.amsgrad else None)


@pytree_dataclass
class RMSpropState:
    step: Tensor
    learning_rate: Tensor
    square_avg: object
    grad_avg: object  # with centered, else None
    momentum_buffer: object  # with momentum, else None


@dataclasses.dataclass(frozen=True)
class RMSprop(Optimizer):
    """``torch.optim.RMSprop``: s ← α·s + (1 - α)·g²; centered subtracts the squared running
    mean of g; d = sqrt(s) + ε; p -= lr·g/d, or through a momentum buffer b ← μ·b + g/d."""

    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False
    maximize: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check_flags(self, "centered", "maximize")
        _check_range("alpha", self.alpha, 0.0, 1.0, high_open=False)
        _check_range("eps", self.eps, 0.0, low_open=True)
        _check_range("weight_decay", self.weight_decay, 0.0)
        _check_range("momentum", self.momentum, 0.0)

    state_type = RMSpropState

    def init(self, params) -> RMSpropState:
        return RMSpropState(square_avg=_zeros_like(params),
                            grad_avg=_zeros_like(params) if self.centered else None,
                            momentum_buffer=_zeros_like(params) if self.momentum else None,
                            **self._counters(params))

    def buffers(self):
        return {"square_avg": True, "grad_avg": self.centered,
                "momentum_buffer": bool(self.momentum)}

    def unchecked_update(self, params, grads, state: RMSpropState, *, fused: bool = False):
        # no fused kernel: ``fused`` changes nothing
        lr = self.learning_rate(state)

        def one(p, g, s, mean, buffer):
            if self.maximize:
                g = -g
            if self.weight_decay:
                g = g + p * self.weight_decay
            s = torch.addcmul(s * self.alpha, g, g, value=1 - self.alpha)
            if self.centered:
                mean = torch.lerp(mean, g, 1 - self.alpha)
                avg = torch.sqrt(torch.addcmul(s, mean, mean, value=-1))
            else:
                avg = torch.sqrt(s)
            avg = avg + self.eps
            if self.momentum:
                buffer = buffer * self.momentum + g / avg
                return p - lr * buffer, s, mean, buffer
            return p - lr * (g / avg), s, mean, buffer

        new_params, s, mean, buffer = _leafwise(one, params, grads, state.square_avg,
                                                state.grad_avg, state.momentum_buffer)
        return new_params, RMSpropState(
            step=state.step + 1, learning_rate=state.learning_rate, square_avg=s,
            grad_avg=mean if self.centered else None,
            momentum_buffer=buffer if self.momentum else None)


@pytree_dataclass
class AdagradState:
    step: Tensor
    learning_rate: Tensor
    sum: object


@dataclasses.dataclass(frozen=True)
class Adagrad(Optimizer):
    """``torch.optim.Adagrad``: s ← s + g²; p -= lr/(1 + (t - 1)·decay) · g/(sqrt(s) + ε)."""

    lr_decay: float = 0.0
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10
    maximize: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check_flags(self, "maximize")
        _check_range("lr_decay", self.lr_decay, 0.0)
        _check_range("weight_decay", self.weight_decay, 0.0)
        _check_range("initial_accumulator_value", self.initial_accumulator_value, 0.0)
        _check_range("eps", self.eps, 0.0, low_open=True)

    state_type = AdagradState

    def init(self, params) -> AdagradState:
        return AdagradState(sum=_zeros_like(params, self.initial_accumulator_value),
                            **self._counters(params))

    def buffers(self):
        return {"sum": True}

    def unchecked_update(self, params, grads, state: AdagradState, *, fused: bool = False):
        # no fused kernel: ``fused`` changes nothing
        clr = self.learning_rate(state) / (1 + steps_taken(state) * self.lr_decay)

        def one(p, g, s):
            if self.maximize:
                g = -g
            if self.weight_decay:
                g = g + p * self.weight_decay
            s = torch.addcmul(s, g, g)
            return p - clr * (g / (torch.sqrt(s) + self.eps)), s

        new_params, s = _leafwise(one, params, grads, state.sum)
        return new_params, AdagradState(step=state.step + 1, learning_rate=state.learning_rate,
                                        sum=s)


@dataclasses.dataclass(frozen=True)
class ClipByGlobalNorm:
    """Scale all gradients by min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ the norm over all of them
    (``torch.nn.utils.clip_grad_norm_``), then apply ``inner``."""

    inner: Optimizer
    max_norm: float

    def __post_init__(self):
        if not isinstance(self.inner, (Optimizer, ClipByGlobalNorm)):
            raise TypeError(f"clip_by_global_norm wraps an fnmlp optimizer, got {self.inner!r}")
        _check_range("max_norm", self.max_norm, 0.0, low_open=True)

    @property
    def structure(self) -> tuple:
        return (type(self), self.inner.structure, self.max_norm)

    def init(self, params):
        return self.inner.init(params)

    @property
    def state_type(self) -> type[OptimizerState]:
        return self.inner.state_type

    def buffers(self):
        return self.inner.buffers()

    update = Optimizer.update
    check = Optimizer.check

    def unchecked_update(self, params, grads, state, *, fused: bool = False):
        """``Optimizer.unchecked_update``: the gradients clipped, then ``inner``'s update
        (``fused`` passed on)."""
        leaves = pytree.tree_leaves(grads)
        norms = torch.stack([torch.linalg.vector_norm(g) for g in leaves])
        total = torch.linalg.vector_norm(norms)
        scale = torch.clamp(self.max_norm / (total + 1e-6), max=1.0)
        return self.inner.unchecked_update(params, pytree.tree_map(lambda g: g * scale, grads),
                                           state, fused=fused)

    def with_learning_rate(self, state, lr):
        return self.inner.with_learning_rate(state, lr)

    def learning_rate(self, state) -> Tensor:
        return self.inner.learning_rate(state)

    @property
    def schedule(self):
        return self.inner.schedule


_registry.add(ClipByGlobalNorm, "optimizer")  # a wrapper, no Optimizer subclass


def _pair(values):
    return tuple(values) if isinstance(values, (list, tuple)) else values


def _number(value, name: str) -> float:
    """A float from a number or a 0-d tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must hold numbers or 0-d tensors, got {value!r}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must hold numbers, got {value!r}")
    return float(value)


def _check_flags(optimizer, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(optimizer, name), bool):
            raise TypeError(f"{name} must be True or False, got {getattr(optimizer, name)!r}")


def sgd(lr=1e-3, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
        nesterov: bool = False, *, maximize: bool = False) -> SGD:
    """Stochastic gradient descent, as ``torch.optim.SGD``.

    Arguments:
        lr: the learning rate (a positive float, a 0-d tensor or a schedule).
        momentum: μ >= 0; 0 for plain SGD.
        dampening: τ in [0, 1], the momentum buffer's damping.
        weight_decay: L2 penalty, added to the gradient as wd·p.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        maximize: ascend the objective instead (every optimizer has this option).

    ``update(params, grads, state)`` takes pytrees of tensors of one structure (any shapes).
    """
    return SGD(lr, momentum, dampening, weight_decay, nesterov, maximize)


def adam(lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
         amsgrad: bool = False, *, maximize: bool = False,
         decoupled_weight_decay: bool = False) -> Adam:
    """Adam, as ``torch.optim.Adam``.

    Arguments:
        lr: the learning rate (a positive float, a 0-d tensor or a schedule).
        betas: (β1, β2) in [0, 1), the decay rates of the running averages of g and g²
            (numbers or 0-d tensors).
        eps: > 0, added to the denominator.
        weight_decay: L2 penalty added to the gradient, or with ``decoupled_weight_decay``
            the decay of AdamW.
        amsgrad: use the running maximum of the second moment.
        maximize: ascend the objective instead.
        decoupled_weight_decay: decay the parameters directly (AdamW), as torch's option.
    """
    return Adam(lr, _pair(betas), eps, weight_decay, amsgrad, decoupled_weight_decay, maximize)


def adamw(lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
          amsgrad: bool = False, *, maximize: bool = False) -> Adam:
    """AdamW, as ``torch.optim.AdamW``: Adam with decoupled weight decay (p scaled by
    1 - lr·wd before the update).

    Arguments:
        lr, betas, eps, amsgrad, maximize: as ``adam``.
        weight_decay: the decoupled decay rate wd >= 0.
    """
    return Adam(lr, _pair(betas), eps, weight_decay, amsgrad, True, maximize)


def rmsprop(lr=1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
            momentum: float = 0.0, centered: bool = False, *, maximize: bool = False
            ) -> RMSprop:
    """RMSprop, as ``torch.optim.RMSprop``.

    Arguments:
        lr: the learning rate (a positive float, a 0-d tensor or a schedule).
        alpha: in [0, 1], the decay of the running average of g².
        eps: > 0, added to the denominator.
        weight_decay: L2 penalty added to the gradient.
        momentum: >= 0, a momentum buffer over the scaled gradients.
        centered: normalize by the variance estimate (subtract the running mean of g, squared).
        maximize: ascend the objective instead.
    """
    return RMSprop(lr, alpha, eps, weight_decay, momentum, centered, maximize)


def adagrad(lr=1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
            initial_accumulator_value: float = 0.0, eps: float = 1e-10, *,
            maximize: bool = False) -> Adagrad:
    """Adagrad, as ``torch.optim.Adagrad``.

    Arguments:
        lr: the learning rate (a positive float, a 0-d tensor or a schedule).
        lr_decay: >= 0; the rate is lr/(1 + (t - 1)·lr_decay) at step t.
        weight_decay: L2 penalty added to the gradient.
        initial_accumulator_value: >= 0, where the sum of g² starts.
        eps: > 0, added to the denominator.
        maximize: ascend the objective instead.
    """
    return Adagrad(lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize)


def clip_by_global_norm(optimizer, max_norm: float) -> ClipByGlobalNorm:
    """``optimizer`` applied to gradients clipped to global norm ``max_norm``
    (``nn.utils.clip_grad_norm_``).

    Arguments:
        optimizer: any fnmlp optimizer, clipped ones included.
        max_norm: > 0; the gradients are scaled by min(1, max_norm/(‖g‖ + 1e-6)), ‖g‖ the
            2-norm over all of them.
    """
    return ClipByGlobalNorm(optimizer, max_norm)
