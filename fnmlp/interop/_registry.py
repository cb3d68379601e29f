"""The two-way registry between fnmlp and ``torch``: every primitive with its ``nn`` module,
every loss with its ``nn`` loss, every optimizer with its ``torch.optim`` class and every
schedule with its ``lr_scheduler``. ``to_torch``, ``from_torch`` and ``TorchTwin`` read only
these rules. A primitive's twin lives in the one registry of classes (``fnmlp._registry``):
an activation names its module on its class (``torch_module``), the other built-ins' twins are
set here, and a user's class is registered, twin included, by one call of ``register``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from fnmlp import _registry
from fnmlp._registry import Twin
from fnmlp.nn import (L1, MSE, BatchNorm, BatchNormState, BinaryCrossEntropyWithLogits,
                      CrossEntropy, Dropout, Huber, LayerNorm, Linear, LinearParams, LogSoftmax,
                      Loss, NormParams, PoissonNLL, Primitive, SmoothL1, Softmax, keep_mask,
                      new_names)
from fnmlp.optim import SGD, Adagrad, Adam, ClipByGlobalNorm, Optimizer, RMSprop
from fnmlp.optim import schedules as sched

# --- registering a class of one's own ----------------------------------------------------------

_KINDS = ((Primitive, "primitive"), (Loss, "loss"), (Optimizer, "optimizer"),
          (sched.Schedule, "schedule"))


def register(cls: type | None = None, /, *, name: str | None = None,
             torch_module: type[nn.Module] | tuple[type[nn.Module], ...] | None = None,
             to_torch: Callable[..., nn.Module] | None = None,
             from_torch: Callable[[nn.Module], Any] | None = None,
             in_width: Callable[[nn.Module], int | None] | None = None):
    """Register a class of your own, once: ``fnmlp.save``/``fnmlp.load`` then carry it (its
    registered name and its dataclass fields), and a primitive or loss given ``torch_module``
    converts to and from ``torch.nn`` (``to_torch``, ``from_torch``, ``TorchTwin``,
    ``loss_to_torch``, ``loss_from_torch``). Returns ``cls``; without ``cls``, a class
    decorator (put it above ``@dataclasses.dataclass(frozen=True)``).

        fnmlp.register(Scale, torch_module=TorchScale,
                       to_torch=lambda layer, params, state, n_in: TorchScale(params.scale),
                       from_torch=lambda module: (Scale(), ScaleParams(module.scale), ()))

    Loading rebuilds only registered classes, by name: a class of your own (defined anywhere,
    ``__main__`` included) is registered again in the process that loads, before
    ``fnmlp.load``; nothing is imported from what a file names.

    Arguments:
        cls: a frozen dataclass subclassing ``fnmlp.Primitive``, ``fnmlp.nn.Loss``,
            ``fnmlp.optim.Optimizer`` or ``fnmlp.optim.schedules.Schedule``; its fields hold
            numbers, strings, booleans, None, tuples of them and registered specs; a
            primitive's params and state trees hold tensors, tuples, lists and
            ``fnmlp.pytree_dataclass`` instances.
        name: the stable name checkpoints store (default: the class name; must be free).
        torch_module: the ``nn.Module`` class of a primitive's twin or of a loss's
            ``torch.nn`` loss, or a tuple of them (``to_torch`` makes the first, ``from_torch``
            recognizes all).
        to_torch: a primitive's ``(primitive, params, state, n_in) -> module`` holding copies
            (default ``torch_module(**options)``, the primitive's fields by name); a loss's
            ``(loss, reduction, dtype, device) -> module`` (default ``torch_module(reduction=
            reduction, **options)``, the loss's other fields by name).
        from_torch: a primitive's ``(module) -> (primitive, params, state)``, copies (default:
            the primitive from the module's attributes of its fields' names, no params or
            state); a loss's ``(module) -> loss`` (default: likewise, ``reduction`` included).
        in_width: a primitive's ``(module) -> int | None``, the input width the module fixes.

    Raises ``ValueError`` for a class registered already, or a name, activation name or module
    class another class holds; ``TypeError`` for a class that cannot be registered.
    """
    twin_args = (torch_module, to_torch, from_torch, in_width)

    def decorate(cls: type) -> type:
        kind = _kind(cls)
        twin = None
        if any(arg is not None for arg in twin_args):
            twin = _twin_of(kind, cls, *twin_args)
        new_names(cls)  # an activation's names must be free
        return _registry.add(cls, kind, name=name, twin=twin)

    return decorate if cls is None else decorate(cls)


def _kind(cls) -> str:
    if not isinstance(cls, type):
        raise TypeError(f"register takes a class, got {cls!r}")
    kind = next((kind for base, kind in _KINDS if issubclass(cls, base)), None)
    if kind is None:
        raise TypeError(f"{cls.__name__} cannot be registered: it must subclass fnmlp.Primitive,"
                        " fnmlp.nn.Loss, fnmlp.optim.Optimizer or fnmlp.optim.schedules.Schedule")
    params = cls.__dict__.get("__dataclass_params__")  # this class's own, not a base's
    if params is None or not params.frozen:
        raise TypeError(f"{cls.__name__} must be a frozen dataclass (a hashable spec): decorate "
                        "it with @dataclasses.dataclass(frozen=True), below @fnmlp.register")
    return kind


def _twin_of(kind: str, cls: type, torch_module, to_torch, from_torch, in_width):
    """The twin ``register`` was given for ``cls``, a primitive's or a loss's."""
    if kind not in ("primitive", "loss"):
        raise TypeError(f"{cls.__name__}: torch_module, to_torch, from_torch and in_width "
                        "describe a primitive's nn.Module twin or a loss's torch.nn loss; "
                        f"a{'n' if kind[0] == 'o' else ''} {kind} has none of its own")
    modules = _module_classes(cls, torch_module)
    for function, role in ((to_torch, "to_torch"), (from_torch, "from_torch"),
                           (in_width, "in_width")):
        if function is not None and not callable(function):
            raise TypeError(f"{cls.__name__}: {role} must be callable, got {function!r}")
    if kind == "loss":
        if in_width is not None:
            raise TypeError(f"{cls.__name__}: in_width is a primitive's (a loss fixes no width)")
        return CustomLossTwin(modules, to_torch or _default_loss_to_torch(cls, modules[0]),
                              from_torch or _default_loss_from_torch(cls))
    default = _registry.options_twin(cls, modules[0])
    return Twin(modules, to_torch or default.to_torch, from_torch or default.from_torch,
                in_width or _registry.no_width)


def _module_classes(cls: type, torch_module) -> tuple[type, ...]:
    modules = torch_module if isinstance(torch_module, tuple) else (torch_module,)
    if not modules or not all(isinstance(m, type) and issubclass(m, nn.Module)
                              for m in modules):
        raise TypeError(f"{cls.__name__}: torch_module must be an nn.Module class (or a tuple of "
                        f"them), got {torch_module!r}; a function making the module goes in "
                        "to_torch=...")
    return modules


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


def rule_for_primitive(primitive: Primitive) -> Twin:
    """The twin registered for exactly ``type(primitive)``."""
    entry = _registry.entry(type(primitive))
    if entry is None or entry.twin is None:
        name = type(primitive).__name__
        raise TypeError(f"{name} has no torch.nn counterpart registered; give it one when "
                        f"registering it: fnmlp.register({name}, torch_module=..., "
                        "to_torch=..., from_torch=...)")
    return entry.twin


def module_for(primitive: Primitive, params, state, n_in: int,
               shared_dropout: bool = False) -> nn.Module:
    """The ``nn`` module twin of one primitive, holding copies of ``params`` and ``state``;
    with ``shared_dropout``, ``Dropout``'s is a ``SharedMaskDropout``."""
    if shared_dropout and type(primitive) is Dropout:
        return SharedMaskDropout(primitive.p, primitive.stream or 0)
    return rule_for_primitive(primitive).to_torch(primitive, params, state, n_in)


def rule_for_module(module: nn.Module) -> Twin | None:
    """The twin whose module classes include ``module``'s (or a base class of it), or None."""
    by_module = _by_module(_registry.generation())
    return next((by_module[cls] for cls in type(module).__mro__ if cls in by_module), None)


@functools.lru_cache(maxsize=1)
def _by_module(generation: int) -> dict[type, Twin]:
    return {module: entry.twin for entry in _registry.entries("primitive")
            if entry.twin is not None for module in entry.twin.modules}


def supported_modules() -> list[str]:
    """The ``torch.nn`` modules ``from_torch`` converts, those fixing a width first."""
    by_module = _by_module(_registry.generation())
    return [f"nn.{cls.__name__}" for cls in sorted(
        by_module, key=lambda cls: by_module[cls].in_width is _registry.no_width)
        if cls.__module__.startswith("torch")]


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone()


def _copied(module: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
    with torch.no_grad():
        for name, value in values.items():
            getattr(module, name).copy_(value)
    return module


def _factory(tensor: torch.Tensor) -> dict:
    return {"dtype": tensor.dtype, "device": tensor.device}


def _linear_to_torch(primitive: Linear, params: LinearParams, state, n_in):
    linear = nn.utils.skip_init(nn.Linear, n_in, primitive.units,  # no RNG draw
                                **_factory(params.weight))
    return _copied(linear, {"weight": params.weight, "bias": params.bias})


def _linear_from_torch(module: nn.Linear):
    if module.bias is None:
        raise ValueError("nn.Linear without bias is not supported: fnmlp's Linear has a bias")
    return Linear(module.out_features), LinearParams(_copy(module.weight), _copy(module.bias)), ()


def _layer_norm_to_torch(primitive: LayerNorm, params: NormParams, state, n_in):
    norm = nn.LayerNorm(n_in, eps=primitive.eps, **_factory(params.weight))
    return _copied(norm, {"weight": params.weight, "bias": params.bias})


def _layer_norm_from_torch(module: nn.LayerNorm):
    if len(module.normalized_shape) != 1 or module.weight is None or module.bias is None:
        raise ValueError(f"nn.LayerNorm{tuple(module.normalized_shape)} must normalize one "
                         "dimension with elementwise_affine=True and bias=True")
    return (LayerNorm(module.eps), NormParams(_copy(module.weight), _copy(module.bias)), ())


def _batch_norm_to_torch(primitive: BatchNorm, params, state, n_in):
    tensors = ([params.weight] if primitive.affine else []) + \
        ([state.running_mean] if primitive.track_running_stats else [])
    norm = nn.BatchNorm1d(n_in, eps=primitive.eps, momentum=primitive.momentum,
                          affine=primitive.affine,
                          track_running_stats=primitive.track_running_stats,
                          **(_factory(tensors[0]) if tensors else {}))
    values: dict[str, torch.Tensor] = {}
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
    weight, bias = module.weight, module.bias
    params = NormParams(_copy(weight), _copy(bias)) if weight is not None and bias is not None \
        else ()
    mean, var, count = module.running_mean, module.running_var, module.num_batches_tracked
    state: BatchNormState | tuple[()] = ()
    if mean is not None and var is not None and count is not None:  # track_running_stats
        state = BatchNormState(_copy(mean), _copy(var), _copy(count))
    return primitive, params, state


def _row_wise(primitive: type, module: type) -> Twin:
    """The twin of a row-wise activation: ``module(dim=1)``; ``dim=-1`` or None are rows too."""

    def from_torch(instance):
        if instance.dim not in (1, -1, None):
            name = module.__name__
            raise ValueError(f"nn.{name}(dim={instance.dim}) is not supported: fnmlp's is "
                             f"row-wise, use nn.{name}(dim=1)")
        return primitive(), (), ()

    return Twin((module,), lambda a, params, state, n_in: module(dim=1), from_torch)


_registry.set_twin(Linear, Twin((nn.Linear,), _linear_to_torch, _linear_from_torch,
                                lambda module: module.in_features))
_registry.set_twin(LayerNorm, Twin((nn.LayerNorm,), _layer_norm_to_torch,
                                   _layer_norm_from_torch,
                                   lambda module: module.normalized_shape[-1]))
_registry.set_twin(BatchNorm, Twin((nn.BatchNorm1d,), _batch_norm_to_torch,
                                   _batch_norm_from_torch, lambda module: module.num_features))
_registry.set_twin(Dropout, Twin((nn.Dropout, SharedMaskDropout),
                                 lambda primitive, params, state, n_in: nn.Dropout(primitive.p),
                                 lambda module: (Dropout(module.p), (), ())))
_registry.set_twin(Softmax, _row_wise(Softmax, nn.Softmax))
_registry.set_twin(LogSoftmax, _row_wise(LogSoftmax, nn.LogSoftmax))

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

class LossTwin(NamedTuple):
    """A loss's ``torch.nn`` twin: the module class (``modules[0]``), the options it takes for
    a loss (``to_args(loss, factory)``, ``factory`` the dtype and device of tensor options) and
    the loss options a module gives (``from_args(module)``)."""

    modules: tuple[type, ...]
    to_args: Callable[[Any, dict], dict]  # (the loss, its options) -> the module's
    from_args: Callable[[Any], dict]


def _no_options(*args) -> dict:
    return {}


class CustomLossTwin(NamedTuple):
    """A registered loss's ``torch.nn`` twin (``fnmlp.register``): the module classes,
    ``to_torch(loss, reduction, dtype, device) -> module`` and ``from_torch(module) -> loss``."""

    modules: tuple[type, ...]
    to_torch: Callable[[Loss, str, Any, Any], nn.Module]
    from_torch: Callable[[nn.Module], Loss]


def _loss_options(cls: type) -> list[str]:
    """A loss's dataclass fields other than ``reduction``."""
    return [f.name for f in dataclasses.fields(cls) if f.name != "reduction"]


def _default_loss_to_torch(cls: type, module: type):
    def to_torch(loss, reduction, dtype, device):
        return module(reduction=reduction, **{n: getattr(loss, n) for n in _loss_options(cls)})

    return to_torch


def _default_loss_from_torch(cls: type):
    def from_torch(module):
        return cls(module.reduction, **{n: getattr(module, n) for n in _loss_options(cls)})

    return from_torch


for _loss, _twin_rule in [
    (MSE, LossTwin((nn.MSELoss,), _no_options, _no_options)),
    (L1, LossTwin((nn.L1Loss,), _no_options, _no_options)),
    (Huber, LossTwin((nn.HuberLoss,), lambda loss, factory: {"delta": loss.delta},
                     lambda module: {"delta": module.delta})),
    (SmoothL1, LossTwin((nn.SmoothL1Loss,), lambda loss, factory: {"beta": loss.beta},
                        lambda module: {"beta": module.beta})),
    (PoissonNLL, LossTwin((nn.PoissonNLLLoss,),
                          lambda loss, factory: {"log_input": True, "full": False},
                          _poisson_options)),
    (CrossEntropy, LossTwin(
        (nn.CrossEntropyLoss,),
        lambda loss, factory: {
            "label_smoothing": loss.label_smoothing,
            "weight": _tensor_option(loss.weight, factory),
            "ignore_index": (_TORCH_IGNORE_INDEX if loss.ignore_index is None
                             else loss.ignore_index)},
        lambda module: {
            "label_smoothing": module.label_smoothing,
            "weight": _tuple_option(module, "weight"),
            "ignore_index": (None if module.ignore_index == _TORCH_IGNORE_INDEX
                             else module.ignore_index)})),
    (BinaryCrossEntropyWithLogits, LossTwin(
        (nn.BCEWithLogitsLoss,),
        lambda loss, factory: {"weight": _tensor_option(loss.weight, factory),
                               "pos_weight": _tensor_option(loss.pos_weight, factory)},
        lambda module: {"weight": _tuple_option(module, "weight"),
                        "pos_weight": _tuple_option(module, "pos_weight")})),
]:
    _registry.set_twin(_loss, _twin_rule)
del _loss, _twin_rule


def _twins(kind: str) -> dict[type, Any]:
    """Every registered class of ``kind`` that has a torch twin -> its twin."""
    return _twins_at(kind, _registry.generation())


@functools.lru_cache(maxsize=8)
def _twins_at(kind: str, generation: int) -> dict[type, Any]:
    return {entry.cls: entry.twin for entry in _registry.entries(kind) if entry.twin is not None}


def loss_to_torch(loss: Loss, reduction: str | None = None, *, dtype=None,
                  device=None) -> nn.Module:
    """The ``torch.nn`` loss computing ``loss`` (with another ``reduction`` if given); class
    or column weights become tensors of ``dtype`` on ``device``."""
    twin = _twins("loss").get(type(loss))
    if twin is None:
        raise TypeError(f"{type(loss).__name__} has no torch.nn counterpart registered")
    if isinstance(twin, CustomLossTwin):
        return twin.to_torch(loss, reduction or loss.reduction, dtype or torch.float32, device)
    module, to_args = twin.modules[0], twin.to_args
    if reduction is None and loss.reduction == "none" and type(loss) in _PER_ELEMENT:
        raise ValueError(f"{loss!r}: fnmlp's 'none' gives per-row losses, torch's per-element "
                         "ones; pass reduction='none' explicitly for torch's")
    factory = {"dtype": dtype or torch.float32, "device": device}
    return module(reduction=reduction or loss.reduction, **to_args(loss, factory))


def loss_from_torch(module: nn.Module) -> Loss:
    """The fnmlp loss computing the ``torch.nn`` loss ``module``."""
    twins = _twins("loss")
    for loss_type, twin in twins.items():
        if type(module) in twin.modules:
            if isinstance(twin, CustomLossTwin):
                return _checked_loss(loss_type, twin.from_torch(module))
            if module.reduction == "none" and loss_type in _PER_ELEMENT:
                raise ValueError(f"nn.{type(module).__name__}(reduction='none') gives "
                                 "per-element losses; fnmlp's 'none' is per row")
            return loss_type(module.reduction, **twin.from_args(module))
    raise TypeError(f"nn.{type(module).__name__} has no fnmlp counterpart; supported: "
                    + ", ".join(f"nn.{twin.modules[0].__name__}" for twin in twins.values()))


def _checked_loss(loss_type: type, loss) -> Loss:
    if type(loss) is not loss_type or not isinstance(loss, Loss):
        raise TypeError(f"the from_torch registered for {loss_type.__name__} returned "
                        f"{loss!r}, not a {loss_type.__name__}")
    return loss


# --- optimizers and schedules ⇄ torch.optim ---------------------------------------------------


class TorchOptimizer(NamedTuple):
    """What an fnmlp optimizer is in ``torch``: the optimizer, its ``lr_scheduler`` (stepped
    after every optimizer step) or None, and the global-norm clippings applied, in order, to
    the gradients before each step (``nn.utils.clip_grad_norm_``)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    clip_norms: tuple[float, ...]


class OptimizerTwin(NamedTuple):
    """An optimizer's ``torch.optim`` twin: the classes it converts to and from
    (``modules``), the options of the same name and meaning on both sides (``fields``), the
    class an optimizer becomes (``torch_class(optimizer)``) and the optimizer a torch one
    becomes (``build(torch_class, lr, options, param_group)``)."""

    modules: tuple[type, ...]
    fields: tuple[str, ...]
    torch_class: Callable[[Any], type]
    build: Callable[[type, float, dict, dict], Optimizer]


def _plain_optimizer(cls: type, torch_class: type, fields: tuple[str, ...]) -> OptimizerTwin:
    return OptimizerTwin((torch_class,), fields, lambda optimizer: torch_class,
                         lambda torch_class, lr, options, group: cls(lr, **options))


_ADAM_FIELDS = ("betas", "eps", "weight_decay", "amsgrad", "maximize")
_registry.set_twin(SGD, _plain_optimizer(SGD, torch.optim.SGD, (
    "momentum", "dampening", "weight_decay", "nesterov", "maximize")))
_registry.set_twin(Adam, OptimizerTwin(
    (torch.optim.Adam, torch.optim.AdamW), _ADAM_FIELDS,
    lambda optimizer: torch.optim.AdamW if optimizer.decoupled else torch.optim.Adam,
    lambda torch_class, lr, options, group: Adam(
        lr, **options, decoupled=torch_class is torch.optim.AdamW
        or bool(group.get("decoupled_weight_decay")))))
_registry.set_twin(RMSprop, _plain_optimizer(RMSprop, torch.optim.RMSprop, (
    "alpha", "eps", "weight_decay", "momentum", "centered", "maximize")))
_registry.set_twin(Adagrad, _plain_optimizer(Adagrad, torch.optim.Adagrad, (
    "lr_decay", "weight_decay", "initial_accumulator_value", "eps", "maximize")))


def _optimizer_twin(optimizer: Optimizer) -> OptimizerTwin:
    twin = _twins("optimizer").get(type(optimizer))
    if twin is None:
        raise TypeError(f"{type(optimizer).__name__} has no torch.optim counterpart "
                        "registered")
    return twin


class ScheduleTwin(NamedTuple):
    """A schedule's ``torch.optim.lr_scheduler`` twin: the scheduler class (``modules[0]``),
    its options for a schedule (``to_args(schedule)``) and the schedule a scheduler becomes
    (``from_scheduler(scheduler, base_lr)``); a composite's ``to_torch(schedule, optimizer)``
    builds its scheduler itself (then ``to_args`` is unused)."""

    modules: tuple[type, ...]
    to_args: Callable[[Any], dict]
    from_scheduler: Callable[[Any, float], sched.Schedule]
    to_torch: Callable[[Any, torch.optim.Optimizer], Any] | None = None


def schedule_to_torch(schedule: sched.Schedule, optimizer: torch.optim.Optimizer):
    """The ``lr_scheduler`` of ``optimizer`` (whose rate is the schedule's base) doing what
    ``schedule`` does, stepped once after every ``optimizer.step()``."""
    rule = _twins("schedule").get(type(schedule))
    if rule is None:
        raise TypeError(f"{type(schedule).__name__} has no torch scheduler registered")
    if rule.to_torch is not None:
        return rule.to_torch(schedule, optimizer)
    return rule.modules[0](optimizer, **rule.to_args(schedule))


def schedule_from_torch(scheduler, base: float) -> sched.Schedule:
    """The fnmlp schedule doing what ``scheduler`` does from the base rate ``base``."""
    rules = _twins("schedule").values()
    rule = next((r for r in rules if type(scheduler) in r.modules), None)
    if rule is None:
        raise TypeError(f"{type(scheduler).__name__} has no fnmlp schedule; supported: "
                        + ", ".join(r.modules[0].__name__ for r in rules))
    return rule.from_scheduler(scheduler, base)


def _sequential_to_torch(schedule: sched.Sequential, optimizer) -> Any:
    """``SequentialLR`` over the parts' schedulers, each from its own base rate (torch's
    parts all start from the optimizer's rate: ``base_lrs`` is set after building)."""
    parts = []
    for part in schedule.parts:
        scheduler = schedule_to_torch(part, optimizer)
        scheduler.base_lrs = [float(part.base)] * len(optimizer.param_groups)
        parts.append(scheduler)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, parts, list(schedule.boundaries))


def _sequential_from_torch(scheduler, base: float) -> sched.Sequential:
    parts = tuple(schedule_from_torch(part, float(getattr(part, "base_lrs", [base])[0]))
                  for part in scheduler._schedulers)
    return sched.sequence(parts, tuple(scheduler._milestones))


class _TorchStepFunction:
    """A ``Lambda`` schedule's function as ``LambdaLR``'s ``lr_lambda``: torch's int epoch
    given as fnmlp's float64 0-d step, the factor returned as a float."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, epoch: int) -> float:
        return float(self.fn(torch.tensor(float(epoch), dtype=torch.float64)))


def _lambda_from_torch(scheduler, base: float) -> sched.Lambda:
    """``LambdaLR``'s function, unwrapped if fnmlp made it; another is called with fnmlp's
    floating 0-d step in place of torch's int epoch (arithmetic and torch ops take both)."""
    fn = scheduler.lr_lambdas[0]
    return sched.Lambda(base, fn.fn if isinstance(fn, _TorchStepFunction) else fn)


_registry.set_twin(sched.Constant, ScheduleTwin(
    (torch.optim.lr_scheduler.ConstantLR,), lambda s: {"factor": 1.0, "total_iters": 0},
    lambda s, base: _constant_from_torch(s, base)))
_registry.set_twin(sched.StepDecay, ScheduleTwin(
    (torch.optim.lr_scheduler.StepLR,), lambda s: {"step_size": s.step_size, "gamma": s.gamma},
    lambda s, base: sched.StepDecay(base, s.step_size, s.gamma)))
_registry.set_twin(sched.Exponential, ScheduleTwin(
    (torch.optim.lr_scheduler.ExponentialLR,), lambda s: {"gamma": s.gamma},
    lambda s, base: sched.Exponential(base, s.gamma)))
_registry.set_twin(sched.Cosine, ScheduleTwin(
    (torch.optim.lr_scheduler.CosineAnnealingLR,),
    lambda s: {"T_max": s.total_steps, "eta_min": s.eta_min},
    lambda s, base: sched.Cosine(base, s.T_max, s.eta_min)))
_registry.set_twin(sched.LinearWarmup, ScheduleTwin(
    (torch.optim.lr_scheduler.LinearLR,),
    lambda s: {"start_factor": s.start_factor, "end_factor": 1.0,
               "total_iters": s.warmup_steps},
    lambda s, base: _linear_warmup_from_torch(s, base)))
_registry.set_twin(sched.Sequential, ScheduleTwin(
    (torch.optim.lr_scheduler.SequentialLR,), _no_options, _sequential_from_torch,
    _sequential_to_torch))
_registry.set_twin(sched.Lambda, ScheduleTwin(
    (torch.optim.lr_scheduler.LambdaLR,), lambda s: {"lr_lambda": _TorchStepFunction(s.fn)},
    _lambda_from_torch))


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
    twin = _optimizer_twin(optimizer)
    options = {name: getattr(optimizer, name) for name in twin.fields}
    torch_optimizer = twin.torch_class(optimizer)(parameters, lr=lr, **options)
    scheduler = None
    if optimizer.schedule is not None:
        scheduler = schedule_to_torch(optimizer.schedule, torch_optimizer)
    return TorchOptimizer(torch_optimizer, scheduler, tuple(clip_norms))


def optimizer_from_torch(optimizer: torch.optim.Optimizer, scheduler=None,
                         clip_norms: tuple[float, ...] = ()):
    """The fnmlp optimizer doing what ``optimizer`` (with ``scheduler`` stepped after every
    step and the global-norm ``clip_norms`` applied in order first) does."""
    twins = _twins("optimizer").values()
    rule = next((twin for twin in twins if type(optimizer) in twin.modules), None)
    if rule is None:
        raise TypeError(f"{type(optimizer).__name__} has no fnmlp counterpart; supported: "
                        + ", ".join(cls.__name__ for twin in twins for cls in twin.modules))
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
        lr = schedule_from_torch(scheduler, lr)
    result = rule.build(type(optimizer), lr, options, group)
    for max_norm in reversed(tuple(clip_norms)):
        result = ClipByGlobalNorm(result, float(max_norm))
    return result


__all__ = ["register", "SharedMaskDropout", "rule_for_primitive", "rule_for_module",
           "module_for", "supported_modules", "loss_to_torch", "loss_from_torch",
           "TorchOptimizer", "optimizer_to_torch", "optimizer_from_torch", "LossTwin",
           "OptimizerTwin", "ScheduleTwin", "CustomLossTwin", "schedule_to_torch",
           "schedule_from_torch"]
