"""The self-improvement loop of arXiv 2407.05013: M1 = SFT on gold, then sample, verify, train, evaluate.

    python train.py --iter 3 --method sft-dpo
"""

import argparse
import sys

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--iter", type=int, default=3, help="iterations T (M1 plus T-1 self-improvement rounds)")
parser.add_argument("--method", choices=["sft", "dpo", "sft-dpo"], default="sft-dpo", help="self-improvement method")
args = parser.parse_args()
print("train.py: not implemented yet (issue 5)", file=sys.stderr)
sys.exit(1)
