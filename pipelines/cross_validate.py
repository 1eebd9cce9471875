"""k-fold cross-validation of a config on an MSD dataset: every fold, then the pooled validation report.

    python pipelines/cross_validate.py -c organ3d_unet -d sample_data/ct3d -o runs/cv [--folds 0-4] [--set data.folds=5]

A thin wrapper over :func:`medseg.workflow.cross_validate` (also `medseg train --folds 0-4`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medseg.config import load_config
from medseg.errors import MedsegError
from medseg.training.folds import parse_folds
from medseg.workflow import cross_validate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="preset name or YAML path")
    parser.add_argument("-d", "--dataset", required=True, type=Path, help="MSD dataset folder")
    parser.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    parser.add_argument("--folds", default=None, help="e.g. 0-4 (default: every fold)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key.sub=value override")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config, [f"data.dataset={args.dataset}", *args.overrides])
        folds = parse_folds(args.folds or f"0-{cfg.data.folds - 1}", cfg.data.folds)
        result = cross_validate(cfg, args.out, folds)
    except MedsegError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2
    print(f"summary: {result.summary_path}")
    if result.pooled is not None:
        print(f"pooled report: {result.pooled.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
