"""Many steps per call: a chunk of N steps as one compiled graph (one CUDA graph replay).

Compiling is slow on a CPU: the chunked graphs here are few (the seed step's epoch of 4 steps,
and one small dropout network's chunk of 3), shared through the graph cache.
"""

import pytest
import torch
import torch._dynamo

import fnmlp
from fnmlp.train.engine import Batch, Carry, choose_steps_per_call
from helpers import leaves, relative, seed_data, seed_model


def _seed_batches(x, y, batch_size=333, pad_to=333):
    return [Batch(x[i:i + batch_size], y[i:i + batch_size], None, None,
                  min(batch_size, len(x) - i), pad_to, (True,))
            for i in range(0, len(x), batch_size)]


def _dropout_model() -> fnmlp.MLP:
    return fnmlp.MLP(6, [fnmlp.Dense(16, "tanh", dropout=0.25), fnmlp.Dense(3)])


def _dropout_data(device="cpu"):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64).to(device)
    y = torch.randn(50, 3, generator=g, dtype=torch.float64).to(device)
    return x, y


def _worst(a, b) -> float:
    return max(relative(p, q) for p, q in zip(leaves(a), leaves(b)))


@pytest.mark.slow
def test_a_compiled_chunk_equals_the_eager_steps_with_one_graph_across_epochs(device):
    """The seed epoch (3 full batches and the 1-row tail, padded) as one graph of 4 steps:
    every loss and the parameters within 1e-13 of 4 eager steps, for 3 epochs, with one
    graph (no recompiles)."""
    model = seed_model()
    x, y, _, _ = seed_data(device=device)
    optimizer = fnmlp.sgd(0.01)
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64, device=device)
    compiled = fnmlp.train_step(model, fnmlp.mse, optimizer)
    eager = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False)
    start = Carry(params, optimizer.init(params), model.state_or_default(None, None))
    chunked, stepped = start, start
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            chunked, losses = compiled.run_chunk(chunked, _seed_batches(x, y))
            expected = []
            for batch in _seed_batches(x, y):
                stepped, loss = eager.run(stepped, batch)
                expected.append(loss)
            assert losses.shape == (4,)
            assert relative(losses, torch.stack(expected)) <= 1e-13
            assert _worst(chunked, stepped) <= 1e-13
    assert compiled.executor.graphs.count(chunked=True) == 1


def test_an_eager_chunk_is_the_steps_one_by_one_bit_for_bit():
    model = seed_model()
    x, y, _, _ = seed_data()
    optimizer = fnmlp.adam(1e-3)
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    step = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False)
    start = Carry(params, optimizer.init(params), model.state_or_default(None, None))
    chunked, losses = step.run_chunk(start, _seed_batches(x, y, pad_to=None))
    stepped, expected = start, []
    for batch in _seed_batches(x, y, pad_to=None):
        stepped, loss = step.run(stepped, batch)
        expected.append(loss)
    assert torch.equal(losses, torch.stack(expected))
    assert all(torch.equal(a, b) for a, b in zip(leaves(chunked), leaves(stepped)))


@pytest.mark.slow
def test_chunked_fits_match_step_by_step_fits_with_dropout_and_resume_bit_identically(
        tmp_path, device):
    """fit(steps_per_call=3) against steps_per_call=1, both compiled, with dropout (each
    step's key passed into the chunk) and shuffling: within 1e-13; a chunked fit checkpointed
    and resumed equals the uninterrupted chunked fit bit for bit."""
    model = _dropout_model()
    x, y = _dropout_data(device)
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64, device=device)
    options = dict(epochs=4, batch_size=8, optimizer=fnmlp.sgd(0.05), shuffle=True,
                   compile=True)

    def run(**more):
        return fnmlp.fit(model, params, x, y, generator=torch.Generator().manual_seed(2),
                         **{**options, **more})

    chunked, single = run(steps_per_call=3), run(steps_per_call=1)
    assert _worst(chunked.params, single.params) <= 1e-13
    assert max(abs(a - b) / abs(b) for a, b in zip(chunked.history.train_loss,
                                                   single.history.train_loss)) <= 1e-13
    path = tmp_path / "run.fnmlp"
    run(steps_per_call=3, epochs=2, checkpoint=path)
    resumed = run(steps_per_call=3, checkpoint=path, resume=True)
    assert resumed.history == chunked.history
    assert all(torch.equal(a, b) for a, b in zip(leaves((resumed.params, resumed.opt_state)),
                                                 leaves((chunked.params, chunked.opt_state))))


@pytest.mark.slow
def test_verify_checks_a_whole_chunk_against_the_eager_steps(monkeypatch):
    """verify=True compares the chunk's outputs (every step's loss, the final parameters)
    with the eager steps; a wrong graph is caught."""
    from fnmlp.train import _compile

    model = _dropout_model()
    x, y = _dropout_data()
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    real = _compile.compile_graph

    def off_by_a_little(function, args, **options):
        graph = real(function, args, **options)

        def wrong(*inputs):
            outputs = list(graph(*inputs))
            outputs[-1] = outputs[-1] * (1 + 1e-6)  # one step's loss off
            return outputs
        return wrong

    options = dict(epochs=1, batch_size=8, optimizer=fnmlp.sgd(0.05), compile=True,
                   verify=True, steps_per_call=3, generator=torch.Generator().manual_seed(2))
    fnmlp.fit(model, params, x, y, **options)  # the real compiler passes
    monkeypatch.setattr(_compile, "compile_graph", off_by_a_little)
    with pytest.raises(fnmlp.CompileVerificationError, match="output"):
        fnmlp.fit(model, params, x, y, l2=1e-4, **options)  # a step of its own: compiled anew


def test_chunked_ensemble_fits_equal_step_by_step_ones_eagerly():
    """The ensemble's eager chunk is its steps one by one: the same fit bit for bit."""
    model = fnmlp.MLP(6, [fnmlp.Dense(8, "tanh"), fnmlp.Dense(3)])
    ensemble = fnmlp.Ensemble(model, 3)
    x, y = _dropout_data()
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    options = dict(epochs=2, batch_size=8, optimizer=fnmlp.sgd(0.05), compile=False,
                   bagging=True, generator=None)
    fits = [ensemble.fit(params, x, y, **{**options, "generator": torch.Generator()
                                           .manual_seed(4)}, steps_per_call=n) for n in (1, 4)]
    assert fits[0].history.train_loss == fits[1].history.train_loss
    assert all(torch.equal(a, b) for a, b in zip(leaves(fits[0].params), leaves(fits[1].params)))


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "many", None])
def test_steps_per_call_is_checked_before_any_work(value):
    model = seed_model()
    x, y, _, _ = seed_data()
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match="steps_per_call must be 'auto' or an integer >= 1"):
        fnmlp.fit(model, params, x, y, epochs=1, batch_size=333, optimizer=fnmlp.sgd(0.01),
                  steps_per_call=value)


def test_steps_per_call_auto_chunks_compiled_cuda_steps_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_steps_per_call("auto", compiled=True, device=cpu, batches=4) == 1
    assert choose_steps_per_call("auto", compiled=False, device=cuda, batches=4) == 1
    assert choose_steps_per_call("auto", compiled=True, device=cuda, batches=4) == 4
    assert choose_steps_per_call("auto", compiled=True, device=cuda, batches=100) == 8
    assert choose_steps_per_call(16, compiled=False, device=cpu, batches=4) == 4


def test_a_captured_cuda_step_never_overwrites_what_it_returned(device):
    """fnmlp's own CUDA graph: passing back what a step returned copies nothing in, passing
    anything else copies it in, and what was returned before stays as it was, also when two
    steps share the graph."""
    if device != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    model = seed_model()
    x, y, _, _ = seed_data(device=device)
    xb, yb = x[:333], y[:333]
    optimizer = fnmlp.sgd(0.01)
    p0 = model.init(torch.Generator().manual_seed(0), dtype=torch.float64, device=device)
    s0 = optimizer.init(p0)
    a = fnmlp.train_step(model, fnmlp.mse, optimizer)
    b = fnmlp.train_step(model, fnmlp.mse, optimizer)
    eager = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False)
    p1, s1, _ = a(p0, s0, xb, yb)
    kept = [t.clone() for t in leaves((p1, s1))]
    p2, s2, _ = a(p1, s1, xb, yb)  # passed back: nothing copied in
    q1, _, _ = b(p0, s0, xb, yb)  # the same graph, another carry copied in
    p3, _, _ = a(p2, s2, xb, yb)  # a's last outputs, but the graph now holds b's
    assert all(torch.equal(t, k) for t, k in zip(leaves((p1, s1)), kept))
    assert all(torch.equal(t, u) for t, u in zip(leaves(q1), leaves(p1)))
    e1, f1, _ = eager(p0, s0, xb, yb)
    e2, f2, _ = eager(e1, f1, xb, yb)
    e3, _, _ = eager(e2, f2, xb, yb)
    assert _worst(p3, e3) <= 1e-13
    assert a.executor.graphs is b.executor.graphs and a.executor.graphs.count() == 1
