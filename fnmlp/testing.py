"""Checks for a primitive or a loss of one's own: its backward rule against central finite
differences and against autograd, in float64, with a readable report.

    result = fnmlp.testing.check_primitive(Scale(), torch.randn(5, 3))   # raises if wrong
    result = fnmlp.testing.check_loss(MyLoss(), pred, y, weight)
    print(result)                       # the table: max errors per input and parameter

Both compare the backward's cotangents of the inputs and parameters for a random output
cotangent (a vector-Jacobian product) with (1) central differences, (f(v + h) - f(v - h))/2h
per entry with h = ``eps``, within gradcheck's tolerances (``atol=1e-5, rtol=1e-3``), and (2)
autograd through the forward, when the forward is written in differentiable torch ops, within
tight ones (``atol=1e-9, rtol=1e-7``). They also check shapes, structures, determinism and
purity (``check_primitive``) and the row-weight contract (``check_loss``). On failure they
raise ``AssertionError`` with the report; with ``raise_on_failure=False`` they return it.
Meant for small inputs (a few rows): each input entry costs two forwards.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence, cast

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from fnmlp.nn import Context, Loss, Primitive, check_loss_weights, dropout_key

F64 = torch.float64
FINITE_DIFFERENCES = "finite differences"
AUTOGRAD = "autograd"

__all__ = ["check_primitive", "check_loss", "CheckResult", "Comparison", "Tolerances"]


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """Allowed disagreement, entry by entry: |backward - reference| <= atol + rtol·|reference|.

    ``finite_differences``: (atol, rtol) against central differences (gradcheck's defaults);
    ``autograd``: (atol, rtol) against autograd and for the exact checks (two analytic
    results, float64 rounding apart).
    """

    finite_differences: tuple[float, float] = (1e-5, 1e-3)
    autograd: tuple[float, float] = (1e-9, 1e-7)

    def of(self, reference: str) -> tuple[float, float]:
        return self.finite_differences if reference == FINITE_DIFFERENCES else self.autograd


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One gradient (an input's or a parameter's) against one reference.

    ``max_abs_error``: max |backward - reference| over the entries; ``ratio``: max of
    |backward - reference| / (atol + rtol·|reference|), above 1 failing; ``worst``: the index
    of the entry with the largest ratio, where the backward gives ``backward_value`` and the
    reference ``reference_value``.
    """

    name: str
    reference: str
    max_abs_error: float
    ratio: float
    worst: tuple[int, ...]
    backward_value: float
    reference_value: float

    @property
    def passed(self) -> bool:
        return self.ratio <= 1.0


@dataclasses.dataclass
class CheckResult:
    """What ``check_primitive`` or ``check_loss`` found: the gradient ``comparisons``, the
    ``problems`` (failed checks of shapes, structures, purity, row weights) and ``notes``
    (references skipped, and why). ``passed`` when every comparison passes and there is no
    problem; ``str(result)`` is the report."""

    subject: str
    eps: float
    tolerances: Tolerances
    comparisons: list[Comparison] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and all(c.passed for c in self.comparisons)

    @property
    def max_errors(self) -> dict[str, dict[str, float]]:
        """``{gradient name: {reference: max |backward - reference|}}``."""
        errors: dict[str, dict[str, float]] = {}
        for c in self.comparisons:
            errors.setdefault(c.name, {})[c.reference] = c.max_abs_error
        return errors

    def table(self) -> str:
        """The comparisons as an aligned text table, one row each."""
        header = ("gradient", "reference", "max |error|", "error/allowed", "worst at",
                  "backward", "reference value", "result")
        rows = [header] + [(c.name, c.reference, f"{c.max_abs_error:.3g}", f"{c.ratio:.3g}",
                            str(c.worst), f"{c.backward_value:.6g}",
                            f"{c.reference_value:.6g}", "ok" if c.passed else "FAIL")
                           for c in self.comparisons]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        return "\n".join("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                         for row in rows)

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        lines = [f"{self.subject} {verdict} (float64; central differences with eps={self.eps:g})"]
        if self.comparisons:
            lines.append(self.table())
        lines += [f"problem: {p}" for p in self.problems]
        lines += [f"note: {n}" for n in self.notes]
        (fd_atol, fd_rtol), (ad_atol, ad_rtol) = (self.tolerances.finite_differences,
                                                  self.tolerances.autograd)
        lines.append(f"allowed: |backward - reference| <= atol + rtol·|reference| "
                     f"(finite differences: atol={fd_atol:g}, rtol={fd_rtol:g}; autograd and "
                     f"exact checks: atol={ad_atol:g}, rtol={ad_rtol:g})")
        return "\n".join(lines)

    def raise_if_failed(self) -> CheckResult:
        """``self``, or ``AssertionError`` with the report when the check failed."""
        if not self.passed:
            raise AssertionError("\n" + str(self))
        return self


# --- primitives --------------------------------------------------------------------------------


def check_primitive(primitive: Primitive, x, params=None, *, state=None,
                    context: Context | None = None, dy: Tensor | None = None,
                    generator: torch.Generator | None = None, eps: float = 1e-6,
                    tolerances: Tolerances = Tolerances(), autograd: bool | None = None,
                    raise_on_failure: bool = True) -> CheckResult:
    """Check ``primitive.backward`` against finite differences and autograd, in float64.

    Arguments:
        primitive: the primitive (an instance).
        x: (m, n_in) inputs, cast to float64; keep it small (each entry costs two forwards).
        params: its parameters (cast to float64); None: ``primitive.init`` draws them.
        state: its state; None: ``primitive.init_state``.
        context: the forward's ``Context``; default training mode, with a dropout key
            (``dropout_key(0)``) for a primitive that draws randomness (``uses_key``).
        dy: (m, n_out) output cotangent; default random (from ``generator``), 0 on the rows
            of weight 0 of ``context.row_weight`` (padding: the loss gives them none).
        generator: the source of ``params`` and ``dy`` (default seeded with 0).
        eps: the finite-difference step h.
        tolerances: the allowed disagreement (``Tolerances``).
        autograd: compare with autograd through the forward: None when the forward is
            differentiable (else a note), True always (not being differentiable is a
            problem), False never.
        raise_on_failure: raise ``AssertionError`` with the report when the check fails.

    Returns the ``CheckResult``: ``x`` and every floating parameter leaf (``params.weight``)
    against each reference, plus checks that the output is (m, out_features(n_in)), ``dx`` is
    shaped like ``x`` and ``dparams`` like ``params``, the forward is deterministic and leaves
    its inputs alone, ``need_input_grad=False`` gives the same ``dparams``, and, for a primitive
    registered with a ``torch.nn`` twin, that the twin's ``state_dict`` names are the field
    paths checkpoints store its tensors under.
    """
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    x = _as_float64(x, "x")
    params, state = _primitive_trees(primitive, x, params, state, generator)
    context = _default_context(primitive, x) if context is None else context
    result = CheckResult(f"check_primitive({primitive!r})", eps, tolerances)

    def output(params_, x_):
        return primitive.forward(params_, x_, state, context)[0]

    y, residual, _ = primitive.forward(params, x, state, context)
    _check_output(result, primitive, x, y)
    dy = _default_dy(y, context, generator) if dy is None else _as_float64(dy, "dy").to(y.device)
    dx, dparams = primitive.backward(params, residual, dy, True)
    _check_backward_shapes(result, x, dx, params, dparams)
    _check_purity(result, output, params, x, y)
    _check_param_grads_alone(result, primitive, params, residual, dy, dparams, tolerances)
    _check_twin_names(result, primitive, params, state, x.shape[1])
    if result.problems:  # gradients of the wrong shape cannot be compared
        return _finish(result, raise_on_failure)
    leaves, spec = _float_leaves(params)
    names = ["x"] + _leaf_names(params, "params")
    # dx is a tensor: _check_backward_shapes found no problem
    backward_grads = [cast(Tensor, dx)] + _float_leaves(dparams)[0]

    def scalar(x_, *leaves_):
        return (output(_with_leaves(params, spec, leaves_), x_) * dy).sum()

    _compare_all(result, scalar, [x, *leaves], backward_grads, names, eps, autograd)
    return _finish(result, raise_on_failure)


def _primitive_trees(primitive: Primitive, x: Tensor, params, state, generator):
    """``(params, state)`` in float64: given (cast) or fresh from the primitive."""
    n_in = x.shape[1]
    if params is None:
        params = primitive.init(generator, n_in, F64, x.device)[1]
    if state is None:
        state = primitive.init_state(n_in, F64, x.device)
    return _tree_float64(params), _tree_float64(state)


def _default_context(primitive: Primitive, x: Tensor) -> Context:
    key = dropout_key(0, 0, device=x.device) if primitive.uses_key else None
    return Context(train=True, key=key)


def _default_dy(y: Tensor, context: Context, generator: torch.Generator) -> Tensor:
    """A random output cotangent, 0 on rows of weight 0 (padding), as a loss gives them."""
    dy = _random_like(y, generator)
    if context.row_weight is not None:
        dy = dy * (context.row_weight != 0).to(dy.dtype).reshape(-1, 1)
    return dy


def _check_output(result: CheckResult, primitive: Primitive, x: Tensor, y) -> None:
    expected = (x.shape[0], primitive.out_features(x.shape[1]))
    if not isinstance(y, Tensor) or tuple(y.shape) != expected:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        result.problems.append(f"forward's output is {shape}, expected (m, out_features(n_in)) "
                               f"= {expected}")


def _check_backward_shapes(result: CheckResult, x: Tensor, dx, params, dparams) -> None:
    if not isinstance(dx, Tensor) or dx.shape != x.shape:
        shape = tuple(dx.shape) if isinstance(dx, Tensor) else repr(dx)
        result.problems.append(f"backward's dx is {shape}, expected x's shape "
                               f"{tuple(x.shape)}")
    leaves, spec = pytree.tree_flatten(params)
    grad_leaves, grad_spec = pytree.tree_flatten(dparams)
    if spec != grad_spec:
        result.problems.append(f"backward's dparams is structured as {grad_spec}, expected "
                               f"params' structure {spec}")
        return
    for name, leaf, grad in zip(_leaf_names(params, "params", every=True), leaves, grad_leaves):
        if isinstance(leaf, Tensor) and (not isinstance(grad, Tensor)
                                         or grad.shape != leaf.shape):
            shape = tuple(grad.shape) if isinstance(grad, Tensor) else type(grad).__name__
            result.problems.append(f"backward's gradient of {name} is {shape}, expected "
                                   f"{tuple(leaf.shape)}")


def _check_twin_names(result: CheckResult, primitive: Primitive, params, state,
                      n_in: int) -> None:
    """For a primitive registered with a ``torch.nn`` twin: checkpoints store its tensors under
    their field paths (``fnmlp.interop.encode_tree``), which must be the twin's ``state_dict``
    names for plain torch to load a checkpoint's weights into the twin."""
    from fnmlp import interop
    from fnmlp._registry import entry

    registered = entry(type(primitive))
    if registered is None or registered.twin is None:  # no twin (yet): nothing to match
        return
    fields: dict[str, Tensor] = {}
    interop.encode_tree(params, fields)
    interop.encode_tree(state, fields, "~state")  # apart, so that a clash shows
    names = sorted(name.removeprefix("~state.") for name in fields)
    if not names:  # nothing to store (an activation): nothing to name
        return
    twin_names = sorted(interop.module_for(primitive, params, state, n_in).state_dict())
    if names != twin_names:
        result.problems.append(
            f"the twin's state_dict names {twin_names} differ from the field paths of the "
            f"parameters and state {names}: checkpoints store the tensors under the field "
            "paths, so plain torch cannot load their weights into the twin; name the fields "
            "as the twin module's parameters and buffers")


def _check_purity(result: CheckResult, output, params, x: Tensor, y: Tensor) -> None:
    """The forward gives the same output again and left ``x`` and ``params`` unchanged."""
    x_before = x.clone()
    params_before = [t.clone() for t in _float_leaves(params)[0]]
    again = output(params, x)
    if not torch.equal(again, y):
        result.problems.append("forward is not deterministic (two calls differ): finite "
                               "differences need a fixed function (pass a context with a key)")
    if not torch.equal(x, x_before) or not all(
            torch.equal(a, b) for a, b in zip(_float_leaves(params)[0], params_before)):
        result.problems.append("forward changed its input x or params in place")


def _check_param_grads_alone(result, primitive, params, residual, dy, dparams,
                             tolerances: Tolerances) -> None:
    """``backward(..., need_input_grad=False)`` gives the same parameter gradients."""
    alone = primitive.backward(params, residual, dy, False)[1]
    if pytree.tree_structure(alone) != pytree.tree_structure(dparams):
        result.problems.append("backward with need_input_grad=False structures dparams "
                               "differently")
        return
    atol, rtol = tolerances.autograd
    for name, a, b in zip(_leaf_names(params, "params"), _float_leaves(alone)[0],
                          _float_leaves(dparams)[0]):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=rtol, atol=atol):
            result.problems.append(f"backward with need_input_grad=False gives another "
                                   f"gradient of {name}")


# --- losses ------------------------------------------------------------------------------------


def check_loss(loss: Loss, pred, y, weight=None, *, dvalue: Tensor | None = None,
               generator: torch.Generator | None = None, eps: float = 1e-6,
               tolerances: Tolerances = Tolerances(), autograd: bool | None = None,
               raise_on_failure: bool = True) -> CheckResult:
    """Check ``loss.backward`` against finite differences and autograd, in float64.

    Arguments:
        loss: the loss (an instance).
        pred: (m, n) predictions, cast to float64.
        y: the targets: floats (cast to float64) or what the loss takes (class labels (m,)).
        weight: (m,) row weights, or None; refused (``TypeError``) for a loss without
            ``supports_weights``.
        dvalue: the value's cotangent: 0-d, or (m,) for reduction "none"; default None (1)
            for a 0-d value and random for "none".
        generator, eps, tolerances, autograd, raise_on_failure: as ``check_primitive``.

    Returns the ``CheckResult``: ``pred``'s gradient against each reference, plus checks that
    the value is 0-d ((m,) for "none"), ``dpred`` is (m, n), ``dvalue`` scales it, and, for a
    loss taking row weights, that weights of 1 give the unweighted value and gradient and that
    a row of weight 0 (the padding of a compiled step) changes neither the value nor the other
    rows' gradients and gets none.
    """
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    check_loss_weights(loss, weight, "weight")
    pred = _as_float64(pred, "pred")
    y = _as_target(y, pred)
    weight = None if weight is None else _as_float64(weight, "weight").to(pred.device)
    result = CheckResult(f"check_loss({loss!r})", eps, tolerances)
    value, residual = loss.forward(pred, y, weight)
    if dvalue is None and loss.reduction == "none":
        dvalue = _random_like(value, generator)
    elif dvalue is not None:
        dvalue = _as_float64(dvalue, "dvalue").to(pred.device)
    dpred = loss.backward(residual, dvalue)
    _check_loss_shapes(result, loss, pred, value, dpred)
    if result.problems:
        return _finish(result, raise_on_failure)
    _check_dvalue_scaling(result, loss, residual, value, dpred, dvalue, tolerances)
    if loss.supports_weights:
        _check_row_weights(result, loss, pred, y, weight, dvalue, generator, tolerances)

    def scalar(pred_):
        value_ = loss.forward(pred_, y, weight)[0]
        return (value_ * (1.0 if dvalue is None else dvalue)).sum()

    _compare_all(result, scalar, [pred], [dpred], ["pred"], eps, autograd)
    return _finish(result, raise_on_failure)


def _as_target(y, pred: Tensor) -> Tensor:
    y = torch.as_tensor(y, device=pred.device)
    return y.to(F64) if y.is_floating_point() else y


def _check_loss_shapes(result: CheckResult, loss: Loss, pred: Tensor, value, dpred) -> None:
    expected = (pred.shape[0],) if loss.reduction == "none" else ()
    if not isinstance(value, Tensor) or tuple(value.shape) != expected:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        result.problems.append(f"forward's value is {shape}, expected {expected} for "
                               f"reduction={loss.reduction!r}")
    if not isinstance(dpred, Tensor) or dpred.shape != pred.shape:
        shape = tuple(dpred.shape) if isinstance(dpred, Tensor) else type(dpred).__name__
        result.problems.append(f"backward's dpred is {shape}, expected pred's shape "
                               f"{tuple(pred.shape)}")


def _check_dvalue_scaling(result, loss: Loss, residual, value: Tensor, dpred: Tensor, dvalue,
                          tolerances: Tolerances) -> None:
    """``backward(residual, c·dvalue)`` is c times ``backward(residual, dvalue)``."""
    base = torch.ones_like(value) if dvalue is None else dvalue
    scaled = loss.backward(residual, base * 0.5)
    atol, rtol = tolerances.autograd
    if scaled.shape != dpred.shape or not torch.allclose(scaled, dpred * 0.5, rtol=rtol,
                                                         atol=atol):
        result.problems.append("backward ignores dvalue: halving the value's cotangent does not "
                               "halve dpred")


def _check_row_weights(result, loss: Loss, pred: Tensor, y: Tensor, weight, dvalue,
                       generator, tolerances: Tolerances) -> None:
    """Weights of 1 change nothing; a padding row of weight 0 counts for nothing."""
    rows = pred.shape[0]
    ones = torch.ones(rows, dtype=F64, device=pred.device)
    if weight is None:
        plain_value, plain_grad = _value_and_grad(loss, pred, y, None, dvalue)
        value, grad = _value_and_grad(loss, pred, y, ones, dvalue)
        _expect_close(result, value, plain_value, tolerances,
                      "row weights of 1 change the value (they must give the unweighted one)")
        _expect_close(result, grad, plain_grad, tolerances,
                      "row weights of 1 change the gradient (they must give the unweighted one)")
    weight = ones if weight is None else weight
    expected_value, expected_grad = _value_and_grad(loss, pred, y, weight, dvalue)
    extra = pred[:1] + torch.randn(1, pred.shape[1], generator=generator, dtype=F64).to(pred)
    padded_dvalue = None if dvalue is None or dvalue.dim() == 0 else torch.cat(
        [dvalue, dvalue.new_ones(1)])
    value, grad = _value_and_grad(loss, torch.cat([pred, extra]), torch.cat([y, y[:1]]),
                                  torch.cat([weight, weight.new_zeros(1)]), padded_dvalue)
    if loss.reduction == "none":  # the padding row's own loss is 0
        expected_value = torch.cat([expected_value, expected_value.new_zeros(1)])
    _expect_close(result, value, expected_value, tolerances,
                  "a row of weight 0 (padding) changes the value")
    _expect_close(result, grad[:rows], expected_grad, tolerances,
                  "a row of weight 0 (padding) changes the other rows' gradients")
    _expect_close(result, grad[rows:], torch.zeros_like(grad[rows:]), tolerances,
                  "a row of weight 0 (padding) gets a non-zero gradient")


def _value_and_grad(loss: Loss, pred, y, weight, dvalue) -> tuple[Tensor, Tensor]:
    value, residual = loss.forward(pred, y, weight)
    return value, loss.backward(residual, dvalue)


def _expect_close(result: CheckResult, got: Tensor, expected: Tensor, tolerances: Tolerances,
                  message: str) -> None:
    atol, rtol = tolerances.autograd
    if got.shape != expected.shape:
        result.problems.append(f"{message} (shape {tuple(got.shape)}, expected "
                               f"{tuple(expected.shape)})")
    elif not torch.allclose(got, expected, rtol=rtol, atol=atol):
        error = (got - expected).abs().max().item()
        result.problems.append(f"{message} (max |difference| {error:.3g})")


# --- comparisons -------------------------------------------------------------------------------


def _compare_all(result: CheckResult, scalar: Callable[..., Tensor], inputs: Sequence[Tensor],
                 grads: Sequence[Tensor], names: Sequence[str], eps: float,
                 autograd: bool | None) -> None:
    """Compare ``grads`` (the backward's gradients of ``scalar`` at ``inputs``) with finite
    differences and, unless refused, autograd."""
    numeric = [_finite_differences(scalar, inputs, i, eps) for i in range(len(inputs))]
    references: list = [None] * len(inputs)
    if autograd is not False:
        references, why = _autograd(scalar, inputs)
        if references is None:
            references = [None] * len(inputs)
            (result.problems if autograd else result.notes).append(
                f"autograd: no reference, the forward is not differentiable by autograd ({why});"
                " finite differences only" + (" (autograd=False skips this)" if autograd else ""))
    for name, grad, by_differences, by_autograd in zip(names, grads, numeric, references):
        result.comparisons.append(_compare(name, FINITE_DIFFERENCES, grad, by_differences,
                                           result.tolerances))
        if by_autograd is not None:
            result.comparisons.append(_compare(name, AUTOGRAD, grad, by_autograd,
                                               result.tolerances))


def _finite_differences(scalar: Callable[..., Tensor], inputs: Sequence[Tensor], which: int,
                        eps: float) -> Tensor:
    """d scalar / d inputs[which] by central differences, entry by entry."""
    base = inputs[which]
    gradient = torch.empty_like(base).reshape(-1)
    with torch.no_grad():
        for index in range(base.numel()):
            values = []
            for step in (eps, -eps):
                moved = base.detach().clone().reshape(-1)
                moved[index] += step
                args = list(inputs)
                args[which] = moved.reshape(base.shape)
                values.append(scalar(*args))
            gradient[index] = (values[0] - values[1]) / (2 * eps)
    return gradient.reshape(base.shape)


def _autograd(scalar: Callable[..., Tensor], inputs: Sequence[Tensor]):
    """``(gradients, None)`` by autograd through ``scalar``, or ``(None, why not)``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    try:
        with torch.enable_grad():
            out = scalar(*leaves)
            if not out.requires_grad:
                return None, "its output has no autograd history"
            grads = torch.autograd.grad(out, leaves, allow_unused=True)
    except Exception as error:  # an op without a derivative, an in-place change, ...
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        return None, f"{type(error).__name__}: {first}"
    return [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(leaves, grads)], None


def _compare(name: str, reference_name: str, grad: Tensor, reference: Tensor,
             tolerances: Tolerances) -> Comparison:
    atol, rtol = tolerances.of(reference_name)
    grad = grad.detach().to(F64)
    error = (grad - reference).abs()
    ratio = error / (atol + rtol * reference.abs())
    ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, math.inf), ratio)
    if ratio.numel() == 0:
        return Comparison(name, reference_name, 0.0, 0.0, (), 0.0, 0.0)
    flat = int(ratio.reshape(-1).argmax())
    worst = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), ratio.shape))
    max_error = error.max().item()
    return Comparison(name, reference_name, math.inf if math.isnan(max_error) else max_error,
                      ratio.max().item(), worst, grad.reshape(-1)[flat].item(),
                      reference.reshape(-1)[flat].item())


def _finish(result: CheckResult, raise_on_failure: bool) -> CheckResult:
    return result.raise_if_failed() if raise_on_failure else result


# --- trees -------------------------------------------------------------------------------------


def _as_float64(value, name: str) -> Tensor:
    tensor = torch.as_tensor(value)
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must hold floating-point numbers, got {tensor.dtype}")
    return tensor.detach().to(F64).clone()


def _random_like(like: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(like.shape, generator=generator, dtype=F64).to(like.device)


def _tree_float64(tree):
    """``tree`` with its floating tensors as float64 copies (other leaves kept)."""
    return pytree.tree_map(lambda t: t.detach().to(F64).clone()
                           if isinstance(t, Tensor) and t.is_floating_point() else t, tree)


def _float_leaves(tree) -> tuple[list[Tensor], Any]:
    """The floating tensor leaves of ``tree`` and its spec."""
    leaves, spec = pytree.tree_flatten(tree)
    return [t for t in leaves if isinstance(t, Tensor) and t.is_floating_point()], spec


def _with_leaves(tree, spec, floats: Sequence[Tensor]):
    """``tree`` with its floating tensor leaves replaced by ``floats``, in order."""
    replacements = iter(floats)
    leaves = [next(replacements) if isinstance(t, Tensor) and t.is_floating_point() else t
              for t in pytree.tree_leaves(tree)]
    return pytree.tree_unflatten(leaves, spec)


def _leaf_names(tree, prefix: str, every: bool = False) -> list[str]:
    """``prefix.field[0]``-style names of the floating tensor leaves (of every leaf)."""
    paths, _ = pytree.tree_flatten_with_path(tree)
    return [prefix + pytree.keystr(path) for path, leaf in paths
            if every or isinstance(leaf, Tensor) and leaf.is_floating_point()]
