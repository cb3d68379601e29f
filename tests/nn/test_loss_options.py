"""Loss options and reductions (class weights, ignore_index, label smoothing, pos_weight, beta,
"none"), against torch, with row weights, and their argument checks."""

import pytest
import torch

import fnmlp
from fnmlp.interop import loss_to_torch
from helpers import relative

F64 = torch.float64


def _logits_and_labels(rows=9, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, classes, generator=g, dtype=F64) * 2
    labels = torch.randint(0, classes, (rows,), generator=g)
    return logits, labels


CE_OPTIONS = [
    dict(weight=(0.5, 2.0, 1.0, 0.25)),
    dict(ignore_index=2),
    dict(weight=(0.5, 2.0, 1.0, 0.25), ignore_index=1, label_smoothing=0.2),
    dict(label_smoothing=0.1, ignore_index=3),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", CE_OPTIONS, ids=str)
def test_cross_entropy_options_match_torch(options, reduction):
    loss = fnmlp.CrossEntropy(reduction, **options)
    logits, labels = _logits_and_labels()
    for target in (labels, torch.softmax(torch.randn(9, 4, dtype=F64), dim=1)):
        if target.dim() == 2 and "ignore_index" in options:
            continue  # torch ignores ignore_index for probability targets; so does fnmlp
        z = logits.clone().requires_grad_(True)
        expected = loss_to_torch(loss, dtype=F64)(z, target)
        cotangent = torch.rand(expected.shape, dtype=F64) + 0.5
        (expected_grad,) = torch.autograd.grad(expected, z, cotangent)
        value, residual = loss.forward(logits, target)
        assert relative(value, expected.detach()) <= 1e-13
        assert relative(loss.backward(residual, cotangent), expected_grad) <= 1e-13


@pytest.mark.parametrize("loss", [
    fnmlp.BinaryCrossEntropyWithLogits(pos_weight=(3.0, 0.5, 1.0)),
    fnmlp.BinaryCrossEntropyWithLogits("sum", weight=(0.2, 1.0, 2.0)),
    fnmlp.BinaryCrossEntropyWithLogits("none", weight=(0.2, 1.0, 2.0), pos_weight=(2.0, 1.0, 4.0)),
    fnmlp.SmoothL1(beta=0.5), fnmlp.SmoothL1("sum", beta=0.0), fnmlp.SmoothL1("none"),
    fnmlp.MSE("none"), fnmlp.L1("none"), fnmlp.Huber("none", delta=0.3), fnmlp.PoissonNLL(),
    fnmlp.PoissonNLL("sum"), fnmlp.PoissonNLL("none"),
], ids=repr)
def test_elementwise_loss_options_match_torch(loss):
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(7, 3, generator=g, dtype=F64) * 2
    pred[0, 0] = 0.0
    target = torch.rand(7, 3, generator=g, dtype=F64)
    target[0, 0] = 0.0  # a zero difference: the kinks
    z = pred.clone().requires_grad_(True)
    expected = loss_to_torch(loss, loss.reduction, dtype=F64)(z, target)
    if loss.reduction == "none":  # fnmlp's "none" is per row: the mean over a row's elements
        expected = expected.mean(dim=1)
    cotangent = torch.rand(expected.shape, dtype=F64) + 0.5
    (expected_grad,) = torch.autograd.grad(expected, z, cotangent)
    value, residual = loss.forward(pred, target)
    assert relative(value, expected.detach()) <= 1e-13
    assert relative(loss.backward(residual, cotangent), expected_grad) <= 1e-13


@pytest.mark.parametrize("loss", [
    fnmlp.CrossEntropy(weight=(0.5, 2.0, 1.0, 0.25), ignore_index=1, label_smoothing=0.2),
    fnmlp.BinaryCrossEntropyWithLogits(weight=(0.2, 1.0, 2.0, 1.0), pos_weight=(2.0, 1, 4, 1)),
    fnmlp.SmoothL1(beta=0.5),
], ids=repr)
def test_loss_options_compose_with_row_weights(loss):
    """With sample_weight each row's loss and its share of the divisor are scaled by its
    weight: integer weights equal repeating the rows."""
    logits, labels = _logits_and_labels(rows=6)
    target = labels if isinstance(loss, fnmlp.CrossEntropy) else torch.rand(6, 4, dtype=F64)
    counts = torch.tensor([1, 3, 0, 2, 1, 1])
    value, residual = loss.forward(logits, target, counts.to(F64))
    grad = loss.backward(residual)
    rows = torch.arange(6).repeat_interleave(counts)
    expected, expected_residual = loss.forward(logits[rows], target[rows])
    expected_grad = torch.zeros_like(logits).index_add_(0, rows, loss.backward(expected_residual))
    assert relative(value, expected) <= 1e-13 and relative(grad, expected_grad) <= 1e-13


def test_loss_options_are_checked():
    with pytest.raises(ValueError, match="cross_entropy weight must be finite numbers"):
        fnmlp.CrossEntropy(weight=(1.0, float("nan")))
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        fnmlp.CrossEntropy(ignore_index=1.5)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        fnmlp.SmoothL1(beta=-1)
    model = fnmlp.MLP(4, [fnmlp.Dense(3)])
    params = model.init(dtype=F64)
    with pytest.raises(ValueError, match="cross_entropy weight has 2 entries but the model has 3"):
        model.value_and_grad(params, torch.zeros(2, 4, dtype=F64), torch.tensor([0, 1]),
                             fnmlp.CrossEntropy(weight=(1.0, 2.0)))
    with pytest.raises(ValueError, match="per-row losses; training needs"):
        model.value_and_grad(params, torch.zeros(2, 4, dtype=F64), torch.zeros(2, 3, dtype=F64),
                             fnmlp.MSE("none"))
