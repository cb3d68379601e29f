"""The benchmark's contenders: each trains the same network on the same data.

A contender has ``step()`` (one full-batch training step), ``epoch()`` (one pass over the
training set, the short last batch included) and ``setup_seconds`` (its first step, which
includes any compilation).
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn

import fnmlp


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
                           opt_state=self.state, compile=self.compile)
        self.params, self.state = result.params, result.opt_state


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


def jax_sgd_step(model, params, lr):
    """``(train, jax_params)``: JAX's value_and_grad + SGD over a list of (W, b) for ``model``
    (not jitted), and ``params`` as that list. Float64 turns on JAX's x64 mode."""
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

    def loss_fn(ps, xb, yb):
        a = xb
        for (w, b), act in zip(ps, layers):
            a = act(a @ w.T + b)
        return jnp.mean((a - yb) ** 2)

    def train(ps, xb, yb):
        value, grads = jax.value_and_grad(loss_fn)(ps, xb, yb)
        return [(w - lr * gw, b - lr * gb) for (w, b), (gw, gb) in zip(ps, grads)], value

    jax_params = [(jnp.asarray(p.weight.cpu().numpy()), jnp.asarray(p.bias.cpu().numpy()))
                  for p in params if isinstance(p, fnmlp.nn.LinearParams)]
    return train, jax_params


class JaxContender:
    """JAX: jit of value_and_grad + SGD over a list of (W, b). Used only if jax is installed."""

    def __init__(self, name, model, params, x, y, lr, batch_size):
        import jax
        import jax.numpy as jnp

        self.name, self.batch_size = name, batch_size
        train, self.params = jax_sgd_step(model, params, lr)
        self.train = jax.jit(train)
        self.x, self.y = jnp.asarray(x.cpu().numpy()), jnp.asarray(y.cpu().numpy())
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
