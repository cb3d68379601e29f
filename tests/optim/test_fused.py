"""``unchecked_update(..., fused=True)``: torch's fused CPU kernels, chosen by the caller and
applied where the tensors allow, within rounding of the per-leaf formulas (``fused=False``),
which trace anywhere; no update mutates what it is given."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fnmlp
from fnmlp.optim import _fused
from helpers import leaves, relative

F64 = torch.float64
S = fnmlp.schedules

FUSABLE = {
    "adam": fnmlp.adam(0.01),
    "adam-wd-amsgrad": fnmlp.adam(0.01, betas=(0.8, 0.99), weight_decay=0.01, amsgrad=True),
    "adam-maximize": fnmlp.adam(0.01, maximize=True, weight_decay=0.01),
    "adam-cosine": fnmlp.adam(S.cosine(0.01, 20)),
    "adamw": fnmlp.adamw(0.01, weight_decay=0.1),
    "adamw-amsgrad": fnmlp.adamw(0.01, eps=1e-6, amsgrad=True),
    "sgd-momentum": fnmlp.sgd(0.05, momentum=0.9),
    "sgd-dampening-wd": fnmlp.sgd(0.05, momentum=0.8, dampening=0.3, weight_decay=0.01),
    "sgd-nesterov": fnmlp.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.001),
    "sgd-maximize": fnmlp.sgd(0.05, momentum=0.9, maximize=True),
    "clipped-adam": fnmlp.clip_by_global_norm(fnmlp.adam(0.01), 0.5),
}
NOT_FUSABLE = {  # no fused kernel: fused=True runs the formulas
    "sgd": fnmlp.sgd(0.05),
    "rmsprop-centered-momentum": fnmlp.rmsprop(0.005, alpha=0.9, momentum=0.5, centered=True),
    "adagrad": fnmlp.adagrad(0.05, lr_decay=0.01),
}
KERNELS = ("_fused_adam_", "_fused_adamw_", "_fused_sgd_")


def _problem(dtype=F64, seed=0):
    model = fnmlp.MLP(5, [fnmlp.Dense(8, "tanh"), fnmlp.Dense(6, "sigmoid"), fnmlp.Dense(3)])
    g = torch.Generator().manual_seed(seed)
    params = model.init(g, dtype=dtype)
    x = torch.randn(40, 5, generator=g, dtype=dtype)
    y = torch.randn(40, 3, generator=g, dtype=dtype)
    return model, params, x, y


def _grads(model, params, x, y, step=0):
    return model.value_and_grad(params, x[step % 5 * 8:][:8], y[step % 5 * 8:][:8])[1]


@pytest.fixture
def kernel_calls(monkeypatch):
    """The number of calls of torch's fused optimizer kernels so far (a list, one entry each)."""
    calls = []
    for kernel in KERNELS:
        original = getattr(torch, kernel)
        monkeypatch.setattr(torch, kernel, lambda *a, _k=original, **k: calls.append(1) or
                            _k(*a, **k))
    return calls


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8).clone()


def _same_bits(a, b) -> bool:
    return all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(_bits(x), _bits(y))
               for x, y in zip(leaves(a), leaves(b), strict=True))


@pytest.mark.parametrize("dtype, tolerance", [(F64, 1e-15), (torch.float32, 1e-6)])
@pytest.mark.parametrize("name", list(FUSABLE))
def test_fused_kernels_match_the_formulas(name, dtype, tolerance, kernel_calls):
    """Each of 20 steps, from the same params and state, fused=True (one kernel call) agrees
    with fused=False (no kernel call) within rounding, parameters and every buffer."""
    optimizer = FUSABLE[name]
    model, params, x, y = _problem(dtype)
    state = optimizer.init(params)
    with torch.no_grad():
        for step in range(20):
            grads = _grads(model, params, x, y, step)
            fused = optimizer.unchecked_update(params, grads, state, fused=True)
            assert len(kernel_calls) == step + 1
            formula = optimizer.unchecked_update(params, grads, state, fused=False)
            assert len(kernel_calls) == step + 1
            for a, b in zip(leaves(fused), leaves(formula), strict=True):
                assert a.dtype == b.dtype and a.shape == b.shape
                assert relative(a, b) <= tolerance, (step, relative(a, b))
            params, state = fused
    assert state.step.item() == 20


@pytest.mark.parametrize("name", list(NOT_FUSABLE))
def test_optimizers_without_a_kernel_ignore_fused(name, kernel_calls):
    optimizer = NOT_FUSABLE[name]
    model, params, x, y = _problem()
    grads = _grads(model, params, x, y)
    state = optimizer.init(params)
    fused = optimizer.unchecked_update(params, grads, state, fused=True)
    assert _same_bits(fused, optimizer.unchecked_update(params, grads, state))
    assert not kernel_calls


def test_update_is_checked_and_runs_the_formulas_unless_asked(kernel_calls):
    optimizer = fnmlp.adam(0.01)
    model, params, x, y = _problem()
    grads = _grads(model, params, x, y)
    state = optimizer.init(params)
    plain = optimizer.update(params, grads, state)
    assert not kernel_calls
    assert _same_bits(plain, optimizer.unchecked_update(params, grads, state, fused=False))
    fused = optimizer.update(params, grads, state, fused=True)
    assert len(kernel_calls) == 1
    assert _same_bits(fused, optimizer.unchecked_update(params, grads, state, fused=True))
    with pytest.raises(ValueError, match="grads"):
        optimizer.update(params, grads[:2], state, fused=True)


def _strided(params, grads):
    """The first weight and its gradient as transposed views (same values, not contiguous)."""
    first = params[0]
    weight = first.weight.t().contiguous().t()
    assert not weight.is_contiguous() and torch.equal(weight, first.weight)
    return (fnmlp.nn.LinearParams(weight, first.bias), *params[1:]), grads


def _strided_grad(params, grads):
    first = grads[0]
    weight = first.weight.t().contiguous().t()
    return params, (fnmlp.nn.LinearParams(weight, first.bias), *grads[1:])


def _half(params, grads):
    return fnmlp._tree.tree_map(lambda t: t.half(), (params, grads))


def _mixed_dtypes(params, grads):
    first, grad = params[0], grads[0]
    return ((fnmlp.nn.LinearParams(first.weight.float(), first.bias), *params[1:]),
            (fnmlp.nn.LinearParams(grad.weight.float(), grad.bias), *grads[1:]))


def _parameter(params, grads):  # a subclass: not a plain tensor
    first = params[0]
    return ((fnmlp.nn.LinearParams(torch.nn.Parameter(first.weight.clone()), first.bias),
             *params[1:]), grads)


def _recording(params, grads):
    return fnmlp._tree.tree_map(lambda t: t.clone().requires_grad_(True), params), grads


@pytest.mark.parametrize("make", [_strided, _strided_grad, _half, _mixed_dtypes, _parameter,
                                  _recording], ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("name", ["adam", "adamw-amsgrad", "sgd-nesterov"])
def test_fused_on_tensors_the_kernels_cannot_take_runs_the_formulas(name, make, kernel_calls):
    """A transposed weight or gradient, float16, mixed dtypes, an ``nn.Parameter``, or
    parameters requiring grad while grad mode is on: fused=True silently takes the formulas and
    gives exactly their results."""
    optimizer = FUSABLE[name]
    model, params, x, y = _problem()
    params, grads = make(params, _grads(model, params, x, y))
    state = optimizer.init(params)
    with torch.enable_grad():
        fused = optimizer.unchecked_update(params, grads, state, fused=True)
        formula = optimizer.unchecked_update(params, grads, state, fused=False)
    assert not kernel_calls
    assert _same_bits(fused, formula)
    if make is _recording:  # the formulas record history, as without fused
        assert fused[0][0].weight.requires_grad


def test_parameters_requiring_grad_are_fused_outside_grad_mode(kernel_calls):
    optimizer = fnmlp.adam(0.01)
    model, params, x, y = _problem()
    grads = _grads(model, params, x, y)
    params = fnmlp._tree.tree_map(lambda t: t.clone().requires_grad_(True), params)
    with torch.no_grad():
        new, _ = optimizer.unchecked_update(params, grads, optimizer.init(params), fused=True)
    assert len(kernel_calls) == 1 and not new[0].weight.requires_grad


def test_what_the_kernels_take():
    one = (torch.ones(3, dtype=F64),)
    assert _fused.fusable(one, one) is not None
    assert _fused.fusable((torch.ones(3, dtype=torch.float32),), (torch.ones(3),)) is not None
    assert _fused.fusable((torch.ones(3, dtype=torch.bfloat16),),
                          (torch.ones(3, dtype=torch.bfloat16),)) is None
    assert _fused.fusable((torch.ones(3, dtype=F64), torch.ones(2)),
                          (torch.ones(3, dtype=F64), torch.ones(2))) is None
    assert _fused.fusable((torch.ones(4, 3, dtype=F64),),
                          (torch.ones(3, dtype=F64).expand(4, 3),)) is None
    assert _fused.fusable(one, ()) is None and _fused.fusable((), ()) is None
    with torch.enable_grad():
        assert _fused.fusable((torch.ones(3, dtype=F64, requires_grad=True),), one) is None
    with torch.no_grad():
        assert _fused.fusable((torch.ones(3, dtype=F64, requires_grad=True),), one) is not None


ALL = {**FUSABLE, **NOT_FUSABLE}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", list(ALL))
def test_unchecked_update_mutates_nothing(name, fused):
    """Params, grads and state are bit for bit what they were; the new params are fresh
    tensors (the fused kernels update copies)."""
    optimizer = ALL[name]
    model, params, x, y = _problem()
    state = optimizer.init(params)
    for step in range(3):  # past the first step, whose momentum is special
        grads = _grads(model, params, x, y, step)
        before = [_bits(t) for t in leaves((params, grads, state))]
        new_params, new_state = optimizer.unchecked_update(params, grads, state, fused=fused)
        after = [_bits(t) for t in leaves((params, grads, state))]
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), step
        old = {t.data_ptr() for t in leaves((params, grads, state))}
        assert not any(t.data_ptr() in old for t in leaves(new_params))
        params, state = new_params, new_state


@pytest.mark.parametrize("name", ["adam", "sgd-nesterov", "clipped-adam", "rmsprop"])
def test_the_formulas_trace_without_a_fused_kernel(name, kernel_calls):
    """``make_fx`` of fused=False: per-leaf aten ops, no fused kernel, the eager results."""
    optimizer = {**ALL, "rmsprop": fnmlp.rmsprop(0.01)}[name]
    model, params, x, y = _problem()
    grads = _grads(model, params, x, y)
    state = optimizer.init(params)
    spec = fnmlp._tree.flatten((params, grads, state))[1]

    def update(*flat):
        p, g, s = fnmlp._tree.unflatten(list(flat), spec)
        return tuple(leaves(optimizer.unchecked_update(p, g, s, fused=False)))

    flat = fnmlp._tree.flatten((params, grads, state))[0]
    graph = make_fx(update)(*flat)
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert not any("fused" in t for t in targets), targets
    eager = leaves(optimizer.unchecked_update(params, grads, state, fused=False))
    assert _same_bits(list(graph(*flat)), eager)
    assert not kernel_calls


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adam-wd-amsgrad", "sgd-momentum", "rmsprop-centered-momentum"])
def test_the_formulas_trace_under_dynamo(name):
    """The per-leaf walk (fnmlp's flatten, the spec walked back into trees) is traced by dynamo
    in one graph, and the compiled update agrees with the eager one."""
    optimizer = ALL[name]
    model, params, x, y = _problem()
    grads = _grads(model, params, x, y)
    state = optimizer.init(params)
    compiled = torch.compile(lambda p, g, s: optimizer.unchecked_update(p, g, s, fused=False),
                             backend="eager", fullgraph=True)
    got = compiled(params, grads, state)
    expected = optimizer.unchecked_update(params, grads, state, fused=False)
    assert type(got[1]) is type(expected[1])
    for a, b in zip(leaves(got), leaves(expected), strict=True):
        assert relative(a, b) <= 1e-15


def test_plain_sgd_stays_one_multiply_add_a_leaf():
    """Plain SGD never takes the kernel: its one addcmul a leaf is bit-identical to
    ``torch.optim.SGD``."""
    params = (torch.randn(3, dtype=F64), torch.randn(2, 2, dtype=F64))
    grads = (torch.randn(3, dtype=F64), torch.randn(2, 2, dtype=F64))
    sgd = fnmlp.sgd(0.1)
    new, _ = sgd.unchecked_update(params, grads, sgd.init(params), fused=True)
    for p, g, n in zip(params, grads, new):
        assert torch.equal(n, torch.addcmul(p, g, torch.tensor(-0.1, dtype=F64)))


@pytest.mark.parametrize("name", ["adam-wd-amsgrad", "sgd-nesterov", "clipped-adam"])
def test_the_formulas_run_under_vmap(name):
    """fused=False under ``vmap`` (an ensemble's members): each member as it is alone."""
    optimizer = ALL[name]
    model, params, x, y = _problem()
    members = [fnmlp._tree.tree_map(lambda t, k=k: t * (1 + k / 10), params) for k in range(3)]
    grads = [_grads(model, p, x, y, k) for k, p in enumerate(members)]
    stack = lambda trees: fnmlp._tree.tree_map(lambda *t: torch.stack(t), *trees)  # noqa: E731
    states = [optimizer.init(p) for p in members]
    batched = torch.func.vmap(lambda p, g, s: optimizer.unchecked_update(p, g, s, fused=False))(
        stack(members), stack(grads), stack(states))
    alone = stack([optimizer.unchecked_update(p, g, s) for p, g, s in
                   zip(members, grads, states)])
    for a, b in zip(leaves(batched), leaves(alone), strict=True):
        assert relative(a, b) <= 1e-15
