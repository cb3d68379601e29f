"""fnmlp.testing: every built-in primitive and loss passes its gradient check; a wrong
backward, a non-differentiable forward, a wrong shape, an impure forward, and a loss that
ignores dvalue or row weights fail with a readable report."""

import dataclasses
import re

import pytest
import torch

import fnmlp
from fnmlp.nn import Loss
from helpers import Quartic
from fnmlp.testing import (AUTOGRAD, FINITE_DIFFERENCES, CheckResult, Tolerances,
                           check_loss, check_primitive)

F64 = torch.float64


def _x(rows=5, columns=4, seed=0):
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed), dtype=F64)


BUILT_IN_PRIMITIVES = [fnmlp.Linear(3), fnmlp.Linear(2, "xavier_uniform"), fnmlp.LayerNorm(),
                       fnmlp.BatchNorm(), fnmlp.BatchNorm(affine=False), fnmlp.Dropout(0.3),
                       fnmlp.LeakyReLU(0.2), fnmlp.ELU(0.5)]
BUILT_IN_PRIMITIVES += [fnmlp.nn.get_activation(name) for name in fnmlp.nn.activation_names()]


@pytest.mark.parametrize("primitive", BUILT_IN_PRIMITIVES, ids=repr)
def test_every_built_in_primitive_passes(primitive):
    result = check_primitive(primitive, _x())
    assert isinstance(result, CheckResult) and result.passed, str(result)
    names = {c.name for c in result.comparisons}
    assert "x" in names
    if isinstance(primitive, fnmlp.Linear):
        assert names == {"x", "params.weight", "params.bias"}
        assert set(result.max_errors["params.weight"]) == {FINITE_DIFFERENCES, AUTOGRAD}
    assert all(c.passed for c in result.comparisons) and not result.problems


def test_float32_params_and_inputs_are_checked_in_float64():
    layer = fnmlp.Linear(3)
    params = layer.init(torch.Generator().manual_seed(0), 4, torch.float32, "cpu")[1]
    result = check_primitive(layer, _x().float(), params)
    assert result.passed and max(max(v.values()) for v in result.max_errors.values()) < 1e-8


def _labels(rows=6, classes=3, seed=0):
    return torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(seed))


def _targets(kind, rows=6, columns=3):
    g = torch.Generator().manual_seed(1)
    if kind == "labels":
        return _labels(rows, columns)
    if kind == "probabilities":
        return torch.softmax(torch.randn(rows, columns, generator=g, dtype=F64), dim=1)
    if kind == "unit":
        return torch.rand(rows, columns, generator=g, dtype=F64)
    return torch.randn(rows, columns, generator=g, dtype=F64)


BUILT_IN_LOSSES = [
    (fnmlp.MSE(), "real"), (fnmlp.MSE("sum"), "real"), (fnmlp.MSE("none"), "real"),
    (fnmlp.L1(), "real"), (fnmlp.Huber(delta=0.5), "real"), (fnmlp.SmoothL1("sum"), "real"),
    (fnmlp.PoissonNLL(), "unit"), (fnmlp.CrossEntropy(), "labels"),
    (fnmlp.CrossEntropy("none"), "labels"),
    (fnmlp.CrossEntropy("sum", label_smoothing=0.1, weight=(1.0, 2.0, 0.5)), "labels"),
    (fnmlp.CrossEntropy(ignore_index=1), "labels"), (fnmlp.CrossEntropy(), "probabilities"),
    (fnmlp.BinaryCrossEntropyWithLogits(pos_weight=(1.0, 2.0, 3.0)), "unit"),
    (fnmlp.BinaryCrossEntropyWithLogits("none", weight=(1.0, 0.5, 2.0)), "unit"),
]


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("loss, kind", BUILT_IN_LOSSES,
                         ids=lambda v: v if isinstance(v, str) else repr(v))
def test_every_built_in_loss_passes(loss, kind, weighted):
    weight = torch.rand(6, generator=torch.Generator().manual_seed(3), dtype=F64) + 0.5
    result = check_loss(loss, _x(6, 3) * 2, _targets(kind), weight if weighted else None)
    assert result.passed and not result.notes, str(result)
    assert set(result.max_errors["pred"]) == {FINITE_DIFFERENCES, AUTOGRAD}


# --- a primitive of one's own, right and wrong -------------------------------------------------


@fnmlp.pytree_dataclass
class ScaleParams:
    scale: torch.Tensor  # (n,)


@dataclasses.dataclass(frozen=True)
class Scale(fnmlp.Primitive):
    """y = x·s;  dx = dy·s,  ds = sum over rows of dy·x (the README's example)."""

    def init(self, generator, n_in, dtype, device):
        return n_in, ScaleParams(torch.rand(n_in, generator=generator, dtype=dtype) + 0.5)

    def forward(self, params, x, state, context):
        return x * params.scale, x, state

    def backward(self, params, x, dy, need_input_grad=True):
        return dy * params.scale, ScaleParams((dy * x).sum(dim=0))


@dataclasses.dataclass(frozen=True)
class WrongInputGrad(Scale):
    def backward(self, params, x, dy, need_input_grad=True):
        return dy * params.scale * 1.5, ScaleParams((dy * x).sum(dim=0))


@dataclasses.dataclass(frozen=True)
class WrongParamGrad(Scale):
    def backward(self, params, x, dy, need_input_grad=True):
        return dy * params.scale, ScaleParams((dy * x).mean(dim=0))


def test_a_right_primitive_of_ones_own_passes_and_reports():
    result = check_primitive(Scale(), _x(4, 3))
    assert result.passed
    assert set(result.max_errors) == {"x", "params.scale"}
    report = str(result)
    assert report.startswith("check_primitive(Scale()) passed (float64; central differences "
                             "with eps=1e-06)")
    assert re.search(r"params\.scale\s+autograd\s+\S+\s+\S+\s+\(\d+,\)", report)


def test_a_wrong_input_gradient_fails_with_a_table():
    with pytest.raises(AssertionError) as failure:
        check_primitive(WrongInputGrad(), _x(4, 3))
    report = str(failure.value)
    assert "check_primitive(WrongInputGrad()) FAILED" in report
    assert re.search(r"\n  gradient\s+reference\s+max \|error\|\s+error/allowed\s+worst at\s+"
                     r"backward\s+reference value\s+result\n", report)
    assert re.search(r"\n  x\s+finite differences\s+.*FAIL\n", report)
    assert re.search(r"\n  x\s+autograd\s+.*FAIL\n", report)
    assert re.search(r"\n  params\.scale\s+finite differences\s+.*ok\n", report)
    assert "allowed: |backward - reference| <= atol + rtol·|reference|" in report


def test_a_wrong_parameter_gradient_fails_on_that_parameter_only():
    result = check_primitive(WrongParamGrad(), _x(4, 3), raise_on_failure=False)
    assert not result.passed
    failing = {(c.name, c.reference) for c in result.comparisons if not c.passed}
    assert failing == {("params.scale", FINITE_DIFFERENCES), ("params.scale", AUTOGRAD)}
    worst = next(c for c in result.comparisons if c.name == "params.scale")
    assert worst.ratio > 1 and len(worst.worst) == 1
    assert worst.backward_value == pytest.approx(worst.reference_value / 4, rel=1e-6)
    with pytest.raises(AssertionError, match="params.scale"):
        result.raise_if_failed()


@dataclasses.dataclass(frozen=True)
class NumpyCube(fnmlp.Primitive):
    """y = x³ computed outside autograd; dx = 3x²·dy."""

    def forward(self, params, x, state, context):
        return torch.from_numpy(x.detach().numpy() ** 3), x, state

    def backward(self, params, x, dy, need_input_grad=True):
        return 3 * x * x * dy, ()


def test_a_forward_autograd_cannot_follow_is_checked_by_finite_differences_alone():
    result = check_primitive(NumpyCube(), _x(3, 2))
    assert result.passed and {c.reference for c in result.comparisons} == {FINITE_DIFFERENCES}
    assert "autograd: no reference, the forward is not differentiable by autograd" in str(result)
    with pytest.raises(AssertionError, match="problem: autograd: no reference"):
        check_primitive(NumpyCube(), _x(3, 2), autograd=True)
    assert check_primitive(NumpyCube(), _x(3, 2), autograd=False).notes == []


@dataclasses.dataclass(frozen=True)
class WrongShape(Scale):
    def backward(self, params, x, dy, need_input_grad=True):
        return (dy * params.scale)[:, :1], ScaleParams((dy * x).sum(dim=0)[:1])


@dataclasses.dataclass(frozen=True)
class Noisy(fnmlp.Primitive):
    def forward(self, params, x, state, context):
        return x + 1e-3 * torch.randn(x.shape, dtype=x.dtype), None, state

    def backward(self, params, residual, dy, need_input_grad=True):
        return dy, ()


@dataclasses.dataclass(frozen=True)
class InPlace(fnmlp.Primitive):
    def forward(self, params, x, state, context):
        return x.mul_(2), None, state

    def backward(self, params, residual, dy, need_input_grad=True):
        return 2 * dy, ()


@dataclasses.dataclass(frozen=True)
class Inconsistent(Scale):
    def backward(self, params, x, dy, need_input_grad=True):
        grad = (dy * x).sum(dim=0)
        return (dy * params.scale if need_input_grad else None), ScaleParams(
            grad if need_input_grad else 2 * grad)


@pytest.mark.parametrize("primitive, problem", [
    (WrongShape(), "backward's dx is (4, 1), expected x's shape (4, 3)"),
    (Noisy(), "forward is not deterministic"),
    (InPlace(), "forward changed its input x or params in place"),
    (Inconsistent(), "backward with need_input_grad=False gives another gradient of "
                     "params.scale"),
], ids=lambda v: type(v).__name__ if not isinstance(v, str) else "")
def test_broken_contracts_are_named(primitive, problem):
    with pytest.raises(AssertionError, match=re.escape("problem: " + problem)):
        check_primitive(primitive, _x(4, 3))


def test_wrong_param_gradient_shapes_are_named():
    result = check_primitive(WrongShape(), _x(4, 3), raise_on_failure=False)
    assert "backward's gradient of params.scale is (1,), expected (3,)" in result.problems
    assert result.comparisons == []  # nothing to compare with a wrong shape


def test_tolerances_and_eps_are_the_callers():
    loose = Tolerances(finite_differences=(1.0, 1.0), autograd=(1.0, 1.0))
    assert check_primitive(WrongInputGrad(), _x(4, 3), tolerances=loose).passed
    result = check_primitive(Scale(), _x(4, 3), eps=1e-3)
    assert result.eps == 1e-3 and "eps=0.001" in str(result)


def test_a_dropout_primitive_gets_a_key_and_a_context_can_be_given():
    x = _x(6, 4)
    assert check_primitive(fnmlp.Dropout(0.5), x).passed
    key = fnmlp.dropout_key(7, 3)
    assert check_primitive(fnmlp.Dropout(0.5), x,
                           context=fnmlp.nn.Context(train=True, key=key)).passed
    weight = torch.tensor([1.0, 1.0, 0.0, 2.0, 1.0, 1.0], dtype=F64)
    assert check_primitive(fnmlp.BatchNorm(), x,
                           context=fnmlp.nn.Context(train=True, row_weight=weight)).passed


# --- a loss of one's own, right and wrong ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LogCosh(Loss):
    def forward(self, pred, target, weight=None):
        diff = pred - target
        per = torch.log(torch.cosh(diff))
        value, scale = fnmlp.nn.reduce_per_element(self, per, weight)
        return value, (diff, scale)

    def backward(self, residual, dvalue=None):
        diff, scale = residual
        gradient = torch.tanh(diff) * scale
        if dvalue is None:
            return gradient
        return gradient * (dvalue.unsqueeze(1) if dvalue.dim() == 1 else dvalue)


@dataclasses.dataclass(frozen=True)
class WrongLogCosh(LogCosh):
    def backward(self, residual, dvalue=None):
        return super().backward(residual, dvalue) * 2


@dataclasses.dataclass(frozen=True)
class IgnoresWeights(LogCosh):
    def forward(self, pred, target, weight=None):
        return super().forward(pred, target, None)


@dataclasses.dataclass(frozen=True)
class IgnoresDvalue(LogCosh):
    def backward(self, residual, dvalue=None):
        return super().backward(residual, None)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_right_loss_of_ones_own_passes_with_and_without_weights(reduction):
    pred, y = _x(5, 2), _targets("real", 5, 2)
    assert check_loss(LogCosh(reduction), pred, y).passed
    result = check_loss(LogCosh(reduction), pred, y, torch.linspace(0.5, 2.0, 5))
    assert result.passed and result.max_errors["pred"][AUTOGRAD] < 1e-12


def test_a_wrong_loss_gradient_fails_with_a_table():
    with pytest.raises(AssertionError) as failure:
        check_loss(WrongLogCosh(), _x(5, 2), _targets("real", 5, 2))
    report = str(failure.value)
    assert "check_loss(WrongLogCosh(reduction='mean')) FAILED" in report
    assert re.search(r"\n  pred\s+finite differences\s+.*FAIL\n", report)
    assert re.search(r"\n  pred\s+autograd\s+.*FAIL\n", report)


def test_a_loss_ignoring_row_weights_or_dvalue_is_caught():
    pred, y = _x(5, 2), _targets("real", 5, 2)
    with pytest.raises(AssertionError) as failure:
        check_loss(IgnoresWeights(), pred, y)
    report = str(failure.value)
    assert "problem: a row of weight 0 (padding) changes the value" in report
    assert "problem: a row of weight 0 (padding) gets a non-zero gradient" in report
    with pytest.raises(AssertionError, match=re.escape(
            "problem: backward ignores dvalue: halving the value's cotangent does not halve "
            "dpred")):
        check_loss(IgnoresDvalue(), pred, y)


def test_a_loss_without_weights_is_checked_without_them_and_refuses_them():
    assert not Quartic.supports_weights
    pred, y = _x(5, 2), _targets("real", 5, 2)
    result = check_loss(Quartic(), pred, y)
    assert result.passed and not result.problems
    with pytest.raises(TypeError, match=r"Quartic takes no row weights .* so weight cannot"):
        check_loss(Quartic(), pred, y, torch.ones(5))


def test_a_wrong_value_shape_is_named():
    @dataclasses.dataclass(frozen=True)
    class PerElement(LogCosh):
        def forward(self, pred, target, weight=None):
            return torch.log(torch.cosh(pred - target)), (pred - target, 1.0)

    with pytest.raises(AssertionError, match=re.escape(
            "forward's value is (5, 2), expected () for reduction='mean'")):
        check_loss(PerElement(), _x(5, 2), _targets("real", 5, 2))


def test_non_float_inputs_are_refused():
    with pytest.raises(TypeError, match="x must hold floating-point numbers"):
        check_primitive(Scale(), torch.ones(3, 2, dtype=torch.int64))
