"""Regenerate the shipped splits of the embedded `arith` task, bit for bit.

    python data/arith/make.py            # write data/arith/{train,test,ood}.jsonl
    python data/arith/make.py --check    # verify the shipped files match what the generator makes (exit 1 if not)

The generator is minisirev.tasks.arith (seeds and sizes in arith.SPLITS): train 2000 and test 300 records over
levels 1-3, ood 500 over levels 1-5 (100 per level), disjoint by question text.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from minisirev.tasks.arith import make_splits  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", default=str(Path(__file__).resolve().parent), help="directory for the .jsonl files")
p.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing them")
args = p.parse_args()

out = Path(args.out)
bad = []
for split, rows in make_splits().items():
    text = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)
    path = out / f"{split}.jsonl"
    if args.check:
        if not path.is_file() or path.read_text() != text:
            bad.append(str(path))
        continue
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(f"wrote {path} ({len(rows)} records)")
if args.check:
    print("mismatch: " + ", ".join(bad) if bad else "ok: shipped splits match the generator")
    sys.exit(1 if bad else 0)
