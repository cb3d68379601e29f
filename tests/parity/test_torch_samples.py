"""PyTorch's own test inputs through fnmlp: every OpInfo, ModuleInfo and OptimizerInfo sample of
an op, module or optimizer that fnmlp has, in float64, against autograd and torch.optim.

A sample fnmlp cannot express (another layout, an option it lacks) is skipped with its reason;
every other must agree within 1e-13 (relative, values and gradients; optimizers over 5 free
steps within 1e-12). Run with ``-s`` to see the counts (docs/guide/torch-twin.md has them).
"""

import collections

import pytest
import torch
from torch import nn

import fnmlp
from fnmlp.interop import _registry
from fnmlp.nn._primitive import Context

pytestmark = pytest.mark.slow
common_methods = pytest.importorskip(
    "torch.testing._internal.common_methods_invocations", reason="needs expecttest")
F64 = torch.float64


class Skip(Exception):
    """The sample has no fnmlp counterpart; the message says why."""


def _close(got, expected) -> bool:
    got, expected = got.detach(), expected.detach()
    if got.shape != expected.shape:
        return False
    nan = expected.isnan()
    if not torch.equal(got.isnan(), nan):
        return False
    got, expected = got[~nan], expected[~nan]  # NaN where torch gives NaN (all rows ignored)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    difference = (got - expected).abs().max().item() if expected.numel() else 0.0
    # relative to the values, with an absolute floor of 1e-13: a gradient that is 0 in exact
    # arithmetic (a single-element layer norm) is rounding noise on both sides
    return difference <= 1e-13 * max(scale, 1.0)


def _as_rows(t: torch.Tensor, width_dim: int | None = None) -> torch.Tensor:
    """A 2-D (rows, width) view of ``t``: elementwise ops as one column, others with
    ``width_dim`` last."""
    if t.numel() == 0:
        raise Skip("empty input")
    if width_dim is None:
        return t.reshape(-1, 1)
    return t.movedim(width_dim, -1).reshape(-1, t.shape[width_dim])


def _primitive_vjp(primitive, params, state, x, dy, train=True):
    y, residual, new_state = primitive.forward(params, x, state, Context(train=train))
    dx, dparams = primitive.backward(params, residual, dy)
    return y, dx, dparams, new_state


ACTIVATION_OPS = {
    "nn.functional.relu": lambda s: fnmlp.ReLU(),
    "tanh": lambda s: fnmlp.Tanh(),
    "sigmoid": lambda s: fnmlp.Sigmoid(),
    "nn.functional.silu": lambda s: fnmlp.SiLU(),
    "nn.functional.elu": lambda s: fnmlp.ELU(s.kwargs.get("alpha", 1.0)),
    "nn.functional.leaky_relu": lambda s: fnmlp.LeakyReLU(
        s.args[0] if s.args else s.kwargs.get("negative_slope", 0.01)),
    "nn.functional.gelu": lambda s: fnmlp.GELU(s.kwargs.get("approximate", "none")),
    "nn.functional.softplus": lambda s: fnmlp.Softplus(s.kwargs.get("beta", 1.0),
                                                       s.kwargs.get("threshold", 20.0)),
}
LOSS_OPS = {
    "nn.functional.mse_loss": lambda s: fnmlp.MSE(s.kwargs.get("reduction", "mean")),
    "nn.functional.l1_loss": lambda s: fnmlp.L1(s.kwargs.get("reduction", "mean")),
    "nn.functional.huber_loss": lambda s: fnmlp.Huber(s.kwargs.get("reduction", "mean"),
                                                      s.kwargs.get("delta", 1.0)),
    "nn.functional.smooth_l1_loss": lambda s: fnmlp.SmoothL1(s.kwargs.get("reduction", "mean"),
                                                             s.kwargs.get("beta", 1.0)),
}


def _check_activation(op, sample):
    if set(sample.kwargs) - {"alpha", "negative_slope", "approximate", "beta", "threshold",
                             "inplace"} or sample.kwargs.get("inplace"):
        raise Skip(f"options {sorted(sample.kwargs)}")
    primitive = ACTIVATION_OPS[op.name](sample)
    x = sample.input.detach().clone().requires_grad_(True)
    expected = op.op(x, *sample.args, **sample.kwargs)
    dy = torch.randn_like(expected)
    (expected_dx,) = torch.autograd.grad(expected, x, dy)
    y, dx, _, _ = _primitive_vjp(primitive, (), (), _as_rows(x.detach()), _as_rows(dy))
    return _close(y.reshape(expected.shape), expected) and _close(dx.reshape(x.shape),
                                                                   expected_dx)


def _check_softmax(op, sample):
    if "dtype" in sample.kwargs:
        raise Skip("dtype= casts; fnmlp keeps the parameters' dtype")
    dim = sample.args[0] if sample.args else sample.kwargs["dim"]
    primitive = fnmlp.Softmax() if op.name == "softmax" else fnmlp.LogSoftmax()
    x = sample.input.detach().clone().requires_grad_(True)
    if x.dim() == 0:
        raise Skip("0-d input")
    expected = op.op(x, *sample.args, **sample.kwargs)
    dy = torch.randn_like(expected)
    (expected_dx,) = torch.autograd.grad(expected, x, dy)
    rows = _as_rows(x.detach(), dim)
    y, dx, _, _ = _primitive_vjp(primitive, (), (), rows, _as_rows(dy, dim))
    shape = x.movedim(dim, -1).shape
    return (_close(y.reshape(shape).movedim(-1, dim), expected)
            and _close(dx.reshape(shape).movedim(-1, dim), expected_dx))


def _check_linear(op, sample):
    x, (weight, *rest) = sample.input, sample.args
    bias = rest[0] if rest else sample.kwargs.get("bias")
    if bias is None:
        raise Skip("no bias (fnmlp's Linear has one)")
    if x.dim() == 0 or x.numel() == 0:
        raise Skip("empty input")
    x, weight, bias = (t.detach().clone().requires_grad_(True) for t in (x, weight, bias))
    expected = torch.nn.functional.linear(x, weight, bias)
    dy = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, weight, bias), dy)
    params = fnmlp.nn.LinearParams(weight.detach(), bias.detach())
    y, dx, grads, _ = _primitive_vjp(fnmlp.Linear(weight.shape[0]), params, (),
                                     _as_rows(x.detach(), -1), _as_rows(dy, -1))
    return (_close(y.reshape(expected.shape), expected)
            and _close(dx.reshape(x.shape), expected_grads[0])
            and _close(grads.weight, expected_grads[1]) and _close(grads.bias, expected_grads[2]))


def _check_layer_norm(op, sample):
    shape, *rest = sample.args
    weight = rest[0] if rest else sample.kwargs.get("weight")
    bias = rest[1] if len(rest) > 1 else sample.kwargs.get("bias")
    eps = sample.kwargs.get("eps", 1e-5)
    if len(shape) != 1 or weight is None or bias is None:
        raise Skip("normalizes more than the last dimension, or no affine weight and bias")
    if shape[0] == 1:
        raise Skip("normalizes one element: the output is the shift, the other gradients are "
                   "0 (torch's are rounding noise)")
    if not eps > 0:
        raise Skip("eps <= 0 (fnmlp requires eps > 0)")
    x, weight, bias = (t.detach().clone().requires_grad_(True) for t in
                       (sample.input, weight, bias))
    expected = torch.nn.functional.layer_norm(x, shape, weight, bias, eps)
    dy = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, weight, bias), dy)
    params = fnmlp.nn.NormParams(weight.detach(), bias.detach())
    y, dx, grads, _ = _primitive_vjp(fnmlp.LayerNorm(eps), params, (),
                                     _as_rows(x.detach(), -1), _as_rows(dy, -1))
    return (_close(y.reshape(x.shape), expected) and _close(dx.reshape(x.shape),
                                                             expected_grads[0])
            and _close(grads.weight, expected_grads[1]) and _close(grads.bias, expected_grads[2]))


def _check_batch_norm(op, sample):
    running_mean, running_var, *rest = sample.args
    weight = rest[0] if rest else sample.kwargs.get("weight")
    bias = rest[1] if len(rest) > 1 else sample.kwargs.get("bias")
    training = sample.kwargs.get("training", False)
    momentum, eps = sample.kwargs.get("momentum", 0.1), sample.kwargs.get("eps", 1e-5)
    if (weight is None) != (bias is None):
        raise Skip("only one of weight and bias")
    if (running_mean is None) != (running_var is None):
        raise Skip("only one running statistic")
    if not 0 <= momentum <= 1 or not eps > 0:
        raise Skip("momentum outside [0, 1] or eps <= 0 (fnmlp requires them)")
    if sample.input.dim() < 2 or sample.input.shape[0] * (
            sample.input[0, 0].numel()) < 2 and training:
        raise Skip("fewer than 2 values per channel in training")
    affine, track = weight is not None, running_mean is not None
    if not track and not training:
        raise Skip("evaluation without running statistics")
    x = sample.input.detach().clone().requires_grad_(True)
    leaves = [x] + ([weight.detach().clone().requires_grad_(True),
                     bias.detach().clone().requires_grad_(True)] if affine else [])
    stats = ([running_mean.detach().clone(), running_var.detach().clone()] if track
             else [None, None])
    expected = torch.nn.functional.batch_norm(x, *stats, *(leaves[1:] if affine else [None] * 2),
                                              training=training, momentum=momentum, eps=eps)
    dy = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, leaves, dy)
    primitive = fnmlp.BatchNorm(momentum, eps, affine, track)
    params = fnmlp.nn.NormParams(leaves[1].detach(), leaves[2].detach()) if affine else ()
    state = (fnmlp.nn.BatchNormState(running_mean.detach().clone(), running_var.detach().clone(),
                                  torch.tensor(0)) if track else ())
    y, dx, grads, new_state = _primitive_vjp(primitive, params, state, _as_rows(x.detach(), 1),
                                             _as_rows(dy, 1), train=training)
    shape = x.movedim(1, -1).shape
    ok = _close(y.reshape(shape).movedim(-1, 1), expected)
    ok = ok and _close(dx.reshape(shape).movedim(-1, 1), expected_grads[0])
    if affine:
        ok = ok and _close(grads.weight, expected_grads[1]) and _close(grads.bias,
                                                                       expected_grads[2])
    if track and training:
        ok = ok and _close(new_state.running_mean, stats[0]) and _close(new_state.running_var,
                                                                        stats[1])
    return ok


def _check_elementwise_loss(op, sample):
    target = sample.args[0] if sample.args else sample.kwargs["target"]
    if target.shape != sample.input.shape:
        raise Skip("broadcast target")
    if set(sample.kwargs) - {"reduction", "delta", "beta"}:
        raise Skip(f"options {sorted(sample.kwargs)}")
    loss = LOSS_OPS[op.name](sample)
    return check_loss(op.op, loss, sample.input, target, sample.kwargs, None)


def _check_cross_entropy(op, sample):
    target = sample.args[0]
    if sample.input.dim() != 2:
        raise Skip("not (rows, classes) logits")
    weight = sample.kwargs.get("weight")
    if weight is not None and weight.dim() != 1:
        raise Skip("class weights not 1-D")
    ignore = sample.kwargs.get("ignore_index", -100)
    loss = fnmlp.CrossEntropy(sample.kwargs.get("reduction", "mean"),
                              sample.kwargs.get("label_smoothing", 0.0),
                              None if weight is None else weight,
                              None if ignore == -100 else ignore)
    if target.dim() == 1 and loss.ignore_index is None and bool((target < 0).any()):
        raise Skip("labels out of range")
    return check_loss(op.op, loss, sample.input, target, sample.kwargs, "rows")


def _check_bce(op, sample):
    target = sample.args[0] if sample.args else sample.kwargs["target"]
    weight, pos_weight = sample.kwargs.get("weight"), sample.kwargs.get("pos_weight")
    x = sample.input
    if x.dim() != 2 or target.shape != x.shape:
        if weight is not None or pos_weight is not None:
            raise Skip("weights for a layout other than (rows, outputs)")
    for value in (weight, pos_weight):
        if value is not None and (value.dim() != 1 or value.shape[0] != x.shape[-1]):
            raise Skip("weights that are not one per output column")
    loss = fnmlp.BinaryCrossEntropyWithLogits(sample.kwargs.get("reduction", "mean"),
                                              weight, pos_weight)
    return check_loss(op.op, loss, x, target, sample.kwargs, None if x.dim() != 2 else "2d")


def check_loss(function, loss, x, target, kwargs, layout):
    """The loss on ``x`` (reshaped to rows for elementwise losses) against ``function``."""
    if x.numel() == 0:
        raise Skip("empty input")
    x = x.detach().clone().requires_grad_(True)
    target = target.detach()
    expected = function(x, target, **kwargs)
    dy = torch.randn_like(expected)
    (expected_dx,) = torch.autograd.grad(expected, x, dy)
    if layout is None:  # elementwise: one element per row, so "none" is per element
        pred, tgt = x.detach().reshape(-1, 1), target.reshape(-1, 1)
        dvalue = dy.reshape(-1) if loss.reduction == "none" else dy
    else:
        pred, tgt, dvalue = x.detach(), target, dy
        if loss.reduction == "none" and dy.dim() == 2:  # (rows, outputs): fnmlp is per row
            raise Skip("per-element 'none' of a 2-D loss (fnmlp's 'none' is per row)")
    value, residual = loss.forward(pred, tgt)
    dx = loss.backward(residual, dvalue)
    return _close(value.reshape(expected.shape), expected) and _close(dx.reshape(x.shape),
                                                                     expected_dx)


OP_CHECKS = {**{name: _check_activation for name in ACTIVATION_OPS},
             "softmax": _check_softmax, "log_softmax": _check_softmax,
             "nn.functional.linear": _check_linear, "nn.functional.layer_norm": _check_layer_norm,
             "nn.functional.batch_norm": _check_batch_norm,
             **{name: _check_elementwise_loss for name in LOSS_OPS},
             "nn.functional.cross_entropy": _check_cross_entropy,
             "nn.functional.binary_cross_entropy_with_logits": _check_bce}


class _Tally:
    """Passed, skipped (by reason) and failed samples of one kind."""

    def __init__(self):
        self.passed, self.skipped, self.failures = 0, collections.Counter(), []

    def check(self, label, check, *args) -> None:
        try:
            ok = check(*args)
        except Skip as reason:
            self.skipped[str(reason)] += 1
            return
        if ok:
            self.passed += 1
        else:
            self.failures.append(label)

    def report(self, kind) -> None:
        print(f"\n{kind}: {self.passed} passed, {sum(self.skipped.values())} skipped",
              dict(self.skipped))
        assert not self.failures, self.failures[:10]


def test_opinfo_samples_match_autograd():
    tally = _Tally()
    for op in common_methods.op_db:
        check = OP_CHECKS.get(op.name)
        if check is None or op.variant_test_name not in ("", "with_dtype", "without_cudnn"):
            continue
        for sample in op.sample_inputs("cpu", F64, requires_grad=True):
            tally.check((op.name, tuple(sample.input.shape), sample.args, sample.kwargs),
                        check, op, sample)
    tally.report("OpInfo samples")
    assert tally.passed >= 100


MODULES = (nn.Linear, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
           nn.Softmax, nn.LogSoftmax, nn.Softplus, nn.LayerNorm, nn.BatchNorm1d)
LOSS_MODULES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCEWithLogitsLoss,
                nn.CrossEntropyLoss, nn.PoissonNLLLoss)


def _check_module(info, module_input, training):
    module = info.module_cls(*module_input.constructor_input.args,
                             **module_input.constructor_input.kwargs).to(F64)
    module.train(training)
    args = module_input.forward_input.args
    if len(args) != (2 if info.module_cls in LOSS_MODULES else 1) or \
            module_input.forward_input.kwargs:
        raise Skip("not one input (and a target)")
    x = args[0]
    if info.module_cls in LOSS_MODULES:
        try:
            loss = _registry.loss_from_torch(module)
        except (TypeError, ValueError) as error:
            raise Skip(f"{type(error).__name__}: options fnmlp lacks") from None
        if x.dim() != 2 or args[1].dim() not in (1, 2):
            raise Skip("not (rows, outputs) predictions")
        if loss.reduction == "none" and args[1].dim() == 2 and x.shape == args[1].shape:
            raise Skip("per-element 'none' of a 2-D loss (fnmlp's 'none' is per row)")
        return check_loss(lambda p, t: module(p, t), loss, x, args[1], {}, "rows")
    if x.dim() != 2 or x.shape[0] == 0:
        raise Skip("not (rows, features) input")
    try:
        primitive, params, state = _registry.rule_for_module(module).from_torch(module)
    except ValueError as error:
        raise Skip(f"ValueError: {error}") from None
    if isinstance(primitive, fnmlp.BatchNorm) and training and x.shape[0] < 2:
        raise Skip("1 row in training")
    x = x.detach().clone().requires_grad_(True)
    expected = module(x)
    dy = torch.randn_like(expected)
    tensors = [x] + list(module.parameters())
    expected_grads = torch.autograd.grad(expected, tensors, dy)
    y, dx, grads, _ = _primitive_vjp(primitive, params, state, x.detach(), dy, train=training)
    ok = _close(y, expected) and _close(dx, expected_grads[0])
    ours = torch.utils._pytree.tree_leaves(grads)
    return ok and len(ours) == len(expected_grads) - 1 and all(
        _close(a, b) for a, b in zip(ours, expected_grads[1:]))


def test_moduleinfo_samples_match_autograd():
    from torch.testing._internal.common_modules import module_db

    tally = _Tally()
    for info in module_db:
        if info.module_cls not in MODULES + LOSS_MODULES:
            continue
        for training in (True, False):
            for module_input in info.module_inputs_func(info, device="cpu", dtype=F64,
                                                        requires_grad=True, training=training):
                tally.check((info.module_cls.__name__, training,
                             module_input.constructor_input.kwargs),
                            _check_module, info, module_input, training)
    tally.report("ModuleInfo samples")
    assert tally.passed >= 50


def _check_optimizer(info, kwargs) -> bool:
    """5 free steps of the torch optimizer and of its fnmlp conversion on the same gradients."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)]
    parameters = [nn.Parameter(t.clone()) for t in tensors]
    try:
        torch_optimizer = info.optim_cls(parameters, **kwargs)
        optimizer = _registry.optimizer_from_torch(torch_optimizer)
    except (TypeError, ValueError) as error:
        raise Skip(f"{type(error).__name__}: {str(error)[:60]}") from None
    params = tuple(t.clone() for t in tensors)
    state = optimizer.init(params)
    for _ in range(5):
        grads = tuple(torch.randn(t.shape, generator=g, dtype=F64) for t in tensors)
        for parameter, grad in zip(parameters, grads):
            parameter.grad = grad.clone()
        torch_optimizer.step()
        params, state = optimizer.update(params, grads, state)
    return all((a - b.detach()).abs().max() <= 1e-12 * b.abs().max()
               for a, b in zip(params, parameters))


def test_optimizerinfo_samples_match_torch_optim():
    from torch.testing._internal.common_optimizers import optim_db

    tally = _Tally()
    classes = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop,
               torch.optim.Adagrad)
    for info in optim_db:
        if info.optim_cls not in classes:
            continue
        for optim_input in info.optim_inputs_func(device="cpu"):
            tally.check((info.optim_cls.__name__, optim_input.desc), _check_optimizer, info,
                        dict(optim_input.kwargs))
    tally.report("OptimizerInfo samples")
    assert tally.passed >= 20
