"""The fuzz harness: every hostile-input property test (tests/test_hostile_*.py) against real
servers, with many more cases than CI gives them, then the figures per input path.

Usage: python tests/fuzz/run.py [--cases 1000] [extra pytest arguments, e.g. -k stow]

A failure prints the smallest input hypothesis could shrink it to, ready to replay.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000, help="cases per property test")
    args, extra = parser.parse_known_args()
    env = {
        **os.environ,
        "IMAGEBRIDGE_FUZZ_CASES": str(args.cases),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
    }
    files = sorted(str(p) for p in TESTS.glob("test_hostile_*.py"))
    command = [sys.executable, "-m", "pytest", "-p", "fuzz.figures", "-q", "--timeout=0"]
    return subprocess.call([*command, *files, *extra], env=env, cwd=TESTS.parent)


if __name__ == "__main__":
    sys.exit(main())
