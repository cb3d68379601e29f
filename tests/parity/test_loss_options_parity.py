"""Loss options through training: fnmlp.fit with class weights, an ignored class, label
smoothing and row weights equals its torch.nn twin step by step."""

import torch

import fnmlp
from helpers import leaves, relative

F64 = torch.float64


def test_the_twin_trains_with_class_weights_and_ignored_rows_like_fnmlp():
    model = fnmlp.MLP(5, [fnmlp.Dense(6, "relu"), fnmlp.Dense(4)])
    params = model.init(torch.Generator().manual_seed(2), dtype=F64)
    loss = fnmlp.CrossEntropy(weight=(0.5, 2.0, 1.0, 0.25), ignore_index=3, label_smoothing=0.1)
    optimizer = fnmlp.adam(0.01)
    twin = fnmlp.TorchTwin(model, params, optimizer=optimizer, loss=loss)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    labels = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(4))
    weight = torch.rand(16, generator=torch.Generator().manual_seed(5), dtype=F64)
    result = fnmlp.fit(model, params, x, labels, epochs=3, batch_size=8, optimizer=optimizer,
                       loss=loss, sample_weight=weight)
    for _ in range(3):
        for start in (0, 8):
            twin.step(x[start:start + 8], labels[start:start + 8],
                      sample_weight=weight[start:start + 8])
    assert max(relative(a, b) for a, b in zip(leaves(result.params), leaves(twin.params()))) \
        <= 1e-12
