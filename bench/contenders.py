"""The benchmark's contenders: each trains the same network on the same data.

A contender has ``step()`` (one call: one full-batch training step, or ``steps_per_call``
steps for the chunked contenders), ``epoch()`` (one pass over the training set, the short last
batch included) and ``setup_seconds`` (its first call, which includes any compilation).

JAX is optional: its contenders raise ``JaxUnavailable`` when it is not installed or has no
backend for the benchmark's device; their arrays live on the JAX device matching torch's.
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import torch
from torch import nn

import fnmlp
from fnmlp.train.engine import Batch, Carry

# JAX beside torch on one GPU: no preallocation of 75% of its memory (read when JAX starts)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class FnmlpContender:
    def __init__(self, name, model, params, x, y, lr, batch_size, *, compile: bool):
        self.name, self.model, self.x, self.y = name, model, x, y
        self.batch_size, self.compile = batch_size, compile
        self.optimizer = fnmlp.sgd(lr)
        self.params, self.state = params, self.optimizer.init(params)
        self.train_step = fnmlp.train_step(model, fnmlp.mse, self.optimizer, compile=compile)
        self.xb, self.yb = x[:batch_size], y[:batch_size]
        start = time.perf_counter()
        self.step()
        synchronize(str(x.device))
        self.setup_seconds = time.perf_counter() - start

    def step(self):
        self.params, self.state, _ = self.train_step(self.params, self.state, self.xb, self.yb)

    def epoch(self):
        result = fnmlp.fit(self.model, self.params, self.x, self.y, epochs=1,
                           batch_size=self.batch_size, optimizer=self.optimizer,
                           opt_state=self.state, compile=self.compile, steps_per_call=1)
        self.params, self.state = result.params, result.opt_state


def epoch_batches(x, y, batch_size: int) -> list[Batch]:
    """The epoch's batches in order, the short last one included, each padded by a compiled
    step to ``batch_size`` rows of weight 0 (as ``fnmlp.fit`` makes them)."""
    return [Batch(x[start:start + batch_size], y[start:start + batch_size], None, None,
                  min(batch_size, len(x) - start), batch_size, (True,))
            for start in range(0, len(x), batch_size)]


class FnmlpChunkContender:
    """fnmlp's compiled step, the epoch's N batches per call (``run_chunk``: one graph of N
    steps, one CUDA graph replay on CUDA); its step time is the call's over N. Its epoch is
    ``fnmlp.fit(..., steps_per_call=N)``."""

    def __init__(self, name, model, params, x, y, lr, batch_size):
        self.name, self.model, self.x, self.y, self.batch_size = name, model, x, y, batch_size
        self.optimizer = fnmlp.sgd(lr)
        self.train_step = fnmlp.train_step(model, fnmlp.mse, self.optimizer, compile=True)
        self.carry = Carry(params, self.optimizer.init(params),
                           model.state_or_default(None, None))
        self.batches = epoch_batches(x, y, batch_size)
        self.steps_per_call = len(self.batches)
        start = time.perf_counter()
        self.step()
        synchronize(str(x.device))
        self.setup_seconds = time.perf_counter() - start

    def step(self):
        self.carry, _ = self.train_step.run_chunk(self.carry, self.batches)

    def epoch(self):
        carry = self.carry
        result = fnmlp.fit(self.model, carry.params, self.x, self.y, epochs=1,
                           batch_size=self.batch_size, optimizer=self.optimizer,
                           opt_state=carry.opt_state, compile=True,
                           steps_per_call=self.steps_per_call)
        self.carry = Carry(result.params, result.opt_state, carry.state)


class TorchContender:
    """nn.Sequential + autograd + torch.optim.SGD (foreach), the notebook's training loop.

    ``compile=True``: the best setup of torch.compile found for this loop: the forward and
    loss compiled together (AOTAutograd compiles the backward too) and the foreach optimizer
    left eager. Also compiling ``optimizer.step`` (torch's "compiled optimizer" recipe, with
    a tensor learning rate) measured slower here (seed workload, 2026-11-28), and compiling
    the whole step with ``backward()`` inside breaks the graph (pytorch#120814).
    """

    def __init__(self, name, model, params, x, y, lr, batch_size, *, compile: bool):
        self.name, self.x, self.y, self.batch_size = name, x, y, batch_size
        self.module = fnmlp.to_torch(model, params)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=lr, foreach=True)
        loss_fn = nn.MSELoss()

        def forward_loss(xb, yb):
            return loss_fn(self.module(xb), yb)

        self.forward_loss = torch.compile(forward_loss) if compile else forward_loss
        self.xb, self.yb = x[:batch_size], y[:batch_size]
        start = time.perf_counter()
        self.step()
        synchronize(str(x.device))
        self.setup_seconds = time.perf_counter() - start

    def _train(self, xb, yb):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_loss(xb, yb)
        loss.backward()
        self.optimizer.step()
        return loss

    def step(self):
        self._train(self.xb, self.yb)

    def epoch(self):
        losses = []
        for start in range(0, len(self.x), self.batch_size):
            end = start + self.batch_size
            losses.append(self._train(self.x[start:end], self.y[start:end]).item())
        return sum(losses) / len(losses)


class SklearnContender:
    """scikit-learn's MLPRegressor, configured as close as it allows: plain SGD (momentum 0,
    alpha 0, constant learning rate, no shuffling, no early stopping). It cannot mix
    activations (one for all hidden layers) and its loss is half the MSE. Timed per epoch
    (``partial_fit``); its step time is the epoch time over the number of batches."""

    def __init__(self, name, model, params, x, y, lr, batch_size, *, activation: str):
        from sklearn.neural_network import MLPRegressor

        self.name = name
        self.x, self.y = x.cpu().numpy(), y.cpu().numpy()
        self.batches = -(-len(self.x) // batch_size)
        self.regressor = MLPRegressor(
            hidden_layer_sizes=[layer.units for layer in model.layers
                                if isinstance(layer, fnmlp.Linear)][:-1],
            activation=activation, solver="sgd", learning_rate="constant",
            learning_rate_init=lr, momentum=0.0, nesterovs_momentum=False, alpha=0.0,
            batch_size=batch_size, shuffle=False, early_stopping=False, max_iter=1)
        start = time.perf_counter()
        self.epoch()
        self.setup_seconds = time.perf_counter() - start

    def epoch(self):
        from sklearn.base import clone

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self.regressor.partial_fit(self.x, self.y)
            except ValueError:  # diverged (its check runs after the epoch): start afresh
                self.regressor = clone(self.regressor)

    step = None  # timed per epoch only


class JaxUnavailable(Exception):
    """JAX cannot run a contender here; the message says why (a "skipped" line)."""


def jax_device(device: str):
    """The JAX device matching torch's ``device``: JAX's CPU for "cpu", its GPU of the same
    index for "cuda[:i]"; ``JaxUnavailable`` if JAX is not installed or lacks that backend."""
    try:
        import jax
    except ImportError as error:
        raise JaxUnavailable("JAX (not installed)") from error
    platform = "gpu" if device.startswith("cuda") else "cpu"
    try:
        devices = jax.devices(platform)
    except RuntimeError as error:
        raise JaxUnavailable(f"JAX (no {platform} backend)") from error
    return devices[torch.device(device).index or 0]


def to_jax(tensor_or_array, device):
    """A torch tensor or NumPy array as a JAX array on the JAX ``device``."""
    import jax

    if isinstance(tensor_or_array, torch.Tensor):
        tensor_or_array = tensor_or_array.detach().cpu().numpy()
    return jax.device_put(tensor_or_array, device)


def jax_sgd_step(model, params, lr, *, device=None):
    """``(train, jax_params)``: JAX's value_and_grad + SGD over a list of (W, b) for ``model``
    (not jitted), and ``params`` as that list (on the JAX ``device``; None: JAX's default).
    Float64 turns on JAX's x64 mode. ``train(ps, xb, yb) -> (ps, loss)`` with the plain MSE;
    ``train(ps, xb, yb, wb)`` with row weights ``wb`` (m,) and fnmlp's weighted MSE,
    sum_i w_i·mean_j (a_ij - y_ij)² / sum_i w_i (rows of weight 0, a short batch's padding,
    count for nothing)."""
    import jax
    import jax.numpy as jnp

    if params[0].weight.dtype == torch.float64:
        jax.config.update("jax_enable_x64", True)
    activations = {"identity": lambda z: z, "relu": jax.nn.relu,
                   "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh,
                   "softmax": lambda z: jax.nn.softmax(z, axis=-1)}
    # per Linear, the activation after it (the seed's Dense layers: Linear, activation)
    layers = []
    for layer in model.layers:
        if isinstance(layer, fnmlp.Linear):
            layers.append(activations["identity"])
        else:
            layers[-1] = activations[layer.name]

    def loss_fn(ps, xb, yb, *wb):
        a = xb
        for (w, b), act in zip(ps, layers):
            a = act(a @ w.T + b)
        if not wb:
            return jnp.mean((a - yb) ** 2)
        (wb,) = wb
        return jnp.sum(wb[:, None] * (a - yb) ** 2) / (jnp.sum(wb) * yb.shape[-1])

    def train(ps, xb, yb, *wb):
        value, grads = jax.value_and_grad(loss_fn)(ps, xb, yb, *wb)
        return [(w - lr * gw, b - lr * gb) for (w, b), (gw, gb) in zip(ps, grads)], value

    place = jnp.asarray if device is None else (lambda t: to_jax(t, device))
    jax_params = [(place(p.weight.cpu().numpy()), place(p.bias.cpu().numpy()))
                  for p in params if isinstance(p, fnmlp.nn.LinearParams)]
    return train, jax_params


def padded_batches(x, y, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(xs, ys, ws)``: the epoch's N batches stacked, (N, batch, ·) and weights (N, batch),
    the short last batch padded with zero rows of weight 0 (what a JAX user scans over; the
    same work as fnmlp's padded step)."""
    x, y = x.detach().cpu().numpy(), y.detach().cpu().numpy()
    rows = len(x)
    count = -(-rows // batch_size)
    pad = count * batch_size - rows

    def stack(a):
        padded = np.concatenate([a, np.zeros((pad, *a.shape[1:]), dtype=a.dtype)])
        return padded.reshape(count, batch_size, *a.shape[1:])

    weights = (np.arange(count * batch_size) < rows).astype(x.dtype)
    return stack(x), stack(y), weights.reshape(count, batch_size)


def jax_scan(train):
    """``chunk(ps, xs, ys, ws) -> (ps, losses)``: ``train`` over the stacked batches in turn
    with ``jax.lax.scan`` (not jitted)."""
    import jax

    def chunk(ps, xs, ys, ws):
        return jax.lax.scan(lambda carry, batch: train(carry, *batch), ps, (xs, ys, ws))

    return chunk


class JaxContender:
    """JAX: jit of value_and_grad + SGD over a list of (W, b). Used only if jax is installed."""

    def __init__(self, name, model, params, x, y, lr, batch_size):
        import jax

        device = jax_device(str(x.device))
        self.name, self.batch_size = name, batch_size
        train, self.params = jax_sgd_step(model, params, lr, device=device)
        self.train = jax.jit(train)
        self.x, self.y = to_jax(x, device), to_jax(y, device)
        self.xb, self.yb = self.x[:batch_size], self.y[:batch_size]
        start = time.perf_counter()
        self.step()
        self.setup_seconds = time.perf_counter() - start

    def step(self):
        self.params, value = self.train(self.params, self.xb, self.yb)
        value.block_until_ready()

    def epoch(self):
        for start in range(0, len(self.x), self.batch_size):
            end = start + self.batch_size
            self.params, value = self.train(self.params, self.x[start:end], self.y[start:end])
            value.item()


class JaxScanContender:
    """JAX: ``jit(lax.scan(step))``, the JAX contender's step over the epoch's N batches
    stacked, the short last one padded with rows of weight 0: N steps per call, its step time
    the call's over N; its epoch is one call (the batches stacked once, beforehand)."""

    def __init__(self, name, model, params, x, y, lr, batch_size):
        import jax

        device = jax_device(str(x.device))
        self.name = name
        train, self.params = jax_sgd_step(model, params, lr, device=device)
        self.train = jax.jit(jax_scan(train))
        self.data = [to_jax(a, device) for a in padded_batches(x, y, batch_size)]
        self.steps_per_call = self.data[0].shape[0]
        start = time.perf_counter()
        self.step()
        self.setup_seconds = time.perf_counter() - start

    def step(self):
        self.params, values = self.train(self.params, *self.data)
        values.block_until_ready()

    def epoch(self):
        self.params, values = self.train(self.params, *self.data)
        values.tolist()


class GemmFloor:
    """The step's matrix products alone, same shapes and dtype: per layer the forward addmm,
    the weight gradient and (past the first layer) the input gradient."""

    name = "GEMM floor"
    setup_seconds = 0.0

    def __init__(self, model, params, batch_size):
        dtype, device = params[0].weight.dtype, params[0].weight.device
        g = torch.Generator(device=device).manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, dtype=dtype, device=device, generator=g)

        self.products = []
        linears = [p for p in params if isinstance(p, fnmlp.nn.LinearParams)]
        for index, p in enumerate(linears):
            n_out, n_in = p.weight.shape
            a, dz = rand(batch_size, n_in), rand(batch_size, n_out)
            self.products.append((p.bias, a, p.weight, dz, index > 0))

    def step(self):
        for bias, a, weight, dz, input_grad in self.products:
            torch.addmm(bias, a, weight.t())
            dz.t() @ a
            if input_grad:
                dz @ weight

    epoch = None
