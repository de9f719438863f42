"""Flower's FedAvg simulation of `mycel bench fl`'s IID setting, like for like.

`mycel bench fl --flower PYTHON` writes a plan (JSON) and runs this script on it, so that both
sides train the same thing: the same clients' rows (Mycel's partitions of the standardised
scikit-learn digits), the same initial weights (Mycel's, in its layout: per layer a weight
[out, in] row-major, then the bias), the same minibatches in the same order in every round
(the row order Mycel's participant uses), the same MLP (ReLU, softmax cross-entropy, mean over
the batch), the same hyper-parameters (1 local epoch of minibatch SGD), FedAvg weighted by
samples, evaluation on the same test split after every round.

Warmed up as a user measuring steady state would: an untimed first round trips to every client
(the clients return the weights unchanged), which starts Ray and the client actors (on 2 cores:
2 actors at 1 CPU per client, 10 at 0.2, so every actor serves the warm-up round; with more
actors than clients some would first work in a timed round). Timed from the evaluation after
that warm-up round to the one after the last round.

Prints one JSON line: flwr version, cpus_per_client, ms_per_round (timed rounds' wall time /
rounds, evaluation included), round_ms (each timed round), job_s (the same span: from the warmed-up start of the job to the
final model), startup_s (script start to the end of the warm-up: imports, Ray, actors),
final_acc, accuracies (after every timed round), total_s (the whole script).

Run: python3 bench/flower_digits.py --plan PLAN.json --cpus-per-client 1   (needs flwr[simulation])
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


def unflatten(flat, layers):
    """Mycel's flat weights -> [W1 (out, in), b1, W2, b2, ...]."""
    out, at = [], 0
    for fan_in, fan_out in zip(layers, layers[1:]):
        out.append(flat[at:at + fan_in * fan_out].reshape(fan_out, fan_in).copy())
        at += fan_in * fan_out
        out.append(flat[at:at + fan_out].copy())
        at += fan_out
    assert at == len(flat), "the plan's weights do not fit its layers"
    return out


def forward(w, x):
    """Every layer's input, then the logits; and the hidden layers' pre-activations."""
    hs, zs = [x], []
    for i in range(0, len(w), 2):
        z = hs[-1] @ w[i].T + w[i + 1]
        if i + 2 < len(w):
            zs.append(z)
            z = np.maximum(z, 0.0)
        hs.append(z)
    return hs, zs


def evaluate(w, x, y):
    logits = forward(w, x)[0][-1]
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-logp[np.arange(len(y)), y].mean())
    return loss, float((logits.argmax(axis=1) == y).mean())


def train_epoch(w, x, y, lr, batch, order):
    w = [a.copy() for a in w]
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        xb, yb = x[rows], y[rows]
        hs, zs = forward(w, xb)
        z = hs[-1] - hs[-1].max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        p[np.arange(len(yb)), yb] -= 1.0
        g = (p / len(yb)).astype(np.float32)
        grads = [None] * len(w)
        for i in range(len(w) - 2, -1, -2):
            grads[i] = g.T @ hs[i // 2]
            grads[i + 1] = g.sum(axis=0)
            if i > 0:
                # ReLU's gradient where its input was >= 0, as candle's and Mycel's.
                g = (g @ w[i]) * (zs[i // 2 - 1] >= 0)
        for a, d in zip(w, grads):
            a -= lr * d
    return w


def load_plan(path):
    """The plan as arrays, loaded once per process.

    The cache hangs off `builtins`, not a global of this script: Ray pickles functions of
    `__main__` by value with the globals they use, so a module-level cache filled in the
    driver would travel (2.3 MB) with every function it ships to the clients' actors, which
    cost Flower ~15% of its round time here. This way each actor reads the plan once."""
    import builtins

    _PLANS = builtins.__dict__.setdefault("_mycel_flower_plans", {})
    if path not in _PLANS:
        with open(path) as f:
            raw = json.load(f)
        dim = raw["layers"][0]
        _PLANS[path] = {
            "layers": raw["layers"],
            "lr": raw["lr"],
            "batch": raw["batch"],
            "rounds": raw["rounds"],
            "clients": [
                (np.asarray(c["x"], np.float32).reshape(-1, dim), np.asarray(c["y"], np.int64))
                for c in raw["clients"]
            ],
            "test": (
                np.asarray(raw["test"]["x"], np.float32).reshape(-1, dim),
                np.asarray(raw["test"]["y"], np.int64),
            ),
            "initial": np.asarray(raw["initial"], np.float32),
            # orders[round - 1][client][epoch] = the row order of that epoch.
            "orders": [
                [[np.asarray(o, np.int64) for o in client] for client in rnd]
                for rnd in raw["orders"]
            ],
        }
    return _PLANS[path]


class Client(NumPyClient):
    def __init__(self, plan_path, k):
        self.plan = load_plan(plan_path)
        self.k = k
        self.x, self.y = self.plan["clients"][k]

    def fit(self, parameters, config):
        timed_round = int(config["round"]) - 1  # round 1 is the warm-up
        if timed_round == 0:
            return parameters, len(self.y), {}
        w = parameters
        for order in self.plan["orders"][timed_round - 1][self.k]:
            w = train_epoch(w, self.x, self.y, self.plan["lr"], self.plan["batch"], order)
        return w, len(self.y), {}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True, help="written by `mycel bench fl --flower`")
    # Ray's CPUs per client actor: 1 gives one actor per core; less runs more actors at once.
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    args = parser.parse_args()
    plan_path = os.path.abspath(args.plan)
    plan = load_plan(plan_path)
    layers, rounds = plan["layers"], plan["rounds"]
    xte, yte = plan["test"]
    initial = unflatten(plan["initial"], layers)
    n_clients = len(plan["clients"])
    stamps, accuracies = [], []

    def client_fn(context: Context):
        # Only the plan's path travels to the simulation's workers; each loads it once.
        return Client(plan_path, int(context.node_config["partition-id"])).to_client()

    def evaluate_fn(server_round, parameters, config):
        loss, acc = evaluate(parameters, xte, yte)
        if server_round >= 1:  # after the warm-up round and every timed one
            stamps.append(time.perf_counter())
            accuracies.append(acc)
        return loss, {"accuracy": acc}

    def server_fn(context: Context):
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n_clients,
            min_available_clients=n_clients,
            evaluate_fn=evaluate_fn,
            on_fit_config_fn=lambda r: {"round": r},
            initial_parameters=ndarrays_to_parameters(initial),
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds + 1))

    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=n_clients,
        backend_config={"client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0}},
    )
    if len(stamps) != rounds + 1:
        raise SystemExit(f"Flower ran {len(stamps) - 1} of {rounds} timed rounds")
    job_s = stamps[-1] - stamps[0]
    print(json.dumps({
        "flwr": flwr.__version__,
        "clients": n_clients,
        "rounds": rounds,
        "cpus_per_client": args.cpus_per_client,
        "ms_per_round": job_s / rounds * 1000.0,
        "job_s": job_s,
        "startup_s": stamps[0] - START,
        "final_acc": accuracies[-1],
        "accuracies": accuracies[1:],
        "total_s": time.perf_counter() - START,
        # Each timed round's wall time: Flower's server polls for replies every 100 ms
        # (InMemoryGrid's default pull_interval), so these sit near multiples of 100 ms.
        "round_ms": [(b - a) * 1000.0 for a, b in zip(stamps, stamps[1:])],
    }))


if __name__ == "__main__":
    main()
