"""The summary a -m sweep prints at its end, for a sweep directory at any later time (e.g. a SLURM sweep whose
submitting process was stopped while its tasks ran on):

    python scripts/sweep_summary.py outputs/demo

Lists every run directory under it (one or two levels down): directory, registers, steps, final loss,
online kNN and emergence layer, then the scripts/plot_sweep.py command that compares them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vitreg.runtime.sweep_summary import runs_written_since, sweep_lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="the sweep's directory (hydra.sweep.dir, e.g. outputs/<run_name>)")
    args = parser.parse_args(argv)
    runs = runs_written_since(args.sweep_dir, since=0.0)
    if not runs:
        print(f"no run directory (config.yaml and .hydra/) under {args.sweep_dir}", file=sys.stderr)
        return 1
    print("\n".join(sweep_lines(runs, args.sweep_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
