"""fnmlp's scikit-learn classifier against skorch and scikit-learn's own MLPClassifier.

The same task for all three: load_digits standardized, a 75/25 split, one hidden layer of 100
ReLU units, Adam (lr 1e-3), batches of 200, no L2 penalty, 50 epochs exactly (no early
stopping, no validation split), float32. Fits alternate round by round; the script prints the
median fit time and the mean test accuracy of each.

    pip install skorch && python docs/scripts/wrappers.py [--rounds 5] [--threads 1]
"""

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier as SklearnMLP
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNetClassifier

from fnmlp.sklearn import MLPClassifier

EPOCHS = 50


def fnmlp_fit(seed):
    return MLPClassifier(hidden_layer_sizes=(100,), alpha=0.0, max_iter=EPOCHS,
                         n_iter_no_change=EPOCHS + 1, random_state=seed)


def sklearn_fit(seed):
    return SklearnMLP(hidden_layer_sizes=(100,), alpha=0.0, max_iter=EPOCHS,
                      n_iter_no_change=EPOCHS + 1, random_state=seed)


def skorch_fit(seed):
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(64, 100), torch.nn.ReLU(),
                                 torch.nn.Linear(100, 10))
    return NeuralNetClassifier(module, criterion=torch.nn.CrossEntropyLoss,
                               optimizer=torch.optim.Adam, lr=1e-3, batch_size=200,
                               max_epochs=EPOCHS, train_split=None, verbose=0,
                               iterator_train__shuffle=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's intra-op threads (default: as torch starts)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", ConvergenceWarning)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    scaler = StandardScaler().fit(x_train)
    x_train = scaler.transform(x_train).astype(np.float32)
    x_test = scaler.transform(x_test).astype(np.float32)
    makers = {"fnmlp MLPClassifier": fnmlp_fit, "skorch NeuralNetClassifier": skorch_fit,
              "scikit-learn MLPClassifier": sklearn_fit}
    times = {name: [] for name in makers}
    scores = {name: [] for name in makers}
    for seed in range(args.rounds):
        for name, make in makers.items():
            estimator = make(seed)
            start = time.perf_counter()
            estimator.fit(x_train, y_train.astype(np.int64))
            times[name].append(time.perf_counter() - start)
            scores[name].append(float(np.mean(estimator.predict(x_test) == y_test)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    for name in makers:
        print(f"{name:28s} fit {statistics.median(times[name]):.2f} s  "
              f"accuracy {statistics.mean(scores[name]):.4f}")


if __name__ == "__main__":
    main()
