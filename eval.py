"""Evaluate a self-improvement run (every iteration) or one checkpoint, and write the report.

    python eval.py --run runs/NAME
    python eval.py --model runs/NAME/iter_1/model --task arith
"""

import argparse
import sys

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# ---- what to evaluate
parser.add_argument("--run", help="a run directory written by train.py: evaluate every iteration, write the report")
parser.add_argument("--model", help="one checkpoint (local directory or Hub id) to evaluate instead of a run")
parser.add_argument("--task", default="arith", help="task of --model (arith, gsm8k, math, csqa, mbpp)")
args = parser.parse_args()
print("eval.py: not implemented yet (issue 6)", file=sys.stderr)
sys.exit(1)
