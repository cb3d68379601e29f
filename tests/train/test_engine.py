"""The one training engine: every kind of step through one loop and one graph cache, routing by
model kind at the top, and what each kind gained from the others (ensemble checkpoints and
resume, callbacks, progress; verify and threads for ensembles)."""

import ast
import pathlib

import pytest
import torch
from helpers import leaves, relative

import fnmlp
from fnmlp.train import _compile

F64 = torch.float64


def _data(rows=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 6, generator=g, dtype=F64)
    return x, torch.tanh(x[:, :3]) + 0.1 * torch.randn(rows, 3, generator=g, dtype=F64)


def _ensemble(size=3, dropout=False):
    layers = [fnmlp.Dense(8, "tanh")] + ([fnmlp.Dropout(0.2)] if dropout else []) + \
        [fnmlp.Dense(3)]
    ensemble = fnmlp.Ensemble(fnmlp.MLP(6, layers), size=size)
    return ensemble, ensemble.init(torch.Generator().manual_seed(1), dtype=F64)


def _leaves(tree):
    return torch.utils._pytree.tree_leaves(tree)


def _equal(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(_leaves(a), _leaves(b)))


def test_routing_by_model_kind_refuses_what_is_not_an_fnmlp_model():
    x, y = _data()
    with pytest.raises(TypeError, match="from_torch"):
        fnmlp.fit(torch.nn.Linear(6, 3), None, x, y, epochs=1, batch_size=8,
                  optimizer=fnmlp.sgd(0.1))
    with pytest.raises(TypeError, match="from_torch"):
        fnmlp.train_step(torch.nn.Linear(6, 3), fnmlp.mse, fnmlp.sgd(0.1))
    ensemble, params = _ensemble()
    with pytest.raises(TypeError, match="Ensemble.fit"):
        fnmlp.train.fit(ensemble, params, x, y, epochs=1, batch_size=8,
                        optimizer=fnmlp.sgd(0.1))


def test_train_step_of_an_ensemble_steps_every_member():
    x, y = _data()
    ensemble, params = _ensemble()
    optimizer = fnmlp.sgd(0.05)
    step = fnmlp.train_step(ensemble, fnmlp.mse, optimizer, compile=False)
    opt_state = ensemble.init_optimizer(optimizer, params)
    new, _, losses = step(params, opt_state, x, y)
    assert losses.shape == (3,)
    member = fnmlp.train_step(ensemble.model, fnmlp.mse, optimizer, compile=False)
    for i in range(3):
        alone, _, value = member(ensemble.member(params, i),
                                 optimizer.init(ensemble.member(params, i)), x, y)
        for a, b in zip(leaves(ensemble.member(new, i)), leaves(alone)):
            assert relative(a, b) <= 1e-13


def test_ensemble_checkpoint_resume_is_bit_identical(tmp_path):
    """A fit killed after 3 epochs and resumed equals the uninterrupted fit, bit for bit,
    with shuffling, bagging, dropout and per-member early stopping."""
    x, y = _data()
    ensemble, params = _ensemble(dropout=True)
    options = dict(batch_size=32, optimizer=fnmlp.adam(1e-2), shuffle=True, bagging=True,
                   valid=(x[:32], y[:32]), patience=2, restore_best=True, compile=False)
    whole = ensemble.fit(params, x, y, epochs=6, generator=torch.Generator().manual_seed(5),
                         **options)
    path = tmp_path / "ensemble.fnmlp"
    ensemble.fit(params, x, y, epochs=3, generator=torch.Generator().manual_seed(5),
                 checkpoint=path, **options)
    resumed = ensemble.fit(params, x, y, epochs=6, generator=torch.Generator().manual_seed(7),
                           checkpoint=path, resume=True, **options)
    assert _equal(resumed.params, whole.params)
    assert _equal(resumed.opt_state, whole.opt_state)
    assert resumed.history == whole.history
    loaded = fnmlp.load(path)
    assert loaded.model == ensemble and _equal(loaded.params, resumed.params) is not None


def test_ensemble_fit_calls_back_reports_progress_and_stops(capsys):
    x, y = _data()
    ensemble, params = _ensemble()
    seen = []

    def on_epoch_end(epoch, logs):
        seen.append((epoch, logs["train_loss"]))
        return epoch == 1

    result = fnmlp.fit(ensemble, params, x, y, epochs=5, batch_size=32,
                       optimizer=fnmlp.sgd(0.05), on_epoch_end=on_epoch_end, progress=True,
                       verbose=True, compile=False)
    assert [epoch for epoch, _ in seen] == [0, 1]
    assert len(seen[0][1]) == 3 and len(result.history.train_loss) == 2
    captured = capsys.readouterr()
    assert "epoch 2/5  loss min " in captured.out and "median" in captured.out
    assert "epoch" in captured.err  # tqdm's bar


def test_one_graph_cache_serves_every_kind_of_step():
    """Single networks and ensembles keep their graphs in the same LRU; verify and threads
    work for an ensemble too."""
    x, y = _data()
    ensemble, params = _ensemble(size=2)
    optimizer = fnmlp.sgd(0.05)
    step = ensemble.train_step(fnmlp.mse, optimizer, compile=True, verify=True, threads=1)
    opt_state = ensemble.init_optimizer(optimizer, params)
    step(params, opt_state, x, y)
    kinds = {identity[0] for identity in _compile._SHARED}
    assert "ensemble" in kinds
    assert step.executor.graphs is _compile.shared_graphs(step.executor.identity)
    assert not step.executor._verify_next  # the first compiled call was verified


def test_the_loop_reads_the_losses_once_per_epoch(monkeypatch):
    """One sync for the epoch's losses, however many batches (``Tensor.tolist`` counted)."""
    x, y = _data(rows=200)
    model = fnmlp.MLP(6, [fnmlp.Dense(8, "tanh"), fnmlp.Dense(3)])
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    calls = []
    original = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: calls.append(1) or original(t))
    fnmlp.fit(model, params, x, y, epochs=2, batch_size=10, optimizer=fnmlp.sgd(0.01),
              compile=False)
    assert len(calls) == 0  # 20 batches an epoch, no per-step sync


LAYERS = ["nn", "optim", "interop", "train", "ensemble", "distributed", "sklearn"]


def test_layers_point_down():
    """No subpackage imports a higher one, nor another one's private modules or names (read
    from the source: ``import fnmlp`` loads them all). ``ensemble`` and ``distributed`` stand
    side by side; routing by model kind happens in ``fnmlp._entry``, at the top; the root's
    own ``_tree``, ``_validate``, ``_registry`` and ``_errors`` are the bottom layer."""
    root = pathlib.Path(fnmlp.__file__).parent
    rank = {name: i for i, name in enumerate(LAYERS)}
    rank["distributed"] = rank["ensemble"]
    for package in LAYERS:
        for path in (root / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and \
                        node.module.startswith("fnmlp."):
                    parts = node.module.split(".")
                    target = parts[1]
                    if target in rank and target != package:
                        assert rank[target] < rank[package], f"{path.name} imports {target}"
                        # another package's private modules and names stay private
                        private = [n.name for n in node.names if n.name.startswith("_")]
                        assert len(parts) == 2 or not parts[2].startswith("_"), \
                            f"{package}/{path.name} imports {node.module}"
                        assert not private, f"{package}/{path.name} imports {private}"


def test_a_non_finite_loss_is_found_at_the_epoch_end_and_replayed_to_the_last_finite_step():
    """The losses are read once per epoch; the error still names the batch and carries the
    parameters before it, as stepping one by one gives them."""
    x, y = _data(rows=64)
    y = y * 1e3
    model = fnmlp.MLP(6, [fnmlp.Dense(8, "relu"), fnmlp.Dense(3)])
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    optimizer = fnmlp.sgd(10.0)
    with pytest.raises(fnmlp.NonFiniteLossError) as caught:
        fnmlp.fit(model, params, x, y, epochs=3, batch_size=8, optimizer=optimizer,
                  compile=False)
    error = caught.value
    step = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False)
    p, s = params, optimizer.init(params)
    steps = error.epoch * 8 + (error.batch if error.batch is not None else 7)
    for i in range(steps):
        start = (i % 8) * 8
        candidate, s2, value = step(p, s, x[start:start + 8], y[start:start + 8])
        p, s = candidate, s2
    finite = all(bool(t.isfinite().all()) for t in _leaves(p))
    if finite:
        assert _equal(error.params, p)


def test_trees_passed_back_are_not_flattened_again(monkeypatch):
    """A compiled step given back the trees it returned (a stateless model too) skips the
    flatten and the checks: the per-step fast path (the compiler stubbed out: the graph is
    the traced function run eagerly)."""
    from fnmlp.train import _compile, _executor

    monkeypatch.setattr(_compile, "compile_graph", lambda function, args, **options: function)
    calls = []
    flatten = _executor.flatten
    monkeypatch.setattr(_executor, "flatten", lambda tree: calls.append(1) or flatten(tree))
    x, y = _data(rows=16)
    model = fnmlp.MLP(6, [fnmlp.Dense(8, "tanh"), fnmlp.Dense(3)])
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    optimizer = fnmlp.sgd(0.01)
    step = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=True)
    step.executor.graphs = _compile.Graphs()
    p, s, _ = step(params, optimizer.init(params), x, y)
    first = len(calls)
    for _ in range(3):
        p, s, _ = step(p, s, x, y)
    traced_per_step = 1  # the flat function flattens its outputs once per call
    assert len(calls) - first == 3 * traced_per_step


@pytest.mark.parametrize("epochs", [1, 3])
def test_an_overflow_in_an_epochs_last_step_is_found_without_a_check_every_epoch(epochs):
    """The parameters are not checked after every epoch: an overflow in an epoch's last step
    shows in the next epoch's first loss (or in the check at the fit's end), and the error is
    the same: that epoch named, its history undone, the parameters before the update."""
    model = fnmlp.MLP(2, [fnmlp.Linear(1)])  # float32: one update by 1e36 overflows
    params = model.init(torch.Generator().manual_seed(0))
    x, y = torch.ones(4, 2), torch.full((4, 1), 1e3)
    with pytest.raises(fnmlp.NonFiniteLossError, match="last step of epoch 0") as info:
        fnmlp.fit(model, params, x, y, epochs=epochs, batch_size=4, optimizer=fnmlp.sgd(1e36))
    error = info.value
    assert error.epoch == 0 and error.batch is None and error.history.train_loss == []
    assert int(error.opt_state.step) == 0 and _equal(error.params, params)
