"""Shared test helpers: the seed workload, the twin's step, relative differences, and a loss of
one's own without row weights."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_structure, tree_unflatten

import fnmlp
from fnmlp.nn import Loss
from fnmlp.workloads import SEED_LAYERS, seed_data, seed_model  # noqa: F401 (re-exported)


def mlp(in_features: int, layers) -> fnmlp.MLP:
    return fnmlp.MLP(in_features, [fnmlp.Dense(units, act) for act, units in layers])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (0 when both are 0)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def leaves(tree) -> list[torch.Tensor]:
    """Tensors in the twin's order (per primitive: weight, bias)."""
    return tree_leaves(tree)


def linear_params(params) -> list:
    """The ``LinearParams`` entries of ``params``, in order."""
    return [p for p in params if isinstance(p, fnmlp.nn.LinearParams)]


def twin_step(module: nn.Module, x, y, lr: float):
    """One autograd + torch.optim.SGD step on ``module`` (mutated); returns (loss, grads)."""
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    optimizer.zero_grad()
    loss = nn.MSELoss()(module(x), y)
    loss.backward()
    grads = [p.grad.clone() for p in module.parameters()]
    optimizer.step()
    return loss.detach(), grads


def fnmlp_step(model, params, x, y, lr: float):
    optimizer = fnmlp.sgd(lr)
    loss, grads = model.value_and_grad(params, x, y)
    new_params, _ = optimizer.update(params, grads, optimizer.init(params))
    return loss, grads, new_params


def step_differences(model, params, x, y, lr: float) -> dict[str, float]:
    """Largest relative difference of loss, gradients and updated parameters after one step
    of fnmlp and of its twin from the same parameters."""
    twin = fnmlp.to_torch(model, params)
    twin_loss, twin_grads = twin_step(twin, x, y, lr)
    loss, grads, new_params = fnmlp_step(model, params, x, y, lr)
    return {
        "loss": relative(loss, twin_loss),
        "grads": max(relative(a, b) for a, b in zip(leaves(grads), twin_grads)),
        "params": max(relative(a, b.detach()) for a, b in zip(leaves(new_params),
                                                               twin.parameters())),
    }


def torch_state_as_fnmlp(optimizer, twin, steps: int):
    """The twin's current parameters and torch.optim state as fnmlp's (params, opt_state),
    so that one step of each can start from the very same state."""
    params = twin.params()
    state = optimizer.init(params)
    tensors = list(twin.module.parameters())
    torch_state = twin.optimizer.state
    structure = tree_structure(params)

    def tree(key):
        return tree_unflatten([torch_state[p][key].detach().clone() for p in tensors], structure)

    replaced = {"step": torch.tensor(steps, dtype=state.step.dtype)}
    for field in dataclasses.fields(state):
        if field.name in ("step", "learning_rate") or getattr(state, field.name) is None:
            continue
        if steps > 0:
            replaced[field.name] = tree(field.name)
    return params, dataclasses.replace(state, **replaced)


def small_model() -> fnmlp.MLP:
    """A 6-8-3 tanh network: the small model of the boundary checks."""
    return fnmlp.MLP(6, [fnmlp.Dense(8, "tanh"), fnmlp.Dense(3)])


def small_regression(dtype=torch.float64):
    """``(model, params, x, y)``: ``small_model`` with 20 random rows."""
    model = small_model()
    params = model.init(torch.Generator().manual_seed(0), dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 6, generator=g, dtype=dtype)
    y = torch.randn(20, 3, generator=g, dtype=dtype)
    return model, params, x, y


# --- exactness across CPUs --------------------------------------------------------------------
# Two kinds of bit-identity assertions in this suite:
# - by construction: both sides run the same ATen kernel on the same tensors (the twin's
#   forward, cross-entropy, softmax's backward through ``aten._softmax_backward_data``, a layout
#   normalized to the same contiguous tensor), or the same computation twice (resume, replay).
#   These hold on any CPU (both sides dispatch alike), and assert ``torch.equal``
#   unconditionally.
# - formula against kernel: fnmlp's tensor math against one of autograd's or torch.optim's
#   kernels (tanh's ``addcmul`` against ``tanh_backward``, sigmoid's and MSE's formulas, SGD's
#   fused multiply-add against ``torch.optim.SGD``'s, ...). Whether the two round alike
#   depends on the SIMD code ATen dispatches to (``torch.backends.cpu.get_cpu_capability()``:
#   its own build of every kernel per capability, the same build on every CPU, Intel or AMD,
#   that reports it). These assert ``torch.equal`` where the capability is one they were
#   checked at, and the tolerance they name elsewhere (``assert_exact_where_checked``).
# Checked at: AVX512 and AVX2 (ATEN_CPU_CAPABILITY=avx2) on a 2-core AMD EPYC VM with AVX512,
# torch 2.13.0 CPU; before the layout work also an AMD EPYC VM with AVX2 only and an Intel Xeon
# VM with AVX512 (docs/guide/torch-twin.md). ``tests/test_cpu_capabilities.py`` (slow) reruns the
# exactness tests under ATEN_CPU_CAPABILITY=avx2 and the machine's default. (They were exact at
# ATEN_CPU_CAPABILITY=default on that machine too, but "DEFAULT" names other code on other
# architectures, so it is not listed.)
CHECKED_CPU_CAPABILITIES = frozenset({"AVX2", "AVX512"})


def cpu_capability() -> str:
    """The SIMD code ATen's CPU kernels dispatch to in this process ("AVX2", "AVX512", ...)."""
    return torch.backends.cpu.get_cpu_capability()


def exact_here() -> bool:
    """Whether the formula-against-kernel bit identities were checked at this capability."""
    return cpu_capability() in CHECKED_CPU_CAPABILITIES


def assert_exact_where_checked(got: torch.Tensor, expected: torch.Tensor, *, rtol: float,
                               atol: float, what: object = "") -> None:
    """``torch.equal`` at a checked capability (``exact_here``); elsewhere within ``rtol`` and
    ``atol`` (the caller's documented tolerance: a last-bit rounding difference)."""
    if exact_here():
        assert torch.equal(got, expected), (what, cpu_capability())
    else:
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m: (
            f"{what} at {cpu_capability()} (not a checked capability): {m}"))


@dataclasses.dataclass(frozen=True)
class Quartic(Loss):
    """mean (p - y)⁴ over elements; its forward takes no row weights."""

    def forward(self, pred, target):
        diff = pred - target
        return (diff ** 4).mean(), (diff, pred.numel())

    def backward(self, residual, dvalue=None):
        diff, count = residual
        gradient = 4 * diff ** 3 / count
        return gradient if dvalue is None else gradient * dvalue
