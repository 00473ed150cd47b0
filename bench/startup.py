"""Start-up time of the header-only commands, against a bare Python and against importing what they avoid.

Each command runs in a fresh interpreter (`python -m lightning_tools ...`, no shell shims), several times; the
median wall time and peak RSS are printed. The "import torch + diffusers + transformers" row is what every command
paid before the header-only commands stopped importing them.

    python3 bench/startup.py            # 7 runs each
    python3 bench/startup.py --runs 15
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_tools.tiny import write_tiny_lightning_lora  # noqa: E402


def measure(argv: list[str], runs: int) -> tuple[float, float]:
    """(median seconds, median peak RSS in MB) of `argv` run `runs` times (RSS from /usr/bin/time, which counts
    the program alone, not this script's memory a forked child starts with)."""
    seconds, rss = [], []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", *argv], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        seconds.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-500:]}")
        rss.append(int(proc.stderr.strip().splitlines()[-1]) / 1024)
    return statistics.median(seconds), statistics.median(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        lora = write_tiny_lightning_lora(Path(tmp) / "my_style_4step_lora.safetensors")
        rows = [
            ("python -c pass", [python, "-c", "pass"]),
            ("import torch + diffusers + transformers", [python, "-c", "import torch, diffusers, transformers"]),
            ("lightning-tools --help", [python, "-m", "lightning_tools", "--help"]),
            ("lightning-tools catalog", [python, "-m", "lightning_tools", "catalog"]),
            ("lightning-tools inspect LORA", [python, "-m", "lightning_tools", "inspect", str(lora)]),
            ("lightning-tools verify LORA", [python, "-m", "lightning_tools", "verify", str(lora)]),
        ]
        print(f"{'command':<42} {'median s':>9} {'peak RSS MB':>12}   ({args.runs} runs each)")
        for label, argv in rows:
            seconds, rss = measure(argv, args.runs)
            print(f"{label:<42} {seconds:>9.3f} {rss:>12.0f}")


if __name__ == "__main__":
    main()
