"""The two-way registry between fnmlp and ``torch``: every primitive with its ``nn`` module,
every loss with its ``nn`` loss, every optimizer with its ``torch.optim`` class and every
schedule with its ``lr_scheduler``. ``to_torch``, ``from_torch`` and ``TorchTwin`` read only
these tables; the core classes know nothing of them. Adding a primitive means one entry here.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from fnmlp.nn import _activations as act
from fnmlp.nn._dropout import Dropout, keep_mask
from fnmlp.nn._linear import Linear, LinearParams
from fnmlp.nn._losses import (L1, MSE, BinaryCrossEntropyWithLogits, CrossEntropy, Huber, Loss,
                              PoissonNLL, SmoothL1)
from fnmlp.nn._norm import BatchNorm, BatchNormState, LayerNorm, NormParams
from fnmlp.nn._primitive import Primitive
from fnmlp.optim import schedules as sched
from fnmlp.optim._optimizers import SGD, Adagrad, Adam, ClipByGlobalNorm, Optimizer, RMSprop

# --- primitives ⇄ nn modules ------------------------------------------------------------------


class SharedMaskDropout(nn.Module):
    """The twin's dropout drawing its masks from fnmlp's source: ``fnmlp.dropout_key`` keys and
    the primitive's stream, so that a twin and fnmlp drop the same units. Set ``key`` before
    each training forward (``set_dropout_key``); in eval mode, or with no key, it is the
    identity."""

    def __init__(self, p: float, stream: int):
        super().__init__()
        self.p, self.stream, self.key = p, stream, None

    def forward(self, a):
        if not self.training or self.key is None:
            return a
        return a * (keep_mask(self.key.to(a.device), self.stream, tuple(a.shape), self.p,
                              a.dtype) * (1 / (1 - self.p)))

    def extra_repr(self):
        return f"p={self.p}, stream={self.stream}"


class ModuleRule(NamedTuple):
    """How one primitive type and its ``nn`` module types convert.

    ``to_torch(primitive, params, state, n_in, factory, shared_dropout) -> nn.Module`` (holding
    copies); ``from_torch(module) -> (primitive, params, state)`` (copies); ``in_width(module)``
    the input width the module fixes, or None."""

    primitive: type
    modules: tuple[type, ...]
    to_torch: Callable[..., nn.Module]
    from_torch: Callable[[nn.Module], tuple[Primitive, Any, Any]]
    in_width: Callable[[nn.Module], int | None] = lambda module: None


_BY_PRIMITIVE: dict[type, ModuleRule] = {}
_BY_MODULE: dict[type, ModuleRule] = {}


def register_module(rule: ModuleRule) -> None:
    """Add a primitive ⇄ module conversion (the first module type is what ``to_torch`` makes)."""
    _BY_PRIMITIVE[rule.primitive] = rule
    for module in rule.modules:
        _BY_MODULE[module] = rule


def rule_for_primitive(primitive: Primitive) -> ModuleRule:
    for cls in type(primitive).__mro__:
        if cls in _BY_PRIMITIVE:
            return _BY_PRIMITIVE[cls]
    raise TypeError(f"{type(primitive).__name__} has no torch.nn counterpart registered")


def rule_for_module(module: nn.Module) -> ModuleRule | None:
    for cls in type(module).__mro__:
        if cls in _BY_MODULE:
            return _BY_MODULE[cls]
    return None


def supported_modules() -> list[str]:
    return [f"nn.{cls.__name__}" for cls in _BY_MODULE if cls.__module__.startswith("torch")]


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone()


def _copied(module: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
    with torch.no_grad():
        for name, value in values.items():
            getattr(module, name).copy_(value)
    return module


def _linear_to_torch(primitive: Linear, params: LinearParams, state, n_in, factory, shared):
    linear = nn.utils.skip_init(nn.Linear, n_in, primitive.units, **factory)  # no RNG draw
    return _copied(linear, {"weight": params.weight, "bias": params.bias})


def _linear_from_torch(module: nn.Linear):
    if module.bias is None:
        raise ValueError("nn.Linear without bias is not supported: fnmlp's Linear has a bias")
    return Linear(module.out_features), LinearParams(_copy(module.weight), _copy(module.bias)), ()


def _layer_norm_to_torch(primitive: LayerNorm, params: NormParams, state, n_in, factory, shared):
    norm = nn.LayerNorm(n_in, eps=primitive.eps, **factory)
    return _copied(norm, {"weight": params.weight, "bias": params.bias})


def _layer_norm_from_torch(module: nn.LayerNorm):
    if len(module.normalized_shape) != 1 or module.weight is None or module.bias is None:
        raise ValueError(f"nn.LayerNorm{tuple(module.normalized_shape)} must normalize one "
                         "dimension with elementwise_affine=True and bias=True")
    return (LayerNorm(module.eps), NormParams(_copy(module.weight), _copy(module.bias)), ())


def _batch_norm_to_torch(primitive: BatchNorm, params, state, n_in, factory, shared):
    norm = nn.BatchNorm1d(n_in, eps=primitive.eps, momentum=primitive.momentum,
                          affine=primitive.affine,
                          track_running_stats=primitive.track_running_stats, **factory)
    values = {}
    if primitive.affine:
        values.update(weight=params.weight, bias=params.bias)
    if primitive.track_running_stats:
        values.update(running_mean=state.running_mean, running_var=state.running_var,
                      num_batches_tracked=state.num_batches_tracked)
    return _copied(norm, values)


def _batch_norm_from_torch(module: nn.BatchNorm1d):
    if module.affine and (module.weight is None or module.bias is None):
        raise ValueError("nn.BatchNorm1d with a scale but no shift (or the reverse) is not "
                         "supported: fnmlp's affine BatchNorm has both")
    primitive = BatchNorm(module.momentum, module.eps, module.affine,
                          module.track_running_stats)
    params = NormParams(_copy(module.weight), _copy(module.bias)) if module.affine else ()
    state = ()
    if module.track_running_stats:
        state = BatchNormState(_copy(module.running_mean), _copy(module.running_var),
                               _copy(module.num_batches_tracked))
    return primitive, params, state


def _dropout_to_torch(primitive: Dropout, params, state, n_in, factory, shared):
    return SharedMaskDropout(primitive.p, primitive.stream or 0) if shared else \
        nn.Dropout(primitive.p)


register_module(ModuleRule(Linear, (nn.Linear,), _linear_to_torch, _linear_from_torch,
                           lambda module: module.in_features))
register_module(ModuleRule(LayerNorm, (nn.LayerNorm,), _layer_norm_to_torch,
                           _layer_norm_from_torch,
                           lambda module: module.normalized_shape[-1]))
register_module(ModuleRule(BatchNorm, (nn.BatchNorm1d,), _batch_norm_to_torch,
                           _batch_norm_from_torch, lambda module: module.num_features))
register_module(ModuleRule(Dropout, (nn.Dropout, SharedMaskDropout), _dropout_to_torch,
                           lambda module: (Dropout(module.p), (), ())))


def _activation(primitive: type, module: type, to_args=lambda a: {}, from_args=lambda m: {}):
    """A rule for a parameterless activation whose options map one to one."""
    register_module(ModuleRule(
        primitive, (module,),
        lambda p, params, state, n_in, factory, shared: module(**to_args(p)),
        lambda m: (primitive(**from_args(m)), (), ())))


def _row_wise(module):
    if module.dim not in (1, -1, None):
        name = type(module).__name__
        raise ValueError(f"nn.{name}(dim={module.dim}) is not supported: fnmlp's is row-wise, "
                         f"use nn.{name}(dim=1)")
    return {}


_activation(act.Identity, nn.Identity)
_activation(act.ReLU, nn.ReLU)
_activation(act.Sigmoid, nn.Sigmoid)
_activation(act.Tanh, nn.Tanh)
_activation(act.SiLU, nn.SiLU)
_activation(act.Softmax, nn.Softmax, lambda a: {"dim": 1}, _row_wise)
_activation(act.LogSoftmax, nn.LogSoftmax, lambda a: {"dim": 1}, _row_wise)
_activation(act.LeakyReLU, nn.LeakyReLU, lambda a: {"negative_slope": a.negative_slope},
            lambda m: {"negative_slope": m.negative_slope})
_activation(act.ELU, nn.ELU, lambda a: {"alpha": a.alpha}, lambda m: {"alpha": m.alpha})
_activation(act.GELU, nn.GELU, lambda a: {"approximate": a.approximate},
            lambda m: {"approximate": m.approximate})
_activation(act.Softplus, nn.Softplus, lambda a: {"beta": a.beta, "threshold": a.threshold},
            lambda m: {"beta": m.beta, "threshold": m.threshold})

# --- losses ⇄ nn losses -----------------------------------------------------------------------


def _tensor_option(values, factory: dict) -> torch.Tensor | None:
    return None if values is None else torch.tensor(values, **factory)


def _tuple_option(module: nn.Module, name: str) -> tuple[float, ...] | None:
    value = getattr(module, name, None)
    if value is None:
        return None
    if value.dim() != 1:
        raise ValueError(f"nn.{type(module).__name__}({name}=...) must be 1-D (one entry per "
                         f"class or output) to convert, got shape {tuple(value.shape)}")
    return tuple(value.tolist())


def _poisson_options(module: nn.PoissonNLLLoss) -> dict:
    if not module.log_input or module.full:
        raise ValueError("nn.PoissonNLLLoss converts with log_input=True and full=False only "
                         f"(fnmlp.PoissonNLL), got log_input={module.log_input}, "
                         f"full={module.full}")
    return {}


_TORCH_IGNORE_INDEX = -100  # nn.CrossEntropyLoss's default: fnmlp's ignore_index=None
# "none" differs: torch's is per element, fnmlp's per row
_PER_ELEMENT = (MSE, L1, Huber, SmoothL1, PoissonNLL, BinaryCrossEntropyWithLogits)

_LOSSES: dict[type, tuple[type, Callable, Callable]] = {
    MSE: (nn.MSELoss, lambda loss, factory: {}, lambda module: {}),
    L1: (nn.L1Loss, lambda loss, factory: {}, lambda module: {}),
    Huber: (nn.HuberLoss, lambda loss, factory: {"delta": loss.delta},
            lambda module: {"delta": module.delta}),
    SmoothL1: (nn.SmoothL1Loss, lambda loss, factory: {"beta": loss.beta},
               lambda module: {"beta": module.beta}),
    PoissonNLL: (nn.PoissonNLLLoss, lambda loss, factory: {"log_input": True, "full": False},
                 _poisson_options),
    CrossEntropy: (
        nn.CrossEntropyLoss,
        lambda loss, factory: {
            "label_smoothing": loss.label_smoothing,
            "weight": _tensor_option(loss.weight, factory),
            "ignore_index": (_TORCH_IGNORE_INDEX if loss.ignore_index is None
                             else loss.ignore_index)},
        lambda module: {
            "label_smoothing": module.label_smoothing,
            "weight": _tuple_option(module, "weight"),
            "ignore_index": (None if module.ignore_index == _TORCH_IGNORE_INDEX
                             else module.ignore_index)}),
    BinaryCrossEntropyWithLogits: (
        nn.BCEWithLogitsLoss,
        lambda loss, factory: {"weight": _tensor_option(loss.weight, factory),
                               "pos_weight": _tensor_option(loss.pos_weight, factory)},
        lambda module: {"weight": _tuple_option(module, "weight"),
                        "pos_weight": _tuple_option(module, "pos_weight")}),
}


def loss_to_torch(loss: Loss, reduction: str | None = None, *, dtype=None,
                  device=None) -> nn.Module:
    """The ``torch.nn`` loss computing ``loss`` (with another ``reduction`` if given); class
    or column weights become tensors of ``dtype`` on ``device``."""
    module, to_args, _ = _LOSSES[type(loss)]
    if reduction is None and loss.reduction == "none" and type(loss) in _PER_ELEMENT:
        raise ValueError(f"{loss!r}: fnmlp's 'none' gives per-row losses, torch's per-element "
                         "ones; pass reduction='none' explicitly for torch's")
    factory = {"dtype": dtype or torch.float32, "device": device}
    return module(reduction=reduction or loss.reduction, **to_args(loss, factory))


def loss_from_torch(module: nn.Module) -> Loss:
    """The fnmlp loss computing the ``torch.nn`` loss ``module``."""
    for loss_type, (module_type, _, from_args) in _LOSSES.items():
        if type(module) is module_type:
            if module.reduction == "none" and loss_type in _PER_ELEMENT:
                raise ValueError(f"nn.{module_type.__name__}(reduction='none') gives "
                                 "per-element losses; fnmlp's 'none' is per row")
            return loss_type(module.reduction, **from_args(module))
    raise TypeError(f"nn.{type(module).__name__} has no fnmlp counterpart; supported: "
                    + ", ".join(f"nn.{m.__name__}" for m, _, _ in _LOSSES.values()))


# --- optimizers and schedules ⇄ torch.optim ---------------------------------------------------


class TorchOptimizer(NamedTuple):
    """What an fnmlp optimizer is in ``torch``: the optimizer, its ``lr_scheduler`` (stepped
    after every optimizer step) or None, and the global-norm clippings applied, in order, to
    the gradients before each step (``nn.utils.clip_grad_norm_``)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    clip_norms: tuple[float, ...]


class _OptimizerRule(NamedTuple):
    torch_class: type
    fields: tuple[str, ...]  # options with the same name and meaning on both sides
    build: Callable[[float, dict, dict], Optimizer]  # (lr, options, the param group)


_OPTIMIZERS: dict[type, _OptimizerRule] = {
    torch.optim.SGD: _OptimizerRule(torch.optim.SGD, ("momentum", "dampening", "weight_decay",
                                                      "nesterov", "maximize"),
                                    lambda lr, options, group: SGD(lr, **options)),
    torch.optim.Adam: _OptimizerRule(
        torch.optim.Adam, ("betas", "eps", "weight_decay", "amsgrad", "maximize"),
        lambda lr, options, group: Adam(lr, **options,
                                        decoupled=bool(group.get("decoupled_weight_decay")))),
    torch.optim.AdamW: _OptimizerRule(
        torch.optim.AdamW, ("betas", "eps", "weight_decay", "amsgrad", "maximize"),
        lambda lr, options, group: Adam(lr, **options, decoupled=True)),
    torch.optim.RMSprop: _OptimizerRule(torch.optim.RMSprop, ("alpha", "eps", "weight_decay",
                                                              "momentum", "centered",
                                                              "maximize"),
                                        lambda lr, options, group: RMSprop(lr, **options)),
    torch.optim.Adagrad: _OptimizerRule(torch.optim.Adagrad, ("lr_decay", "weight_decay",
                                                              "initial_accumulator_value",
                                                              "eps", "maximize"),
                                        lambda lr, options, group: Adagrad(lr, **options)),
}


def _torch_class(optimizer: Optimizer) -> type:
    if isinstance(optimizer, Adam):
        return torch.optim.AdamW if optimizer.decoupled else torch.optim.Adam
    for torch_class, fnmlp_class in ((torch.optim.SGD, SGD), (torch.optim.RMSprop, RMSprop),
                                     (torch.optim.Adagrad, Adagrad)):
        if isinstance(optimizer, fnmlp_class):
            return torch_class
    raise TypeError(f"{type(optimizer).__name__} has no torch.optim counterpart registered")


class _ScheduleRule(NamedTuple):
    scheduler: type
    to_args: Callable[[sched.Schedule], dict]
    from_scheduler: Callable[[Any, float], sched.Schedule]


_SCHEDULES: dict[type, _ScheduleRule] = {
    sched.Constant: _ScheduleRule(
        torch.optim.lr_scheduler.ConstantLR, lambda s: {"factor": 1.0, "total_iters": 0},
        lambda s, base: _constant_from_torch(s, base)),
    sched.StepDecay: _ScheduleRule(
        torch.optim.lr_scheduler.StepLR, lambda s: {"step_size": s.step_size, "gamma": s.gamma},
        lambda s, base: sched.StepDecay(base, s.step_size, s.gamma)),
    sched.Exponential: _ScheduleRule(
        torch.optim.lr_scheduler.ExponentialLR, lambda s: {"gamma": s.gamma},
        lambda s, base: sched.Exponential(base, s.gamma)),
    sched.Cosine: _ScheduleRule(
        torch.optim.lr_scheduler.CosineAnnealingLR,
        lambda s: {"T_max": s.total_steps, "eta_min": s.eta_min},
        lambda s, base: sched.Cosine(base, s.T_max, s.eta_min)),
    sched.LinearWarmup: _ScheduleRule(
        torch.optim.lr_scheduler.LinearLR,
        lambda s: {"start_factor": s.start_factor, "end_factor": 1.0,
                   "total_iters": s.warmup_steps},
        lambda s, base: _linear_warmup_from_torch(s, base)),
}


def _constant_from_torch(scheduler, base: float) -> sched.Constant:
    if scheduler.total_iters == 0:  # the factor applies for ever
        return sched.Constant(base * scheduler.factor)
    if scheduler.factor != 1.0:
        raise ValueError("ConstantLR with factor != 1 for a number of steps has no fnmlp "
                         "counterpart")
    return sched.Constant(base)


def _linear_warmup_from_torch(scheduler, base: float) -> sched.LinearWarmup:
    if scheduler.end_factor != 1.0:
        raise ValueError("LinearLR with end_factor != 1 has no fnmlp counterpart")
    return sched.LinearWarmup(base, scheduler.total_iters, scheduler.start_factor)


def optimizer_to_torch(optimizer, parameters) -> TorchOptimizer:
    """The ``torch.optim`` optimizer over ``parameters`` (an iterable of tensors), its
    scheduler and clippings, together doing what ``optimizer`` does."""
    clip_norms = []
    while isinstance(optimizer, ClipByGlobalNorm):
        clip_norms.append(optimizer.max_norm)
        optimizer = optimizer.inner
    lr = optimizer.base_lr
    lr = float(lr) if isinstance(lr, torch.Tensor) else lr
    torch_class = _torch_class(optimizer)
    options = {name: getattr(optimizer, name) for name in _OPTIMIZERS[torch_class].fields}
    torch_optimizer = torch_class(parameters, lr=lr, **options)
    scheduler = None
    if optimizer.schedule is not None:
        rule = _SCHEDULES[type(optimizer.schedule)]
        scheduler = rule.scheduler(torch_optimizer, **rule.to_args(optimizer.schedule))
    return TorchOptimizer(torch_optimizer, scheduler, tuple(clip_norms))


def optimizer_from_torch(optimizer: torch.optim.Optimizer, scheduler=None,
                         clip_norms: tuple[float, ...] = ()):
    """The fnmlp optimizer doing what ``optimizer`` (with ``scheduler`` stepped after every
    step and the global-norm ``clip_norms`` applied in order first) does."""
    rule = _OPTIMIZERS.get(type(optimizer))
    if rule is None:
        raise TypeError(f"{type(optimizer).__name__} has no fnmlp counterpart; supported: "
                        + ", ".join(cls.__name__ for cls in _OPTIMIZERS))
    if len(optimizer.param_groups) != 1:
        raise ValueError("only optimizers with one parameter group convert to fnmlp, got "
                         f"{len(optimizer.param_groups)}")
    group = optimizer.param_groups[0]
    lr = group["initial_lr"] if scheduler is not None and "initial_lr" in group else group["lr"]
    lr = float(lr)
    options = {name: group[name] for name in rule.fields}
    for name, value in options.items():
        if isinstance(value, torch.Tensor):
            options[name] = float(value)
    if "betas" in options:
        options["betas"] = tuple(float(beta) for beta in options["betas"])
    if scheduler is not None:
        schedule_rule = next((r for r in _SCHEDULES.values() if type(scheduler) is r.scheduler),
                             None)
        if schedule_rule is None:
            raise TypeError(f"{type(scheduler).__name__} has no fnmlp schedule; supported: "
                            + ", ".join(r.scheduler.__name__ for r in _SCHEDULES.values()))
        lr = schedule_rule.from_scheduler(scheduler, lr)
    result = rule.build(lr, options, group)
    for max_norm in reversed(tuple(clip_norms)):
        result = ClipByGlobalNorm(result, float(max_norm))
    return result


__all__ = ["SharedMaskDropout", "ModuleRule", "register_module", "rule_for_primitive",
           "rule_for_module", "supported_modules", "loss_to_torch", "loss_from_torch",
           "TorchOptimizer", "optimizer_to_torch", "optimizer_from_torch"]
