"""Every backward rule against autograd, in float64, over several shapes."""

import pytest
import torch
from torch.autograd import gradcheck

import fnmlp
from helpers import assert_exact_where_checked
from fnmlp.interop import _registry
from fnmlp.nn import activation_names, get_activation
from fnmlp.nn._primitive import Context

TRAIN = Context(train=True)


def _torch_module(primitive):
    """The primitive's nn module, through the interop registry."""
    return _registry.module_for(primitive, (), (), 0)


def _forward(primitive, params, x, context=TRAIN):
    y, residual, _ = primitive.forward(params, x, (), context)
    return y, residual


def _backward(primitive, params, residual, dy, need_input_grad=True):
    return primitive.backward(params, residual, dy, need_input_grad)

SHAPES = [(1, 1), (1, 5), (7, 3), (333, 32), (4, 37)]
# a last-bit difference: where a formula need not match a kernel bit for bit
LAST_BITS = {torch.float64: {"rtol": 1e-13, "atol": 1e-15},
             torch.float32: {"rtol": 1e-5, "atol": 1e-6}}


def _inputs(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype),
            torch.randn(shape, generator=g, dtype=dtype))


def _manual_vjp(activation):
    """z -> a as a torch.autograd.Function whose backward is the fnmlp rule, for gradcheck."""
    class Manual(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            a, residual = _forward(activation, (), z)
            ctx.residual = residual
            return a

        @staticmethod
        def backward(ctx, da):
            return _backward(activation, (), ctx.residual, da)[0]

    return Manual.apply


@pytest.mark.parametrize("name", activation_names())
@pytest.mark.parametrize("shape", SHAPES)
def test_activation_backward_matches_autograd(name, shape):
    activation = get_activation(name)
    z, da = _inputs(shape)
    z.requires_grad_(True)
    expected_a = _torch_module(activation)(z)
    (expected,) = torch.autograd.grad(expected_a, z, da)
    a, residual = _forward(activation, (), z.detach())
    assert torch.equal(a, expected_a.detach())  # the same forward kernel: exact on every CPU
    got, dparams = _backward(activation, (), residual, da)
    assert dparams == ()
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", activation_names())
@pytest.mark.parametrize("shape", [(1, 4), (5, 3)])
def test_activation_backward_gradcheck(name, shape):
    z, _ = _inputs(shape, seed=1)
    if name == "relu":  # keep away from the kink, where finite differences are meaningless
        z = z + 0.1 * z.sign()
    assert gradcheck(_manual_vjp(get_activation(name)), (z.requires_grad_(True),))


def test_relu_backward_at_zero_is_zero_like_autograd():
    z = torch.tensor([[-1.0, 0.0, 2.0]], dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(torch.relu(z), z, torch.ones_like(z))
    relu = get_activation("relu")
    got = _backward(relu, (), _forward(relu, (), z.detach())[1], torch.ones_like(z))[0]
    assert torch.equal(got, expected)


def test_softmax_is_stable_for_extreme_inputs():
    z = torch.tensor([[1000.0, 0.0, -1000.0]], dtype=torch.float64)
    a = get_activation("softmax")(z)
    assert torch.isfinite(a).all() and torch.allclose(a.sum(1), torch.ones(1, dtype=a.dtype))


@pytest.mark.parametrize("shape", [(1, 6), (7, 6), (333, 32)])
@pytest.mark.parametrize("need_input_grad", [True, False])
def test_dense_backward_matches_autograd(shape, need_input_grad):
    m, n_in = shape
    g = torch.Generator().manual_seed(2)
    x = torch.randn(m, n_in, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, n_in, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    dz = torch.randn(m, 5, generator=g, dtype=torch.float64)
    z = torch.nn.functional.linear(x, w, b)
    expected = torch.autograd.grad(z, (x, w, b), dz)
    params = fnmlp.nn.LinearParams(w.detach(), b.detach())
    linear = fnmlp.Linear(5)
    out, residual = _forward(linear, params, x.detach())
    assert torch.equal(out, z.detach())
    dx, grads = _backward(linear, params, residual, dz, need_input_grad)
    assert torch.equal(grads.weight, expected[1]) and torch.equal(grads.bias, expected[2])
    if need_input_grad:
        assert torch.equal(dx, expected[0])
    else:
        assert dx is None


def test_dense_gradcheck():
    class Manual(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            ctx.params = fnmlp.nn.LinearParams(w, b)
            out, ctx.residual = _forward(fnmlp.Linear(2), ctx.params, x)
            return out

        @staticmethod
        def backward(ctx, dz):
            dx, grads = _backward(fnmlp.Linear(2), ctx.params, ctx.residual, dz)
            return dx, grads.weight, grads.bias

    g = torch.Generator().manual_seed(3)
    args = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in [(4, 3), (2, 3), (2,)]]
    assert gradcheck(Manual.apply, args)


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (7, 3), (333, 3)])
def test_mse_matches_autograd(shape):
    p, y = _inputs(shape, seed=4)
    p.requires_grad_(True)
    expected = torch.nn.functional.mse_loss(p, y)
    (expected_grad,) = torch.autograd.grad(expected, p)
    value, residual = fnmlp.mse.forward(p.detach(), y)
    # formulas against mse_loss's kernels: exact at the checked capabilities (tests/helpers.py)
    assert_exact_where_checked(value, expected.detach(), **LAST_BITS[p.dtype], what="value")
    assert_exact_where_checked(fnmlp.mse.backward(residual), expected_grad,
                               **LAST_BITS[p.dtype], what="gradient")
    assert_exact_where_checked(  # the value's cotangent scales the gradient
        fnmlp.mse.backward(residual, torch.tensor(2.0, dtype=p.dtype)), 2 * expected_grad,
        **LAST_BITS[p.dtype], what="scaled gradient")


def test_mse_gradcheck():
    class Manual(torch.autograd.Function):
        @staticmethod
        def forward(ctx, p, y):
            value, ctx.residual = fnmlp.mse.forward(p, y)
            return value

        @staticmethod
        def backward(ctx, dvalue):
            return fnmlp.mse.backward(ctx.residual, dvalue), None

    p, y = _inputs((3, 2), seed=5)
    assert gradcheck(Manual.apply, (p.requires_grad_(True), y))


# Bit identity with autograd (tests/helpers.py, "exactness across CPUs"). By construction on
# every CPU: identity, relu (autograd's threshold_backward), softmax and log_softmax (autograd's
# _softmax_backward_data and _log_softmax_backward_data). Formulas against autograd's kernels:
# sigmoid (da * (1 - a) * a) and tanh (addcmul), exact at the checked capabilities (AVX512 and
# AVX2 on an AMD EPYC VM, torch 2.13; AVX2 and AVX512 VMs before), elsewhere within the last
# bits (the tolerance below).
BY_CONSTRUCTION = ["identity", "relu", "softmax", "log_softmax"]
FORMULAS = ["sigmoid", "tanh"]


@pytest.mark.parametrize("name", BY_CONSTRUCTION + FORMULAS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_is_bit_identical_to_autograd_on_cpu(name, dtype):
    activation = get_activation(name)
    for shape in [(7, 3), (333, 32), (16, 8), (5, 9), (4, 37), (3, 100), (2, 1)]:
        z, da = _inputs(shape, seed=6, dtype=dtype)
        z.requires_grad_(True)
        (expected,) = torch.autograd.grad(_torch_module(activation)(z), z, da)
        got = _backward(activation, (), _forward(activation, (), z.detach())[1], da)[0]
        if name in BY_CONSTRUCTION:
            assert torch.equal(got, expected), (name, dtype, shape)
        else:
            assert_exact_where_checked(got, expected, **LAST_BITS[dtype],
                                       what=(name, dtype, shape))


@pytest.mark.parametrize("activation, values", [
    (fnmlp.ReLU(), [-1.0, 0.0, 1e-300, 2.0]),
    (fnmlp.LeakyReLU(0.2), [-1.0, 0.0, 3.0]),
    (fnmlp.ELU(0.7), [-30.0, -1.0, 0.0, 2.0]),
    (fnmlp.Softplus(2.0, 5.0), [2.4, 2.5, 2.6, -50.0, 100.0, 1000.0]),
    (fnmlp.Softplus(), [19.9, 20.0, 20.1, 800.0]),
    (fnmlp.GELU(), [-40.0, -3.0, 0.0, 3.0]),
    (fnmlp.GELU("tanh"), [-40.0, -3.0, 0.0, 3.0]),
    (fnmlp.SiLU(), [-800.0, -1.0, 0.0, 800.0]),
    (fnmlp.Sigmoid(), [-800.0, 0.0, 800.0]),
    (fnmlp.LogSoftmax(), [-1000.0, 0.0, 1000.0]),
])
def test_backward_at_awkward_values_matches_autograd(activation, values):
    """Kinks, thresholds and extremes: the explicit rule agrees with autograd, finitely."""
    z = torch.tensor([values], dtype=torch.float64, requires_grad=True)
    da = torch.linspace(-1, 2, len(values), dtype=torch.float64).reshape(1, -1)
    (expected,) = torch.autograd.grad(_torch_module(activation)(z), z, da)
    got = _backward(activation, (), _forward(activation, (), z.detach())[1], da)[0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("shape", [(1, 3), (7, 5), (333, 32)])
def test_layer_norm_backward_matches_autograd(shape):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[1], generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(shape, generator=g, dtype=torch.float64)
    expected_out = torch.nn.functional.layer_norm(z, (shape[1],), w, b, 1e-5)
    expected = torch.autograd.grad(expected_out, (z, w, b), dout)
    params = fnmlp.nn.NormParams(w.detach(), b.detach())
    out, residual = _forward(fnmlp.LayerNorm(1e-5), params, z.detach())
    assert torch.equal(out, expected_out.detach())
    dz, grads = _backward(fnmlp.LayerNorm(1e-5), params, residual, dout)
    for got, want in zip((dz, grads.weight, grads.bias), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("primitive", [fnmlp.LayerNorm(1e-5), fnmlp.BatchNorm(),
                                       fnmlp.BatchNorm(momentum=None, eps=1e-3)])
def test_norm_gradcheck(primitive):
    class Manual(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z, w, b):
            ctx.params = fnmlp.nn.NormParams(w, b)
            state = primitive.init_state(4, z.dtype, z.device)
            out, ctx.residual, _ = primitive.forward(ctx.params, z, state, TRAIN)
            return out

        @staticmethod
        def backward(ctx, dout):
            dz, grads = _backward(primitive, ctx.params, ctx.residual, dout)
            return dz, grads.weight, grads.bias

    g = torch.Generator().manual_seed(8)
    args = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in [(3, 4), (4,), (4,)]]
    assert gradcheck(Manual.apply, args)


def test_dropout_masks_are_reproducible_and_backward_uses_them():
    from fnmlp.nn._dropout import keep_mask

    key = fnmlp.dropout_key(5, 0)
    a = torch.ones(400, 50, dtype=torch.float64)

    def drop(stream, key, context=None):
        context = context or Context(train=True, key=key)
        return _forward(fnmlp.Dropout(0.25, stream), (), a, context)

    out, residual = drop(1, key)
    assert torch.equal(out, drop(1, key)[0])                               # same key, same mask
    assert not torch.equal(out, drop(1, fnmlp.dropout_key(5, 1))[0])
    assert not torch.equal(out, drop(2, key)[0])                           # per stream
    assert torch.equal(drop(1, None)[0], a)                                # no key: identity
    assert torch.equal(drop(1, key, Context(train=False, key=key))[0], a)  # evaluation
    kept = keep_mask(key, 1, (400, 50), 0.25, torch.float64)
    assert abs(kept.mean().item() - 0.75) < 0.01
    assert torch.equal(out, kept / 0.75)
    da = torch.randn(400, 50, dtype=torch.float64)
    assert torch.equal(_backward(fnmlp.Dropout(0.25, 1), (), residual, da)[0],
                       da * (kept * (1 / 0.75)))


def test_dropout_masks_look_independent_across_steps_layers_and_units():
    from fnmlp.nn._dropout import keep_mask

    def mask(seed, counter, layer):
        return keep_mask(fnmlp.dropout_key(seed, counter), layer, (400, 50), 0.5, torch.float64)

    a = mask(3, 4, 1)
    for other in [mask(3, 5, 1), mask(4, 4, 1), mask(3, 4, 2), mask(3, 4 + 2**16, 1)]:
        assert abs((a == other).double().mean().item() - 0.5) < 0.02  # as for independent coins
    assert abs((a[:, 1:] == a[:, :-1]).double().mean().item() - 0.5) < 0.02  # neighbours
    keys = {tuple(fnmlp.dropout_key(seed, counter).tolist())
            for seed in range(30) for counter in range(30)}
    assert len(keys) == 900
    with pytest.raises(TypeError, match="counter must be an integer"):
        fnmlp.dropout_key(0, 1.5)


def test_low_precision_layers_keep_their_dtype_and_a_cpu_key_works(device):
    """bfloat16 layer norm statistics come back in float32 on CUDA; dropout keys are made on
    the CPU. Gradients keep the parameters' dtype, and the twin draws the same masks."""
    model = fnmlp.MLP(4, [fnmlp.Dense(8, "relu", layer_norm=True, dropout=0.25),
                          fnmlp.Dense(2)])
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.bfloat16, device=device)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x, y = x.to(device), torch.zeros(6, 2, dtype=torch.bfloat16, device=device)
    key = fnmlp.dropout_key(3, 7)
    value, grads = model.value_and_grad(params, x, y, key=key)
    assert value.dtype == torch.bfloat16
    assert all(g.dtype == torch.bfloat16 and g.device == x.device
               for g in torch.utils._pytree.tree_leaves(grads))
    twin = fnmlp.to_torch(model, params, shared_dropout=True)
    fnmlp.interop.set_dropout_key(twin, key)
    ours = model.apply(params, x, train=True, key=key)
    assert torch.equal(twin(x), ours)
