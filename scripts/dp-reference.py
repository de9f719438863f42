"""Reference epsilons for mycel-core's privacy accountant (crates/mycel-core/src/dp.rs).

Google's dp-accounting package computes, for the Poisson-subsampled Gaussian mechanism run
`steps` times (sampling rate q, noise multiplier sigma), the smallest epsilon its RDP
accountant can prove at delta, over its default orders. This script writes those figures for
a grid of (q, sigma, steps, delta) to crates/mycel-core/tests/data/dp_reference.json, which
the accountant's test holds within 1% of each.

    python3 -m venv /tmp/dp && /tmp/dp/bin/pip install dp-accounting==0.6.0
    /tmp/dp/bin/python scripts/dp-reference.py > crates/mycel-core/tests/data/dp_reference.json
"""

import json
import sys
from importlib.metadata import version

from absl import logging as absl_logging
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp

RATES = [0.001, 0.01, 0.05, 0.1, 0.3, 1.0]
SIGMAS = [0.5, 0.8, 1.0, 1.3, 2.0, 5.0]
STEPS = [1, 10, 100, 1000, 10000]
DELTAS = [1e-5, 1e-8]

# Orders whose series does not converge are left out of the minimum (and logged): quiet.
absl_logging.set_verbosity(absl_logging.ERROR)

cases = []
for q in RATES:
    for sigma in SIGMAS:
        for steps in STEPS:
            for delta in DELTAS:
                accountant = rdp.RdpAccountant()
                event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
                accountant.compose(event, steps)
                epsilon, order = accountant.get_epsilon_and_optimal_order(delta)
                cases.append(
                    {
                        "q": q,
                        "sigma": sigma,
                        "steps": steps,
                        "delta": delta,
                        "epsilon": epsilon,
                        "order": float(order),
                    }
                )

json.dump(
    {
        "source": f"dp-accounting {version('dp-accounting')}, RdpAccountant with its default orders, "
        "PoissonSampledDpEvent(q, GaussianDpEvent(sigma)) composed `steps` times, "
        "get_epsilon_and_optimal_order(delta)",
        "command": "python scripts/dp-reference.py > crates/mycel-core/tests/data/dp_reference.json",
        "cases": cases,
    },
    sys.stdout,
    indent=1,
)
print()
