"""What a `birthline` command costs before it does anything: wall time and CPU time of `--help` and of the
read-only commands an administrator runs by the dozen, and where the import time goes (`python -X importtime`).

    .venv/bin/python bench/startup.py [--config F] [--runs 7]

Without --config it makes a small demo state in a temporary directory (`birthline demo --devices 5`). Prints the
median of --runs runs per command (wall, and user+system CPU of the child: on a loaded machine the CPU time is the
steadier figure), then the ten largest cumulative imports of --help and of `ca list`.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = [sys.executable, "-m", "appliance.cli.main"]
COMMANDS = (
    ["--help"], ["ca", "list"], ["ca", "chain"], ["journal", "stats"], ["report", "workorder", "WO-0001"],
    ["export", "workorder", "WO-0001", "--csv", "{tmp}/wo.csv"], ["workorder", "list"], ["station", "list"],
    ["revocation", "list"], ["upstream", "status"], ["audit", "head"], ["audit", "verify"], ["config", "check"],
)  # fmt: skip


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(argv: list[str], runs: int) -> tuple[float, float, int]:
    walls, cpus, code = [], [], 0
    for _ in range(runs):
        cpu0, t0 = _child_cpu(), time.perf_counter()
        code = subprocess.run([*BIN, *argv], capture_output=True, check=False).returncode
        walls.append(time.perf_counter() - t0)
        cpus.append(_child_cpu() - cpu0)
    return statistics.median(walls), statistics.median(cpus), code


def top_imports(argv: list[str], n: int = 10) -> list[tuple[int, str]]:
    done = subprocess.run([sys.executable, "-X", "importtime", *BIN[1:], *argv], capture_output=True, text=True,
                          check=False)  # fmt: skip
    rows = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = line.split("|")
            rows.append((int(cumulative), name.rstrip()))
    return sorted(rows, reverse=True)[:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--config", help="an appliance's configuration (default: a fresh demo state)")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = args.config
        if config is None:
            state = Path(tmp) / "state"
            subprocess.run([*BIN, "demo", "--state", str(state), "--devices", "5"], check=True,
                           capture_output=True)  # fmt: skip
            config = str(state / "birthline.toml")
        print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; median of {args.runs} runs")
        print(f"{'command':<44} {'wall s':>7} {'cpu s':>7}  exit")
        for argv in COMMANDS:
            full = [a.format(tmp=tmp) for a in argv] + ([] if argv == ["--help"] else ["--config", config])
            wall, cpu, code = measure(full, args.runs)
            print(f"{' '.join(argv):<44} {wall:7.3f} {cpu:7.3f}  {code}")
        for argv in (["--help"], ["ca", "list", "--config", config]):
            print(f"\nlargest cumulative imports of `birthline {' '.join(argv[:2])}` (us):")
            for us, name in top_imports(argv):
                print(f"  {us:>9}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
