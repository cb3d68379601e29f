"""fnmlp: pure-functional multilayer perceptrons with explicit backward rules, on PyTorch.

    model = fnmlp.MLP(6, [fnmlp.Dense(32, "tanh"), fnmlp.Dense(3)])
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    loss, grads = model.value_and_grad(params, x, y)
    result = fnmlp.fit(model, params, x, y, epochs=32, batch_size=333, optimizer=fnmlp.sgd(0.01))

Layers of the design, one subpackage each: ``fnmlp.nn`` (primitives, losses, the network),
``fnmlp.optim`` (optimizers, schedules), ``fnmlp.train`` (step, compilation, fit) and
``fnmlp.interop`` (the torch twin). The common names are re-exported here.
"""

from fnmlp import distributed, ensemble, interop, metrics, nn, optim, train, workloads
from fnmlp._errors import FnmlpError
from fnmlp._tree import pytree_dataclass
from fnmlp.ensemble import Ensemble
from fnmlp.interop import (Checkpoint, CheckpointError, TorchTwin, from_torch, load, register,
                           save, set_dropout_key, to_torch)
from fnmlp.nn import (ELU, GELU, L1, MLP, MSE, BatchNorm, BinaryCrossEntropyWithLogits,
                      CrossEntropy, Dense, Dropout, Huber, Identity, LayerNorm, LeakyReLU, Linear,
                      LinearParams, LogSoftmax, NormParams, BatchNormState, PoissonNLL, Primitive,
                      ReLU, Sigmoid, SiLU, SmoothL1, Softmax, Softplus, Tanh,
                      binary_cross_entropy_with_logits, cross_entropy, dropout_key, huber, l1,
                      mse, poisson_nll, smooth_l1)
from fnmlp.optim import adagrad, adam, adamw, clip_by_global_norm, rmsprop, schedules, sgd
from fnmlp.train import (CompileVerificationError, FitResult, History, NonFiniteLossError,
                         TrainStep)
from fnmlp._entry import fit, train_step

__all__ = [
    # the network and its primitives
    "MLP", "Dense", "Primitive", "Linear", "LinearParams", "LayerNorm", "BatchNorm",
    "NormParams", "BatchNormState", "Dropout", "dropout_key", "pytree_dataclass",
    # activations (also selected by name)
    "Identity", "ReLU", "LeakyReLU", "ELU", "GELU", "SiLU", "Softplus", "Sigmoid", "Tanh",
    "Softmax", "LogSoftmax",
    # losses: classes for options, instances for the defaults
    "MSE", "mse", "L1", "l1", "Huber", "huber", "SmoothL1", "smooth_l1", "PoissonNLL",
    "poisson_nll", "CrossEntropy", "cross_entropy",
    "BinaryCrossEntropyWithLogits", "binary_cross_entropy_with_logits",
    # optimizers and schedules
    "sgd", "adam", "adamw", "rmsprop", "adagrad", "clip_by_global_norm", "schedules",
    # training
    "train_step", "TrainStep", "fit", "FitResult", "History", "CompileVerificationError",
    "NonFiniteLossError", "FnmlpError", "Ensemble",
    # interop, checkpoints and the rest
    "to_torch", "from_torch", "TorchTwin", "set_dropout_key", "save", "load", "Checkpoint",
    "CheckpointError", "register", "metrics", "workloads",
    "nn", "optim", "train", "interop", "ensemble", "distributed",
]
__version__ = "0.2.0"
