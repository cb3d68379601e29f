"""Every loss against its torch.nn counterpart: values and gradients (autograd), reductions,
awkward values, row weights (padding is weight 0), and bad targets."""

import pytest
import torch
from torch import nn

import fnmlp
from fnmlp.interop import loss_to_torch
from helpers import relative

F64 = torch.float64


def _data(kind, shape=(7, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=g, dtype=F64) * 3
    if kind == "labels":
        target = torch.randint(0, shape[1], (shape[0],), generator=g)
    elif kind == "probabilities":
        target = torch.softmax(torch.randn(shape, generator=g, dtype=F64), dim=1)
    elif kind == "binary":
        target = torch.rand(shape, generator=g, dtype=F64)
    else:
        target = torch.randn(shape, generator=g, dtype=F64) * 3
    return pred, target


LOSSES = [
    (fnmlp.MSE(), "regression"), (fnmlp.MSE("sum"), "regression"),
    (fnmlp.L1(), "regression"), (fnmlp.L1("sum"), "regression"),
    (fnmlp.Huber(), "regression"), (fnmlp.Huber("sum", delta=0.5), "regression"),
    (fnmlp.CrossEntropy(), "labels"), (fnmlp.CrossEntropy("sum"), "labels"),
    (fnmlp.CrossEntropy(label_smoothing=0.1), "labels"),
    (fnmlp.CrossEntropy(), "probabilities"),
    (fnmlp.CrossEntropy("sum", label_smoothing=0.2), "probabilities"),
    (fnmlp.BinaryCrossEntropyWithLogits(), "binary"),
    (fnmlp.BinaryCrossEntropyWithLogits("sum"), "binary"),
]


@pytest.mark.parametrize("loss, kind", LOSSES, ids=lambda v: repr(v) if not isinstance(v, str)
                         else v)
@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (7, 4), (333, 3)])
def test_loss_and_gradient_match_torch(loss, kind, shape):
    pred, target = _data(kind, shape)
    pred.requires_grad_(True)
    expected = loss_to_torch(loss)(pred, target)
    (expected_grad,) = torch.autograd.grad(expected, pred)
    value, residual = loss.forward(pred.detach(), target)
    torch.testing.assert_close(value, expected.detach(), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(loss.backward(residual), expected_grad, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_on_labels_is_autograds_to_the_bit(reduction, dtype):
    """Class indices without options (scikit-learn's classifier, most training): the value and
    gradient come from the kernels autograd runs for ``F.cross_entropy``, bit for bit; the
    binary loss's value is torch's kernel's. Exact on every CPU by construction (the same
    kernels on the same tensors; checked at AVX512 and AVX2 on an AMD EPYC VM, torch 2.13, and
    rerun under both by tests/test_cpu_capabilities.py)."""
    for shape in [(1, 2), (7, 4), (333, 10)]:
        logits, labels = _data("labels", shape)
        logits = logits.to(dtype).requires_grad_(True)
        expected = nn.functional.cross_entropy(logits, labels, reduction=reduction)
        (expected_grad,) = torch.autograd.grad(expected, logits, retain_graph=True)
        three = torch.tensor(3.0, dtype=dtype)
        (expected_grad_3,) = torch.autograd.grad(expected, logits, three)
        loss = fnmlp.CrossEntropy(reduction)
        value, residual = loss.forward(logits.detach(), labels)
        assert torch.equal(value, expected.detach())
        assert torch.equal(loss.backward(residual), expected_grad)
        assert torch.equal(loss.backward(residual, three), expected_grad_3)
        pred, target = _data("binary", shape)
        pred, target = pred.to(dtype), target.to(dtype)
        assert torch.equal(fnmlp.BinaryCrossEntropyWithLogits(reduction)(pred, target),
                           nn.functional.binary_cross_entropy_with_logits(
                               pred, target, reduction=reduction))


@pytest.mark.parametrize("loss, pred, target", [
    (fnmlp.Huber(delta=1.0), [[-1.0, 1.0, 0.0, 2.0]], [[0.0, 0.0, 0.0, 0.0]]),  # at ±delta
    (fnmlp.L1(), [[1.0, 2.0]], [[1.0, 0.0]]),                                  # at the kink
    (fnmlp.CrossEntropy(), [[1000.0, -1000.0, 0.0]], [0]),                      # extreme logits
    (fnmlp.CrossEntropy(), [[-1000.0, 1000.0, 0.0]], [0]),
    (fnmlp.BinaryCrossEntropyWithLogits(), [[800.0, -800.0]], [[0.0, 1.0]]),
])
def test_awkward_values(loss, pred, target):
    pred = torch.tensor(pred, dtype=F64, requires_grad=True)
    target = torch.tensor(target, dtype=F64 if isinstance(target[0], list) else torch.long)
    expected = loss_to_torch(loss)(pred, target)
    (expected_grad,) = torch.autograd.grad(expected, pred)
    value, residual = loss.forward(pred.detach(), target)
    grad = loss.backward(residual)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    torch.testing.assert_close(value, expected.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("loss, kind", LOSSES, ids=lambda v: repr(v) if not isinstance(v, str)
                         else v)
@pytest.mark.parametrize("shape", [(1, 3), (7, 4), (333, 3)])
def test_weighted_loss_matches_torch_per_row_losses_weighted(loss, kind, shape):
    """sample_weight: torch.nn with reduction="none", per-row losses (mean over a row's
    elements for "mean"), then their weighted mean (or sum): values and gradients."""
    pred, target = _data(kind, shape, seed=3)
    weight = torch.rand(shape[0], generator=torch.Generator().manual_seed(4), dtype=F64) + 0.1
    pred.requires_grad_(True)
    per = loss_to_torch(loss, reduction="none")(pred, target)
    if per.dim() == 2:
        per = per.mean(dim=1) if loss.reduction == "mean" else per.sum(dim=1)
    expected = (per * weight).sum() / (weight.sum() if loss.reduction == "mean" else 1)
    (expected_grad,) = torch.autograd.grad(expected, pred)
    value, residual = loss.forward(pred.detach(), target, weight)
    assert relative(value, expected.detach()) <= 1e-13
    assert relative(loss.backward(residual), expected_grad) <= 1e-13


@pytest.mark.parametrize("loss, kind", LOSSES, ids=lambda v: repr(v) if not isinstance(v, str)
                         else v)
def test_rows_of_weight_zero_do_not_count(loss, kind):
    """Padding is weight 0: padded rows change neither the value nor the real rows' gradient,
    and get a zero gradient; all weights 1 give the unweighted loss."""
    pred, target = _data(kind, (5, 3), seed=2)
    padded_pred = torch.cat([pred, torch.randn(3, 3, dtype=F64)])
    padded_target = torch.cat([target, target[:3]])
    value, residual = loss.forward(pred, target)
    grad = loss.backward(residual)
    weight = torch.tensor([1.0] * 5 + [0.0] * 3, dtype=F64)
    masked_value, masked_residual = loss.forward(padded_pred, padded_target, weight)
    masked_grad = loss.backward(masked_residual)
    torch.testing.assert_close(masked_value, value, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(masked_grad[:5], grad, rtol=1e-14, atol=1e-16)
    assert torch.equal(masked_grad[5:], torch.zeros_like(masked_grad[5:]))


def _classifier():
    model = fnmlp.MLP(4, [fnmlp.Dense(8, "relu"), fnmlp.Dense(3)])
    return model, model.init(torch.Generator().manual_seed(0), dtype=F64)


def test_cross_entropy_through_value_and_grad_and_fit():
    model, params = _classifier()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, generator=g, dtype=F64)
    labels = torch.randint(0, 3, (20,), generator=g)
    twin = fnmlp.to_torch(model, params)
    loss_to_torch(fnmlp.cross_entropy)(twin(x), labels).backward()
    _, grads = model.value_and_grad(params, x, labels, loss=fnmlp.cross_entropy)
    for ours, theirs in zip(torch.utils._pytree.tree_leaves(grads), twin.parameters()):
        torch.testing.assert_close(ours, theirs.grad, rtol=1e-13, atol=1e-15)
    result = fnmlp.fit(model, params, x, labels.numpy(), epochs=3, batch_size=8,
                       optimizer=fnmlp.sgd(0.1), loss=fnmlp.cross_entropy, valid=(x, labels))
    assert len(result.history.valid_loss) == 3


@pytest.mark.parametrize("loss, target, message", [
    (fnmlp.cross_entropy, torch.tensor([0, 1, 3, 0]), "label 3 in y is out of range: the model "
                                                      "has 3 classes"),
    (fnmlp.cross_entropy, torch.tensor([0, -1, 2, 0]), "label -1 in y is out of range"),
    (fnmlp.cross_entropy, torch.full((4, 3), 0.5, dtype=F64), "must sum to 1 per row; row 0"),
    (fnmlp.cross_entropy, torch.tensor([[0, 1, 2, 0]]), "must be 1-D"),
    (fnmlp.nn.binary_cross_entropy_with_logits, torch.full((4, 3), 2.0, dtype=F64), r"\[0, 1\]"),
])
def test_bad_targets(loss, target, message):
    model, params = _classifier()
    x = torch.zeros(4, 4, dtype=F64)
    with pytest.raises(ValueError, match=message):
        model.value_and_grad(params, x, target, loss=loss)


def test_bad_loss_arguments():
    with pytest.raises(ValueError, match="reduction must be one of"):
        fnmlp.MSE("avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        fnmlp.CrossEntropy(label_smoothing=1.5)
    with pytest.raises(ValueError, match="delta must be > 0"):
        fnmlp.Huber(delta=0)


def test_labels_on_another_device_are_an_error_not_a_copy():
    model, params = _classifier()
    labels = torch.zeros(4, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="y is on meta but the parameters are on cpu"):
        model.value_and_grad(params, torch.zeros(4, 4, dtype=F64), labels,
                             loss=fnmlp.cross_entropy)


def test_cross_entropy_gradient_is_exact_for_targets_that_do_not_sum_to_one():
    """The compiled step does not check target sums; its gradient stays the loss's own."""
    from fnmlp.nn._model import value_and_grad

    g = torch.Generator().manual_seed(0)
    model = fnmlp.MLP(3, [fnmlp.Dense(4)])
    params = model.init(g, dtype=torch.float64)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    target = torch.rand(5, 4, generator=g, dtype=torch.float64)  # rows sum to about 2
    value, grads, _ = value_and_grad(model, params, x, target, fnmlp.cross_entropy, ((),))
    twin = fnmlp.to_torch(model, params)
    expected = nn.CrossEntropyLoss()(twin(x), target)
    expected.backward()
    assert relative(value, expected.detach()) <= 1e-13
    assert relative(grads[0].weight, twin[0].weight.grad) <= 1e-13
    assert relative(grads[0].bias, twin[0].bias.grad) <= 1e-13
