"""Row sums chosen by the caller: ``Context.lane_order_sums`` (default True) makes softmax's and
log-softmax's backward autograd's own kernels (``aten._softmax_backward_data``,
``aten._log_softmax_backward_data``), which add a row in the CPU's SIMD lane order: bit-identical
to autograd by construction, on every CPU capability and device. False is plain tensor math with
one ``sum(dim=1, keepdim=True)``, which is what a traced step holds.

Checked at AVX512 and AVX2 (ATEN_CPU_CAPABILITY=avx2) on a 2-core AMD EPYC VM, torch 2.13.0;
``tests/test_cpu_capabilities.py`` (slow) reruns this file under both. No tolerance depends on
the CPU here: every exact assertion compares autograd's kernel with itself or a formula with
the same formula."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import fnmlp
from fnmlp.nn import _rowsum
from fnmlp.nn._activations import get_activation
from fnmlp.nn._model import value_and_grad
from fnmlp.nn._primitive import EVAL, Context

F64 = torch.float64
DTYPES = [torch.float64, torch.float32]
LOW_PRECISION = [torch.float16, torch.bfloat16]
# widths below, at and past a SIMD register of every known order, with and without a tail
SHAPES = [(7, 3), (333, 32), (16, 8), (5, 9), (4, 37), (3, 100), (2, 1), (6, 17), (9, 64)]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=dtype),
            torch.randn(*shape, generator=g, dtype=dtype))


def _backward(activation, z, da, lane_order_sums):
    _, residual, _ = activation.forward((), z, (), Context(lane_order_sums=lane_order_sums))
    return activation.backward((), residual, da)[0]


def test_the_context_field_is_last_and_on_by_default():
    assert Context._fields[-1] == "lane_order_sums"
    assert Context().lane_order_sums is True
    assert Context(True, None, None) == Context()  # positional construction unchanged
    assert EVAL.lane_order_sums is True


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", DTYPES + LOW_PRECISION)
def test_exact_backward_is_autograds_bit_for_bit(name, dtype):
    """On every CPU capability (no skip, no tolerance): the kernel is autograd's own."""
    activation, function = get_activation(name), getattr(torch, name)
    for shape in SHAPES:
        z, da = _inputs(shape, dtype)
        z.requires_grad_(True)
        (expected,) = torch.autograd.grad(function(z, dim=1), z, da)
        got = _backward(activation, z.detach(), da, True)
        assert torch.equal(got, expected), (shape, _rowsum.__name__)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_row_sums_are_a_plain_sum_bit_for_bit(name, dtype):
    activation = get_activation(name)
    for shape in SHAPES:
        z, da = _inputs(shape, dtype)
        a = activation(z)
        got = _backward(activation, z, da, False)
        if name == "softmax":
            expected = (da - (da * a).sum(dim=1, keepdim=True)) * a
        else:
            expected = da - torch.exp(a) * da.sum(dim=1, keepdim=True)
        assert torch.equal(got, expected), shape
        # and either order is within rounding of the other
        torch.testing.assert_close(_backward(activation, z, da, True), got,
                                   rtol=1e-5 if dtype == torch.float32 else 1e-13, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_backward_functions_take_the_choice_they_are_given(dtype):
    for shape in SHAPES + [(3, 0)]:
        da, z = _inputs(shape, dtype)
        a, log_a = torch.softmax(z, dim=1), torch.log_softmax(z, dim=1)
        assert torch.equal(_rowsum.softmax_backward(da, a, False),
                           (da - (da * a).sum(dim=1, keepdim=True)) * a)
        assert torch.equal(_rowsum.log_softmax_backward(da, log_a, False),
                           da - torch.exp(log_a) * da.sum(dim=1, keepdim=True))
        assert torch.equal(_rowsum.softmax_backward(da, a, True),
                           torch.ops.aten._softmax_backward_data(da, a, 1, dtype))
        assert torch.equal(_rowsum.log_softmax_backward(da, log_a, True),
                           torch.ops.aten._log_softmax_backward_data(da, log_a, 1, dtype))


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_backward_under_vmap_gives_each_member_its_own(name, dtype):
    """An ensemble's eager step maps the backward over members (``torch.func.vmap``): the
    kernels' batching rules give every member exactly what it gets alone."""
    activation = get_activation(name)
    for shape in SHAPES:
        z, da = (torch.stack(pair) for pair in zip(*(_inputs(shape, dtype, seed)
                                                      for seed in range(3))))
        mapped = torch.func.vmap(lambda z, da: _backward(activation, z, da, True))(z, da)
        for member in range(3):
            assert torch.equal(mapped[member], _backward(activation, z[member], da[member],
                                                         True)), (shape, member)


def test_the_residual_carries_the_choice_from_forward_to_backward():
    """The order is fixed by the context of the forward; backward's signature is unchanged."""
    softmax = get_activation("softmax")
    z, da = _inputs((5, 37), F64)
    _, plain, _ = softmax.forward((), z, (), Context(lane_order_sums=False))
    _, lanes, _ = softmax.forward((), z, (), Context())
    a = softmax(z)
    assert torch.equal(softmax.backward((), plain, da)[0],
                       (da - (da * a).sum(dim=1, keepdim=True)) * a)
    assert torch.equal(softmax.backward((), lanes, da, need_input_grad=True)[0],
                       _backward(softmax, z, da, True))


def _network():
    model = fnmlp.MLP(3, [fnmlp.Dense(37, "softmax"), fnmlp.Dense(19, "log_softmax"),
                          fnmlp.Dense(2)])
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, 2, generator=g, dtype=F64)
    return model, params, x, y


def _traced_targets(lane_order_sums: bool) -> list[str]:
    model, params, x, y = _network()
    spec = fnmlp._tree.flatten(params)[1]

    def function(*args):
        *leaves, x, y = args
        value, grads, _ = value_and_grad(model, fnmlp._tree.unflatten(leaves, spec), x, y,
                                         fnmlp.mse, model.init_state(dtype=F64),
                                         lane_order_sums=lane_order_sums)
        return value, *fnmlp._tree.flatten(grads)[0]

    graph = make_fx(function)(*fnmlp._tree.flatten(params)[0], x, y)
    return [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]


def test_a_traced_step_without_lane_order_holds_plain_sums_only():
    """``make_fx`` of ``value_and_grad(..., lane_order_sums=False)``: one plain row sum per
    softmax and log-softmax backward, no lane slicing, selecting or concatenating, no softmax
    backward kernel; with True, autograd's two kernels instead."""
    plain = _traced_targets(False)
    assert not any(op in t for t in plain for op in ("cat", "slice", "select")), plain
    assert sum("sum.dim_IntList" in t for t in plain) >= 2
    assert not any("softmax_backward_data" in t for t in plain), plain
    exact = _traced_targets(True)
    assert sum("aten._softmax_backward_data" in t for t in exact) == 1, exact
    assert sum("aten._log_softmax_backward_data" in t for t in exact) == 1, exact


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_and_grad_defaults_to_lane_order(dtype):
    """The public ``MLP.value_and_grad`` keeps the default (bit-identical to autograd eagerly);
    the unchecked one takes the choice."""
    model, params, x, y = _network()
    params = fnmlp._tree.tree_map(lambda t: t.to(dtype), params)
    x, y = x.to(dtype), y.to(dtype)
    state = model.init_state(dtype=dtype)
    public = model.value_and_grad(params, x, y)
    lanes = value_and_grad(model, params, x, y, fnmlp.mse, state)
    plain = value_and_grad(model, params, x, y, fnmlp.mse, state, lane_order_sums=False)
    for a, b in zip(fnmlp._tree.tree_leaves(public), fnmlp._tree.tree_leaves(lanes[:2])):
        assert torch.equal(a, b)
    for a, b in zip(fnmlp._tree.tree_leaves(plain[:2]), fnmlp._tree.tree_leaves(lanes[:2])):
        torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=1e-7)
