"""The compiled training step: one graph, no recompiles, and parity with eager and the twin.

Compiling is slow on a CPU, so these tests share a few compiled steps (``fnmlp.train_step``
caches them per spec) and keep their number small.
"""

import pytest
import torch
import torch._dynamo

import fnmlp
from helpers import leaves, relative, seed_data, seed_model, twin_step

LR = 0.01
# The seed run is chaotic at lr 0.01 and, past epoch ~17, at 0.001 too: a last-bit difference
# grows to 1e-9 by epoch ~24. At 3e-4 it stays at the rounding level over all 32 epochs.
WELL_CONDITIONED_LR = 3e-4


def _seed_batches(x, y, epochs=32, batch_size=333):
    for _ in range(epochs):
        for start in range(0, len(x), batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]


def _worst(a_leaves, b_leaves):
    return max(relative(a, b) for a, b in zip(a_leaves, b_leaves))


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["inductor", "dynamo"])
def test_every_seed_step_compiled_matches_eager_and_twin(compiler, device):
    """At each of the seed run's 128 steps (the 1-sample tail batch included), restart from the
    twin's parameters; the compiled step agrees with the eager step and the twin to 1e-13, with
    one graph for the whole run."""
    model = seed_model()
    x, y, _, _ = seed_data(device=device)
    optimizer = fnmlp.sgd(LR)
    compiled = fnmlp.train_step(model, fnmlp.mse, optimizer, compiler=compiler)
    eager = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False)
    twin = fnmlp.to_torch(model, model.init(torch.Generator().manual_seed(0),
                                            dtype=torch.float64, device=device))
    worst = {"eager": 0.0, "twin": 0.0}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for xb, yb in _seed_batches(x, y):
            _, params, _ = fnmlp.from_torch(twin)
            state = optimizer.init(params)
            new_c, _, loss_c = compiled(params, state, xb, yb)
            new_e, _, loss_e = eager(params, state, xb, yb)
            twin_loss, _ = twin_step(twin, xb, yb, LR)
            ours = leaves(new_c) + [loss_c]
            worst["eager"] = max(worst["eager"], _worst(ours, leaves(new_e) + [loss_e]))
            worst["twin"] = max(worst["twin"], _worst(
                ours, [p.detach() for p in twin.parameters()] + [twin_loss]))
    assert worst["eager"] <= 1e-13 and worst["twin"] <= 1e-13, worst
    # the short last batch was padded into the same graph
    assert compiled.executor.graphs.count() == 1


@pytest.mark.slow
def test_compiled_fit_through_dynamo_has_no_recompiles_and_matches_eager_fit(device):
    """A whole fit compiled by dynamo (fit(compiler="dynamo"), fullgraph=True) fails on any
    recompile: none for the tail batch, new epochs, a changed learning rate or more steps."""
    model = seed_model()
    x, y, xv, yv = seed_data(device=device)
    params = model.init(torch.Generator().manual_seed(1), dtype=torch.float64, device=device)
    optimizer = fnmlp.sgd(WELL_CONDITIONED_LR)
    step = fnmlp.train_step(model, fnmlp.mse, optimizer, compiler="dynamo")
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = fnmlp.fit(model, params, x, y, epochs=32, batch_size=333,
                             optimizer=optimizer, valid=(xv, yv), compile=True,
                             compiler="dynamo")
        state = optimizer.with_learning_rate(compiled.opt_state, 1e-4)
        for xb, yb in _seed_batches(x, y, epochs=1):
            step(compiled.params, state, xb, yb)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 1  # 0: compiled before
    # fit ran on the dynamo graph this step holds (one for every batch and call)
    from fnmlp.train import _compile
    assert _compile.resolve_compiler(step.executor.compiler, x.device) == "dynamo"
    assert step.executor.graphs.count() == 1
    eager = fnmlp.fit(model, params, x, y, epochs=32, batch_size=333, optimizer=optimizer,
                      valid=(xv, yv))
    for a, b in [(compiled.history.train_loss, eager.history.train_loss),
                 (compiled.history.valid_loss, eager.history.valid_loss)]:
        assert max(abs(p - q) / abs(q) for p, q in zip(a, b)) <= 1e-9
    assert _worst(leaves(compiled.params), leaves(eager.params)) <= 1e-9


@pytest.mark.slow
def test_compiled_steps_are_shared_and_the_learning_rate_is_an_input():
    model = seed_model()
    a = fnmlp.train_step(model, fnmlp.mse, fnmlp.sgd(0.01))
    b = fnmlp.train_step(seed_model(), fnmlp.mse, fnmlp.sgd(0.5), verify=True)
    assert a.executor.graphs is b.executor.graphs  # the graphs are shared ...
    # ... and verifying one step changes no other
    assert b.executor._verify_next and not a.executor._verify_next
    x, y, _, _ = seed_data()
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    small = a(params, fnmlp.sgd(0.01).init(params), x[:333], y[:333])[0]
    large = a(params, fnmlp.sgd(0.5).init(params), x[:333], y[:333])[0]
    keyed = a(params, fnmlp.sgd(0.5).init(params), x[:333], y[:333],
              key=fnmlp.dropout_key(0, 1))[0]  # a key for a model without dropout draws nothing
    assert a.executor.graphs.count() == 1
    assert all(torch.equal(k, m) for k, m in zip(leaves(keyed), leaves(large)))
    ratio = (large[0].weight - params[0].weight) / (small[0].weight - params[0].weight)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 50.0))


@pytest.mark.slow
def test_verify_catches_a_miscompiled_step(monkeypatch):
    """verify=True runs the first step both ways; a compiler that drops the update's scale
    (inductor has dropped the alpha of an add over a matmul) is caught before training goes on."""
    from fnmlp.train import _compile

    model = seed_model()
    x, y, _, _ = seed_data()
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    optimizer = fnmlp.sgd(LR)
    step = fnmlp.train_step(model, fnmlp.mse, optimizer, verify=True)
    step.executor.graphs = _compile.Graphs()  # not the shared cache

    def miscompile(function, args, **options):
        def wrong(*inputs):  # p + g instead of p - lr * g
            state = optimizer.init(params)
            value, grads = model.value_and_grad(params, x[:333], y[:333])
            new = [p + g for p, g in zip(leaves(params), leaves(grads))]
            return [*new, state.step + 1, state.learning_rate, value]
        return wrong

    monkeypatch.setattr(_compile, "compile_graph", miscompile)
    with pytest.raises(fnmlp.CompileVerificationError, match="compile=False"):
        step(params, optimizer.init(params), x[:333], y[:333])
    monkeypatch.undo()
    good = fnmlp.train_step(model, fnmlp.mse, optimizer, verify=True)
    good(params, optimizer.init(params), x[:333], y[:333])  # the real compiler passes


def test_compiled_step_checks_its_input():
    model = seed_model()
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    optimizer = fnmlp.sgd(LR)
    step = fnmlp.train_step(model, fnmlp.mse, optimizer)
    x = torch.zeros(4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="x has 5 features but the model expects 6"):
        step(params, optimizer.init(params), x, torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="compiler must be one of"):
        fnmlp.train_step(model, fnmlp.mse, optimizer, compiler="xla")


@pytest.mark.slow
def test_every_activation_compiles_into_one_graph_with_a_padded_tail():
    """The activations and a loss beyond the seed's, compiled: equal to eager, the short last
    batch padded into the same graph."""
    model = fnmlp.MLP(5, [fnmlp.Dense(8, "leaky_relu"), fnmlp.Dense(8, "elu"),
                          fnmlp.Dense(8, "silu"), fnmlp.Dense(8, fnmlp.Softplus(2.0, 5.0)),
                          fnmlp.Dense(8, "gelu_tanh"), fnmlp.Dense(4, "log_softmax")])
    g = torch.Generator().manual_seed(0)
    params = model.init(g, dtype=torch.float64)
    x = torch.randn(23, 5, generator=g, dtype=torch.float64)
    y = torch.randn(23, 4, generator=g, dtype=torch.float64)
    optimizer = fnmlp.sgd(0.1, momentum=0.9)
    loss = fnmlp.Huber(delta=0.5)
    compiled = fnmlp.train_step(model, loss, optimizer, compiler="inductor")
    eager = fnmlp.train_step(model, loss, optimizer, compile=False)
    state = optimizer.init(params)
    for start in (0, 10, 20):  # batches of 10, 10 and 3
        xb, yb = x[start:start + 10], y[start:start + 10]
        new_c, _, loss_c = compiled(params, state, xb, yb)
        params, state, loss_e = eager(params, state, xb, yb)
        assert _worst(leaves(new_c) + [loss_c], leaves(params) + [loss_e]) <= 1e-13
    assert compiled.executor.graphs.count() == 1


@pytest.mark.slow
@pytest.mark.parametrize("loss, optimizer", [
    (fnmlp.nn.binary_cross_entropy_with_logits,
     fnmlp.adagrad(fnmlp.schedules.step_decay(0.1, step_size=2, gamma=0.5))),
    (fnmlp.L1("sum"), fnmlp.rmsprop(fnmlp.schedules.linear_warmup(0.01, warmup_steps=3))),
])
def test_remaining_losses_and_schedules_compile_without_recompiles(loss, optimizer):
    model = fnmlp.MLP(3, [fnmlp.Dense(4, "tanh"), fnmlp.Dense(2)])
    g = torch.Generator().manual_seed(0)
    params = model.init(g, dtype=torch.float64)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64)
    y = torch.rand(9, 2, generator=g, dtype=torch.float64)
    compiled = fnmlp.train_step(model, loss, optimizer, compiler="inductor")
    eager = fnmlp.train_step(model, loss, optimizer, compile=False)
    state = optimizer.init(params)
    for start in (0, 4, 8, 0, 4, 8):  # batches of 4, 4 and 1, twice: the rate changes each step
        xb, yb = x[start:start + 4], y[start:start + 4]
        new_c, _, loss_c = compiled(params, state, xb, yb)
        params, state, loss_e = eager(params, state, xb, yb)
        assert _worst(leaves(new_c) + [loss_c], leaves(params) + [loss_e]) <= 1e-13
    assert compiled.executor.graphs.count() == 1


def test_direct_calls_pad_only_to_a_nearby_compiled_size():
    from fnmlp.train._compile import BatchPadding

    padding = BatchPadding()
    f64, f32, cpu = torch.float64, torch.float32, torch.device("cpu")
    assert padding.size_for(5000, f64, cpu) == 5000
    assert padding.size_for(333, f64, cpu) == 333
    assert padding.size_for(1, f64, cpu) == 333  # the seed's tail reuses the full batch
    assert padding.size_for(3000, f64, cpu) == 5000
    assert padding.size_for(10, f32, cpu) == 10  # sizes are per dtype and device
    padding.size_for(100_000, f64, cpu)
    assert padding.size_for(20_000, f64, cpu) == 20_000  # 5x padding: a graph of its own


def test_verification_compares_non_finite_values_and_zeros_sensibly():
    from fnmlp.train._compile import relative_difference as _relative_difference

    nan, inf = float("nan"), float("inf")
    a = torch.tensor([1.0, nan, inf, -inf], dtype=torch.float64)
    assert _relative_difference(a.clone(), a) == 0.0
    assert _relative_difference(torch.tensor([1.0, 0.0, inf, -inf], dtype=torch.float64),
                                a) == float("inf")
    assert _relative_difference(torch.tensor([1.0, nan, inf, inf], dtype=torch.float64),
                                a) == float("inf")
    zeros = torch.zeros(3, dtype=torch.float64)
    assert _relative_difference(zeros + 1e-30, zeros) < 1e-9  # no division by zero
    assert _relative_difference(zeros + 1e-6, zeros) > 1e-9
    assert _relative_difference(torch.tensor(3), torch.tensor(3)) == 0.0
    assert _relative_difference(torch.tensor(4), torch.tensor(3)) == float("inf")
    difference = _relative_difference(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
    assert difference == pytest.approx(0.2)


def test_a_captured_graphs_slots_hold_each_dtype_in_one_buffer_and_copy_out_fresh():
    """A CUDA graph's static leaves: one flat buffer per dtype, the leaves views of it; what a
    replay returns is one fresh clone per dtype (a later replay never overwrites it)."""
    from fnmlp.train._cuda_graph import _Slots

    like = [torch.randn(3, 2, dtype=torch.bfloat16), torch.tensor(0.5),
            torch.arange(4, dtype=torch.int64), torch.randn(2, dtype=torch.bfloat16)]
    slots = _Slots(like, torch.device("cpu"))
    assert [b.dtype for b in slots.buffers] == [torch.bfloat16, torch.float32, torch.int64]
    torch._foreach_copy_(slots.views, like)
    copies = slots.fresh()
    for copy, view, tensor in zip(copies, slots.views, like):
        assert copy.dtype == tensor.dtype and torch.equal(copy, tensor)
        assert copy.data_ptr() != view.data_ptr()
    slots.views[0].zero_()
    assert torch.equal(copies[0], like[0])


def test_the_compiled_graph_sums_softmax_rows_plainly():
    """The eager step's exact softmax backward (autograd's ATen kernel, for bit identity)
    stays out of compiled graphs: the traced step holds one plain row sum per softmax."""
    from fnmlp._tree import flatten
    from fnmlp.train import _compile
    from fnmlp.train._executor import TRACED, flat_function
    from fnmlp.train._step import network_step

    model = fnmlp.MLP(3, [fnmlp.Dense(37, "softmax"), fnmlp.Dense(2)])
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    optimizer = fnmlp.sgd(0.1)
    leaves_, spec = flatten((params, optimizer.init(params), model.init_state()))
    function = flat_function(network_step(model, fnmlp.mse, optimizer, 0.0, TRACED), spec,
                             len(leaves_), [True, True, True, False])
    x, y = torch.zeros(8, 3, dtype=torch.float64), torch.zeros(8, 2, dtype=torch.float64)
    graph, _ = _compile.trace(function, [*leaves_, x, y, torch.ones(8, dtype=torch.float64)])
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert not any("cat" in t or "slice" in t or "softmax_backward" in t for t in targets), targets
    assert any("sum" in t for t in targets)


@pytest.mark.slow
def test_the_private_compiler_api_falls_back_to_torch_compile(monkeypatch):
    """If torch's private inductor entry points change, the step compiles through the public
    torch.compile(..., options=...) with the same C++ wrapper options, and agrees with eager."""
    from fnmlp.train import _compile

    def missing(function, args, options):
        raise AttributeError("module 'torch._inductor' has no attribute 'compile'")

    monkeypatch.setattr(_compile, "_compile_with_inductor", missing)
    model = fnmlp.MLP(3, [fnmlp.Dense(4, "tanh"), fnmlp.Dense(2)])
    g = torch.Generator().manual_seed(0)
    params = model.init(g, dtype=torch.float64)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, 2, generator=g, dtype=torch.float64)
    optimizer = fnmlp.adam(0.01)
    step = fnmlp.train_step(model, fnmlp.mse, optimizer, compiler="inductor")
    step.executor.graphs = _compile.Graphs()  # not the shared cache
    with pytest.warns(RuntimeWarning, match="torch.compile"):
        new_c, state_c, loss_c = step(params, optimizer.init(params), x, y)
    new_e, state_e, loss_e = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False)(
        params, optimizer.init(params), x, y)
    assert _worst(leaves(new_c) + [loss_c], leaves(new_e) + [loss_e]) <= 1e-13


def test_the_step_cache_is_bounded():
    from fnmlp.train import _compile

    kept = _compile.shared_graphs(("a test", 1))
    for width in range(2, 2 + _compile._CACHE_SIZE):
        _compile.shared_graphs(("a test", width))
    assert len(_compile._SHARED) == _compile._CACHE_SIZE
    assert kept not in _compile._SHARED.values()  # the least recently used went first


def test_import_loads_no_compiler():
    """``import fnmlp`` imports neither torch._dynamo nor torch._inductor (they take seconds)."""
    import subprocess
    import sys

    code = ("import sys, fnmlp; print(sorted(m for m in sys.modules "
            "if m.startswith(('torch._dynamo', 'torch._inductor'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", out
