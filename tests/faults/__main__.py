"""``python -m tests.faults --trials 50``: the long fault-injection run, with its figures."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .harness import fault_network, run_trials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    parser.add_argument("--trials", type=int, default=50, help="studies sent (default 50)")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="random seed")
    parser.add_argument("--slices", type=int, default=300, help="instances per study")
    parser.add_argument("--kills", type=int, nargs=2, default=(1, 3), metavar=("MIN", "MAX"))
    parser.add_argument(
        "--window", type=float, default=8.0, help="kills fall within this many seconds"
    )
    parser.add_argument("--dir", type=Path, help="keep the network's folder here")
    parser.add_argument(
        "--how",
        choices=("kill", "term", "upgrade"),
        default="kill",
        help="stop processes by SIGKILL, by SIGTERM, or the hub by SIGTERM and an upgrade",
    )
    args = parser.parse_args(argv)
    print(f"seed {args.seed}", flush=True)
    with fault_network(args.dir) as network:
        figures = run_trials(
            network,
            trials=args.trials,
            seed=args.seed,
            slices=args.slices,
            kills_per_trial=tuple(args.kills),
            window_seconds=args.window,
            report=lambda line: print(line, flush=True),
            how=args.how,
        )
    print(figures.summary(), flush=True)
    return 0 if figures.ok else 1


if __name__ == "__main__":
    sys.exit(main())
