"""The network layer of the design: primitives (each forward beside its backward), losses,
initializers and ``MLP``, their serial composition."""

from fnmlp.nn._activations import (ELU, GELU, Activation, Identity, LeakyReLU, LogSoftmax, ReLU,
                                   Sigmoid, SiLU, Softmax, Softplus, Tanh, activation_names,
                                   get_activation, new_names)
from fnmlp.nn._dropout import Dropout, keep_mask
from fnmlp.nn._dropout import make_key as dropout_key
from fnmlp.nn._linear import Linear, LinearParams
from fnmlp.nn._losses import (L1, MSE, BinaryCrossEntropyWithLogits, CrossEntropy, Huber, Loss,
                              PoissonNLL, SmoothL1, binary_cross_entropy_with_logits,
                              check_loss_weights, cross_entropy, huber, l1, mse, poisson_nll,
                              reduce_per_element, smooth_l1)
from fnmlp.nn._model import (EVAL, MLP, Dense, Params, State, backward, check_l2, check_loss,
                             forward, l2_penalty, value_and_grad)
from fnmlp.nn._norm import BatchNorm, BatchNormState, LayerNorm, NormParams
from fnmlp.nn._primitive import Context, Primitive

__all__ = [
    "Primitive", "Context", "EVAL", "MLP", "Dense", "Params", "State", "check_loss", "check_l2",
    "forward", "backward", "value_and_grad", "l2_penalty",
    "Linear", "LinearParams", "LayerNorm", "BatchNorm", "NormParams", "BatchNormState",
    "Dropout", "dropout_key", "keep_mask", "new_names", "reduce_per_element",
    "Activation", "Identity", "ReLU", "LeakyReLU", "ELU", "GELU", "SiLU", "Softplus", "Sigmoid",
    "Tanh", "Softmax", "LogSoftmax", "activation_names", "get_activation",
    "Loss", "MSE", "mse", "L1", "l1", "Huber", "huber", "SmoothL1", "smooth_l1", "PoissonNLL",
    "poisson_nll", "CrossEntropy", "cross_entropy", "check_loss_weights",
    "BinaryCrossEntropyWithLogits", "binary_cross_entropy_with_logits",
]
