"""Flower's FedAvg simulation of `mycel bench fl`'s IID setting, for comparison.

The scikit-learn digits (data/digits.csv), a stratified 80/20 split, features standardised
with the training split's statistics, N clients holding IID
shares of the training split, an MLP 64-32-10 (ReLU, softmax cross-entropy) in NumPy, 1 local
epoch of minibatch SGD (batch 32, lr 0.1), all clients every round, FedAvg, server-side
evaluation on the test split after every round. Prints one JSON line: flwr version,
ms_per_round (wall time between the evaluations after round 0 and the last round, divided by
the rounds), final_acc, total_s (this script from start to end).

Run: python3 bench/flower_digits.py --clients 10 --rounds 20   (needs flwr[simulation])
"""

import argparse
import json
import os
import time

START = time.perf_counter()

import numpy as np  # noqa: E402
import flwr  # noqa: E402
from flwr.client import ClientApp, NumPyClient  # noqa: E402
from flwr.common import Context, ndarrays_to_parameters  # noqa: E402
from flwr.server import ServerApp, ServerAppComponents, ServerConfig  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data", "digits.csv")


def load():
    raw = np.loadtxt(DATA, delimiter=",", dtype=np.float32)
    x, y = raw[:, :-1] / 16.0, raw[:, -1].astype(np.int64)
    rng = np.random.default_rng(0)
    train, test = [], []
    for c in range(10):
        rows = np.flatnonzero(y == c)
        rng.shuffle(rows)
        cut = round(len(rows) * 0.2)
        test.extend(rows[:cut])
        train.extend(rows[cut:])
    train, test = np.sort(train), np.sort(test)
    # Standardised with the training split's statistics, as `mycel bench fl` does.
    mean, sd = x[train].mean(axis=0), x[train].std(axis=0)
    sd[sd < 1e-9] = 1.0
    x = (x - mean) / sd
    return (x[train], y[train]), (x[test], y[test])


def init(seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(64, 32), (32,), (32, 10), (10,)]
    out = []
    for s in shapes:
        bound = 1.0 / np.sqrt(s[0]) if len(s) == 2 else 0.0
        out.append(rng.uniform(-bound, bound, s).astype(np.float32) if len(s) == 2 else np.zeros(s, np.float32))
    return out


def forward(w, x):
    h = np.maximum(x @ w[0] + w[1], 0.0)
    logits = h @ w[2] + w[3]
    return h, logits


def evaluate(w, x, y):
    _, logits = forward(w, x)
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
    return loss, float((logits.argmax(axis=1) == y).mean())


def train_epoch(w, x, y, lr, batch, rng):
    w = [a.copy() for a in w]
    order = rng.permutation(len(y))
    for start in range(0, len(y), batch):
        rows = order[start:start + batch]
        xb, yb = x[rows], y[rows]
        h, logits = forward(w, xb)
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        p[np.arange(len(yb)), yb] -= 1.0
        g = p / len(yb)
        gw2, gb2 = h.T @ g, g.sum(axis=0)
        gh = (g @ w[2].T) * (h > 0)
        gw1, gb1 = xb.T @ gh, gh.sum(axis=0)
        for a, d in zip(w, (gw1, gb1, gw2, gb2)):
            a -= lr * d
    return w


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    # Ray's CPUs per client actor: 1 gives one actor per core; less runs more actors at once.
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    args = parser.parse_args()
    (xtr, ytr), (xte, yte) = load()
    shares = np.array_split(np.random.default_rng(0).permutation(len(ytr)), args.clients)
    stamps, accuracies = [], []

    class Client(NumPyClient):
        def __init__(self, k):
            self.x, self.y, self.k = xtr[shares[k]], ytr[shares[k]], k

        def fit(self, parameters, config):
            rng = np.random.default_rng(int(config.get("round", 0)) * 1000 + self.k)
            w = train_epoch(parameters, self.x, self.y, 0.1, 32, rng)
            return w, len(self.y), {}

    def client_fn(context: Context):
        return Client(int(context.node_config["partition-id"])).to_client()

    def evaluate_fn(server_round, parameters, config):
        loss, acc = evaluate(parameters, xte, yte)
        stamps.append(time.perf_counter())
        accuracies.append(acc)
        return loss, {"accuracy": acc}

    def server_fn(context: Context):
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=args.clients,
            min_available_clients=args.clients,
            evaluate_fn=evaluate_fn,
            on_fit_config_fn=lambda r: {"round": r},
            initial_parameters=ndarrays_to_parameters(init()),
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=args.clients,
        backend_config={"client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0}},
    )
    per_round = (stamps[-1] - stamps[0]) / args.rounds * 1000.0 if len(stamps) > 1 else float("nan")
    print(json.dumps({
        "flwr": flwr.__version__,
        "clients": args.clients,
        "rounds": args.rounds,
        "ms_per_round": per_round,
        "final_acc": accuracies[-1] if accuracies else None,
        "total_s": time.perf_counter() - START,
    }))


if __name__ == "__main__":
    main()
