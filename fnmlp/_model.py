"""The network spec (``MLP`` of ``Dense`` layers) and its pure functions.

The spec is static and hashable; parameters are a tuple with one ``DenseParams`` per layer.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import Tensor

from fnmlp import _validate
from fnmlp._activations import Activation, get_activation
from fnmlp._dense import DenseParams, dense_backward, dense_forward
from fnmlp._init import get_initializer
from fnmlp._losses import Loss, mse

Params = tuple[DenseParams, ...]


@dataclasses.dataclass(frozen=True)
class Dense:
    """A dense layer of ``units`` outputs followed by ``activation`` (a name or an activation).

    Names: identity (alias linear, the default), relu, sigmoid, tanh, softmax.
    """

    units: int
    activation: Activation | str | None = None

    def __post_init__(self):
        _validate.check_positive_int(self.units, "units")
        object.__setattr__(self, "activation", get_activation(self.activation))


@dataclasses.dataclass(frozen=True)
class MLP:
    """A multilayer perceptron: ``in_features`` inputs, then ``layers`` in order.

    Arguments:
        in_features: width of the input x (m, in_features).
        layers: the ``Dense`` layers; widths are inferred from ``in_features`` on.

    Example: ``MLP(6, [Dense(32, "tanh"), Dense(3)])`` maps (m, 6) to (m, 3).
    """

    in_features: int
    layers: tuple[Dense, ...]

    def __init__(self, in_features: int, layers: Sequence[Dense]):
        _validate.check_positive_int(in_features, "in_features")
        layers = tuple(layers)
        if not layers:
            raise ValueError("an MLP needs at least one Dense layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Dense):
                raise TypeError(f"layers[{i}] must be fnmlp.Dense, got {type(layer).__name__}")
        object.__setattr__(self, "in_features", int(in_features))
        object.__setattr__(self, "layers", layers)

    @property
    def out_features(self) -> int:
        return self.layers[-1].units

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(n_in, n_out) of each layer, inferred from ``in_features``."""
        widths = [self.in_features] + [layer.units for layer in self.layers]
        return list(zip(widths[:-1], widths[1:]))

    # --- parameters -------------------------------------------------------------------------

    def init(
        self,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        init: str = "torch",
    ) -> Params:
        """Fresh parameters, drawn from ``generator`` (a new, randomly seeded one if None).

        ``init="torch"`` draws like ``nn.Linear``'s default; ``init="normal"`` like the seed
        notebook (N(0, 1) weights and biases). Values are drawn on the generator's device, then
        moved to ``device`` (default: the generator's device).
        """
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        initializer = get_initializer(init)
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        elif not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        device = torch.device(device) if device is not None else generator.device
        return tuple(
            _move(initializer(n_in, n_out, generator, dtype), device)
            for n_in, n_out in self.shapes
        )

    def check_params(self, params: Params) -> Tensor:
        """Raise unless ``params`` fits this spec; return one leaf (for dtype and device)."""
        if not isinstance(params, tuple) or len(params) != len(self.layers):
            raise TypeError(
                f"params must be a tuple of {len(self.layers)} DenseParams (from model.init), "
                f"got {type(params).__name__}"
                + (f" of length {len(params)}" if isinstance(params, (tuple, list)) else "")
            )
        first = params[0].weight if isinstance(params[0], DenseParams) else None
        for i, ((n_in, n_out), layer) in enumerate(zip(self.shapes, params)):
            if not isinstance(layer, DenseParams):
                raise TypeError(f"params[{i}] must be DenseParams, got {type(layer).__name__}")
            for name, tensor, shape in (
                ("weight", layer.weight, (n_out, n_in)),
                ("bias", layer.bias, (n_out,)),
            ):
                if not isinstance(tensor, Tensor):
                    raise TypeError(f"params[{i}].{name} must be a tensor")
                if tuple(tensor.shape) != shape:
                    raise ValueError(
                        f"params[{i}].{name} has shape {tuple(tensor.shape)} but the model "
                        f"needs {shape}"
                    )
                if tensor.dtype != first.dtype or tensor.device != first.device:
                    raise ValueError(
                        f"params[{i}].{name} is {tensor.dtype} on {tensor.device} but params[0] "
                        f"is {first.dtype} on {first.device}; all parameters must match"
                    )
        if not first.dtype.is_floating_point:
            raise TypeError(f"parameters must be floating point, got {first.dtype}")
        return first

    def check_data(self, params: Params, x, y=None, *, loss: Loss = mse, finite: bool = True,
                   params_checked: bool = False, names: tuple[str, str] = ("x", "y")
                   ) -> tuple[Tensor, Tensor | None]:
        """Validated (x, y) as tensors on the parameters' device (x in their dtype, y as
        ``loss`` wants it); with ``finite``, also checked value by value (NaN, inf, label
        ranges). ``params_checked`` skips re-checking known-good params."""
        like = params[0].weight if params_checked else self.check_params(params)
        x_name, y_name = names
        x = _validate.as_data(x, x_name, like)
        _validate.check_matrix(x, x_name, self.in_features, "features")
        if y is not None:
            y = loss.check_target(y, self.out_features, like, y_name)
            _validate.check_rows(x, y, x_name, y_name)
        if finite:
            _validate.check_finite(x, x_name)
            if y is not None:
                loss.check_target_values(y, self.out_features, y_name)
        return x, y

    # --- pure functions ---------------------------------------------------------------------

    def apply(self, params: Params, x) -> Tensor:
        """Predictions (m, out_features) for x (m, in_features)."""
        x, _ = self.check_data(params, x)
        with torch.no_grad():
            return forward(self, params, x)

    def value_and_grad(self, params: Params, x, y, loss: Loss = mse) -> tuple[Tensor, Params]:
        """``(loss, grads)``: the loss (0-d) and its gradients, structured like ``params``.

        Computed by the explicit backward rules; no autograd is involved.
        """
        _check_loss(loss)
        x, y = self.check_data(params, x, y, loss=loss)
        with torch.no_grad():
            return value_and_grad(self, params, x, y, loss)

    def evaluate(self, params: Params, x, y, loss: Loss = mse) -> float:
        """The loss of the predictions on (x, y), as a Python float."""
        _check_loss(loss)
        x, y = self.check_data(params, x, y, loss=loss)
        with torch.no_grad():
            return loss(forward(self, params, x), y).item()


def forward(model: MLP, params: Params, x: Tensor) -> Tensor:
    """Predictions without checks (the compiled step's building block)."""
    for layer, p in zip(model.layers, params):
        x = layer.activation(dense_forward(p, x))
    return x


def value_and_grad(model: MLP, params: Params, x: Tensor, y: Tensor, loss: Loss,
                   valid_rows: Tensor | None = None):
    """Loss and gradients without checks: the manual forward, then the manual backward.

    ``valid_rows``: only the leading rows count (see ``Loss``); None means all of them.
    """
    inputs, residuals = [], []
    a = x
    for layer, p in zip(model.layers, params):
        inputs.append(a)
        a, residual = layer.activation.forward(dense_forward(p, a))
        residuals.append(residual)
    value, loss_residual = loss.forward(a, y, valid_rows)
    da = loss.backward(loss_residual)
    grads = [None] * len(params)
    for i in reversed(range(len(params))):
        dz = model.layers[i].activation.backward(residuals[i], da)
        da, grads[i] = dense_backward(params[i], inputs[i], dz, need_input_grad=i > 0)
    return value, tuple(grads)


def _move(params: DenseParams, device: torch.device) -> DenseParams:
    return DenseParams(weight=params.weight.to(device), bias=params.bias.to(device))


def _check_loss(loss) -> None:
    if not isinstance(loss, Loss):
        raise TypeError(f"loss must be an fnmlp loss such as fnmlp.mse, got {loss!r}")
