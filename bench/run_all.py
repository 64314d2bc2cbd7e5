"""Run every benchmark in bench/ and let each rewrite its section of BENCHMARKS.md.

A benchmark is any `bench/*.py` script other than this one, `models.py`, `zoo_probe.py` (a probe that needs
model zoos irtool does not depend on, and writes nothing) and modules starting with `_` (shared helpers). Each runs
as its own process with the arguments given here, so `python3 dev.py bench --quick` passes `--quick` to all of
them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"run_all.py", "models.py", "zoo_probe.py"}

log = logging.getLogger("bench")


def benchmarks() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if p.name not in NOT_BENCHMARKS and not p.name.startswith("_"))


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    failed = []
    env = dict(os.environ)
    python = Path(sys.executable)
    shown = str(python.relative_to(HERE.parent)) if python.is_relative_to(HERE.parent) else python.name
    env.setdefault("BENCH_COMMAND", " ".join([shown, "bench/run_all.py", *argv]))
    for script in benchmarks():
        log.info("running %s %s", script.name, " ".join(argv))
        code = subprocess.run([sys.executable, str(script), *argv], cwd=HERE.parent, env=env).returncode
        if code != 0:
            failed.append(script.name)
            log.error("%s exited with %d", script.name, code)
    if failed:
        log.error("failed: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
