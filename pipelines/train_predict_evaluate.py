"""Train -> predict the test cases -> evaluate -> report, for any MSD dataset and config.

    python pipelines/train_predict_evaluate.py -c demo -d sample_data/ct3d -o runs/organ [--set train.epochs=5]

A thin wrapper over :func:`medseg.workflow.train_predict_evaluate`; all logic lives in the library.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medseg.config import load_config
from medseg.errors import MedsegError
from medseg.workflow import train_predict_evaluate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="preset name or YAML path")
    parser.add_argument("-d", "--dataset", required=True, type=Path, help="MSD dataset folder with labelled test cases")
    parser.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key.sub=value override")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config, [f"data.dataset={args.dataset}", *args.overrides])
        result = train_predict_evaluate(cfg, args.out)
    except MedsegError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 2
    print(f"report: {result.test.report}\ntest Dice: {result.test.mean_dice}\nMLflow: {result.tracking_uri} run {result.run_id}")
    return 1 if result.test.n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
