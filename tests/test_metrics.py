"""``fnmlp.metrics``: the shapes a classifier's and a regressor's outputs come in (one logit,
several scores, class columns), and targets as NumPy arrays and pandas objects."""

import numpy as np
import pytest
import torch

import fnmlp
from fnmlp import metrics

pd = pytest.importorskip("pandas")


def test_accuracy_of_one_output_thresholds_the_logit_at_zero():
    logits = torch.tensor([[-2.0], [-1.0], [3.0]])
    assert metrics.accuracy(logits, torch.tensor([[1.0], [1.0], [0.0]])) == 0.0  # was 1.0
    assert metrics.accuracy(logits, torch.tensor([[0.0], [0.0], [1.0]])) == 1.0
    assert metrics.accuracy(logits, np.array([0, 1, 1])) == pytest.approx(2 / 3)
    assert metrics.accuracy(logits, pd.DataFrame({"y": [0, 0, 1]}, index=[3, 4, 5])) == 1.0


def test_accuracy_of_one_output_agrees_with_predict_classes():
    model = fnmlp.MLP(3, [fnmlp.Dense(4), fnmlp.Tanh(), fnmlp.Dense(1)])
    params = model.init(generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.randn(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long()
    loss = fnmlp.BinaryCrossEntropyWithLogits()
    classes = model.predict_classes(params, x, loss=loss)
    expected = (classes == y).double().mean().item()
    assert metrics.accuracy(model.apply(params, x), y[:, None].double()) == expected
    assert metrics.accuracy(classes, y) == expected


def test_accuracy_of_several_outputs_takes_the_argmax():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert metrics.accuracy(scores, torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)
    assert metrics.accuracy(scores, torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])) == 1.0
    assert metrics.accuracy(scores, np.array([[1], [0], [1]])) == 1.0  # a column of indices
    one_hot = pd.DataFrame([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], index=[7, 8, 9])
    assert metrics.accuracy(scores.numpy(), one_hot) == pytest.approx(2 / 3)
    assert metrics.accuracy(torch.tensor([1, 0, 1]), torch.tensor([[1.0], [0.0], [1.0]])) == 1.0


@pytest.mark.parametrize("prediction, target, message", [
    (torch.zeros(3, 2), torch.zeros(3, 3), "prediction has 2 columns but the one-hot"),
    (torch.zeros(3, 1), torch.zeros(3, 3), "prediction has 1 columns but the one-hot"),
    (torch.zeros(3, 2, 2), torch.zeros(3), r"prediction must be \(m,\) or \(m, k\)"),
    (torch.zeros(3), torch.zeros(4), "prediction has"),
])
def test_accuracy_refuses_shapes_that_do_not_match(prediction, target, message):
    with pytest.raises(ValueError, match=message):
        metrics.accuracy(prediction, target)


def test_regression_metrics_take_dataframe_and_series_targets():
    from sklearn.metrics import mean_squared_error, r2_score

    prediction = torch.tensor([[1.0], [2.0], [3.0], [4.5]], dtype=torch.float64)
    frame = pd.DataFrame({"y": [1.0, 2.5, 3.0, 4.0]}, index=[3, 4, 5, 6])
    expected = r2_score(frame.to_numpy(), prediction.numpy())
    assert metrics.r2(prediction, frame) == pytest.approx(expected, rel=1e-12)
    assert metrics.r2(prediction, frame["y"]) == pytest.approx(expected, rel=1e-12)
    assert metrics.r2(prediction[:, 0], frame) == pytest.approx(expected, rel=1e-12)
    assert metrics.r2(prediction.numpy(), frame) == pytest.approx(expected, rel=1e-12)
    assert metrics.mean_squared_error(prediction, frame["y"]) == pytest.approx(
        mean_squared_error(frame["y"], prediction.numpy()[:, 0]), rel=1e-12)
    assert metrics.mape(prediction, frame) == pytest.approx(
        np.mean(np.abs((frame.to_numpy() - prediction.numpy()) / frame.to_numpy())), rel=1e-12)


def test_regression_metrics_still_refuse_other_shapes():
    with pytest.raises(ValueError, match=r"prediction has shape \(4, 2\) but target has \(4,\)"):
        metrics.mean_squared_error(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(TypeError, match="target must hold numbers"):
        metrics.r2(torch.zeros(2), np.array(["a", "b"]))
    with pytest.raises(TypeError, match="target must be a tensor"):
        metrics.r2(torch.zeros(2), object())
