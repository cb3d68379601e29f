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
from fnmlp._dropout import dropout_backward, dropout_forward
from fnmlp._norm import LayerNormParams, layer_norm_backward, layer_norm_forward
from fnmlp._init import get_initializer
from fnmlp._losses import Loss, mse

Params = tuple[DenseParams, ...]


@dataclasses.dataclass(frozen=True)
class Dense:
    """A dense layer: z = x @ W.T + b, then optionally layer normalization of z, then
    ``activation``, then optionally dropout of the activations.

    Arguments:
        units: the layer's output width.
        activation: a name (identity/linear, relu, leaky_relu, elu, gelu, gelu_tanh, silu,
            softplus, sigmoid, tanh, softmax, log_softmax) or an activation instance such as
            ``fnmlp.LeakyReLU(0.2)``; None is the identity.
        layer_norm: normalize z over its features (learnable scale and shift, ``norm_eps``).
        dropout: probability of zeroing an activation while training (0 <= p < 1).
        init: this layer's initializer, overriding the one given to ``MLP.init``.
    """

    units: int
    activation: Activation | str | None = None
    layer_norm: bool = False
    dropout: float = 0.0
    init: str | None = None
    norm_eps: float = 1e-5

    def __post_init__(self):
        _validate.check_positive_int(self.units, "units")
        object.__setattr__(self, "activation", get_activation(self.activation))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or \
                not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        if self.init is not None:
            get_initializer(self.init)
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")


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
        notebook (N(0, 1) weights and biases); also xavier_uniform, xavier_normal,
        kaiming_uniform, kaiming_normal (biases zero) and zeros. A layer's own ``init`` wins.
        Values are drawn on the generator's device, then moved to ``device`` (default: the
        generator's device).
        """
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        get_initializer(init)
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        elif not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        device = torch.device(device) if device is not None else generator.device
        params = []
        for layer, (n_in, n_out) in zip(self.layers, self.shapes):
            drawn = get_initializer(layer.init or init)(n_in, n_out, generator, dtype)
            norm = None
            if layer.layer_norm:  # nn.LayerNorm's start: scale 1, shift 0
                norm = LayerNormParams(weight=torch.ones(n_out, dtype=dtype, device=device),
                                       bias=torch.zeros(n_out, dtype=dtype, device=device))
            params.append(DenseParams(drawn.weight.to(device), drawn.bias.to(device), norm))
        return tuple(params)

    def check_params(self, params: Params) -> Tensor:
        """Raise unless ``params`` fits this spec; return one leaf (for dtype and device)."""
        if not isinstance(params, tuple) or len(params) != len(self.layers):
            raise TypeError(
                f"params must be a tuple of {len(self.layers)} DenseParams (from model.init), "
                f"got {type(params).__name__}"
                + (f" of length {len(params)}" if isinstance(params, (tuple, list)) else "")
            )
        first = params[0].weight if isinstance(params[0], DenseParams) else None
        for i, ((n_in, n_out), layer, spec) in enumerate(zip(self.shapes, params, self.layers)):
            if not isinstance(layer, DenseParams):
                raise TypeError(f"params[{i}] must be DenseParams, got {type(layer).__name__}")
            expected = [("weight", layer.weight, (n_out, n_in)), ("bias", layer.bias, (n_out,))]
            if spec.layer_norm != (layer.norm is not None):
                wanted = "LayerNormParams" if spec.layer_norm else "None"
                raise ValueError(f"params[{i}].norm must be {wanted}: layer {i} has "
                                 f"layer_norm={spec.layer_norm}")
            if layer.norm is not None:
                expected += [("norm.weight", layer.norm.weight, (n_out,)),
                             ("norm.bias", layer.norm.bias, (n_out,))]
            for name, tensor, shape in expected:
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

    @property
    def has_dropout(self) -> bool:
        return any(layer.dropout for layer in self.layers)

    def check_key(self, key, device: torch.device | None = None) -> Tensor | None:
        """The dropout key to train with, on ``device``: required when a layer has dropout;
        None without."""
        if key is None:
            if self.has_dropout:
                raise ValueError("this model has dropout: pass key=fnmlp.dropout_key(seed, step) "
                                 "(a new counter for every step)")
            return None
        if not isinstance(key, Tensor) or key.shape != (2,) or key.dtype != torch.int64:
            raise TypeError(f"key must come from fnmlp.dropout_key, got {key!r}")
        if not self.has_dropout:
            return None  # without dropout a key draws nothing
        return key if device is None else key.to(device)

    def value_and_grad(self, params: Params, x, y, loss: Loss = mse, key: Tensor | None = None
                       ) -> tuple[Tensor, Params]:
        """``(loss, grads)``: the loss (0-d) and its gradients, structured like ``params``.

        Computed by the explicit backward rules; no autograd is involved. ``key``
        (``fnmlp.dropout_key``) draws the dropout masks of a model with dropout.
        """
        _check_loss(loss)
        x, y = self.check_data(params, x, y, loss=loss)
        key = self.check_key(key, x.device)
        with torch.no_grad():
            return value_and_grad(self, params, x, y, loss, key=key)

    def predict_proba(self, params: Params, x) -> Tensor:
        """Class probabilities (m, classes): softmax of the outputs, which are taken as logits
        unless the last layer is already a softmax (or log-softmax).

        A single output is a binary classifier (``binary_cross_entropy_with_logits``): its
        sigmoid (unless the last layer is a sigmoid already) is P(class 1), and the result is
        (m, 2), columns P(class 0) and P(class 1), as scikit-learn's ``predict_proba``.
        """
        out = self.apply(params, x)
        last = self.layers[-1].activation.name
        if self.out_features == 1:
            positive = out if last == "sigmoid" else torch.sigmoid(out)
            return torch.cat([1 - positive, positive], dim=1)
        if last == "softmax":
            return out
        if last == "log_softmax":
            return torch.exp(out)
        return torch.softmax(out, dim=1)

    def predict_classes(self, params: Params, x) -> Tensor:
        """The most probable class of each row (m,), int64 (for one output: P(class 1) > 1/2)."""
        if self.out_features == 1:
            return (self.predict_proba(params, x)[:, 1] > 0.5).long()
        return self.apply(params, x).argmax(dim=1)

    def evaluate(self, params: Params, x, y, loss: Loss = mse) -> float:
        """The loss of the predictions on (x, y), as a Python float."""
        _check_loss(loss)
        x, y = self.check_data(params, x, y, loss=loss)
        with torch.no_grad():
            return loss(forward(self, params, x), y).item()


def forward(model: MLP, params: Params, x: Tensor, key: Tensor | None = None) -> Tensor:
    """Predictions without checks. Dropout is applied only with a ``key`` (training)."""
    for index, (layer, p) in enumerate(zip(model.layers, params)):
        x = _layer_forward(index, layer, p, x, key)[0]
    return x


def _layer_forward(index: int, layer: Dense, p: DenseParams, x: Tensor, key: Tensor | None):
    """One layer's output and the residuals of its parts: (a, (norm, activation, dropout))."""
    z = dense_forward(p, x)
    norm_residual = dropout_residual = None
    if layer.layer_norm:
        z, norm_residual = layer_norm_forward(p.norm, z, layer.norm_eps)
    a, activation_residual = layer.activation.forward(z)
    if layer.dropout and key is not None:
        a, dropout_residual = dropout_forward(a, key, index, layer.dropout)
    return a, (norm_residual, activation_residual, dropout_residual)


def _layer_backward(layer: Dense, p: DenseParams, x: Tensor, residuals, da: Tensor,
                    need_input_grad: bool):
    norm_residual, activation_residual, dropout_residual = residuals
    if dropout_residual is not None:
        da = dropout_backward(dropout_residual, da)
    dz = layer.activation.backward(activation_residual, da)
    norm_grads = None
    if layer.layer_norm:
        dz, norm_grads = layer_norm_backward(p.norm, norm_residual, dz)
    dx, grads = dense_backward(p, x, dz, need_input_grad=need_input_grad)
    return dx, DenseParams(grads.weight, grads.bias, norm_grads)


def value_and_grad(model: MLP, params: Params, x: Tensor, y: Tensor, loss: Loss,
                   valid_rows: Tensor | None = None, key: Tensor | None = None):
    """Loss and gradients without checks: the manual forward, then the manual backward.

    ``valid_rows``: only the leading rows count (see ``Loss``); None means all of them.
    ``key``: the dropout key (see ``fnmlp.dropout_key``); None trains without dropout.
    """
    inputs, residuals = [], []
    a = x
    for index, (layer, p) in enumerate(zip(model.layers, params)):
        inputs.append(a)
        a, residual = _layer_forward(index, layer, p, a, key)
        residuals.append(residual)
    value, loss_residual = loss.forward(a, y, valid_rows)
    da = loss.backward(loss_residual)
    grads = [None] * len(params)
    for i in reversed(range(len(params))):
        da, grads[i] = _layer_backward(model.layers[i], params[i], inputs[i], residuals[i], da,
                                       need_input_grad=i > 0)
    return value, tuple(grads)


def _check_loss(loss) -> None:
    if not isinstance(loss, Loss):
        raise TypeError(f"loss must be an fnmlp loss such as fnmlp.mse, got {loss!r}")
