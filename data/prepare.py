"""Fetch an upstream dataset through huggingface-hub and write it as data/TASK/SPLIT.jsonl, one record per line in
the dataset's own field layout (the layout minisirev.tasks reads).

    python data/prepare.py gsm8k               # data/gsm8k/{train,test}.jsonl
    python data/prepare.py math                # data/math/{train,test}.jsonl (all seven subjects)
    python data/prepare.py csqa                # data/csqa/{train,validation}.jsonl (upstream test has no labels)
    python data/prepare.py mbpp --out /data/mbpp

Upstream files are parquet, read with pyarrow (`pip install -e ".[data]"`). With no network the script says so in
one line, names the files to place by hand, and exits 1. The embedded task `arith` needs no download
(data/arith/make.py regenerates it).
"""

import argparse
import json
import sys
from pathlib import Path

# task -> (dataset repo, file prefixes to fetch, {our split: upstream split}, fields a record must have)
SOURCES = {
    "gsm8k": ("openai/gsm8k", ["main/"], {"train": "train", "test": "test"}, ["question", "answer"]),
    "math": ("EleutherAI/hendrycks_math", [""], {"train": "train", "test": "test"},
             ["problem", "solution", "level", "type"]),
    "csqa": ("tau/commonsense_qa", [""], {"train": "train", "validation": "validation"},
             ["question", "choices", "answerKey"]),
    "mbpp": ("google-research-datasets/mbpp", ["full/"], {"train": "train", "test": "test", "validation": "validation",
                                                          "prompt": "prompt"},
             ["text", "code", "test_list", "test_setup_code"]),
}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("task", choices=sorted(SOURCES), help="which upstream dataset to fetch")
p.add_argument("--out", default=None, help="output directory (default: data/TASK next to this script)")
p.add_argument("--revision", default=None, help="dataset revision (branch, tag or commit) to fetch; default main")
p.add_argument("--cache-dir", default=None, help="huggingface-hub cache directory (default: the hub's own)")
args = p.parse_args()

repo, prefixes, splits, fields = SOURCES[args.task]
out = Path(args.out) if args.out else Path(__file__).resolve().parent / args.task
by_hand = ", ".join(str(out / f"{s}.jsonl") for s in splits)
hint = f"place the files by hand: {by_hand} (JSONL, one record per line with fields {', '.join(fields)})"


def fail(msg: str) -> None:
    print(f"prepare.py {args.task}: {msg}; {hint}", file=sys.stderr)
    sys.exit(1)


try:
    from huggingface_hub import snapshot_download
except ImportError:
    fail("huggingface_hub is not installed (pip install huggingface-hub)")


def is_network_error(e: BaseException) -> bool:
    names = ("Connect", "Timeout", "Offline", "LocalEntryNotFound", "Resolution", "Network", "SSL", "Proxy")
    while e is not None:
        if isinstance(e, (ConnectionError, TimeoutError)) or any(n in type(e).__name__ for n in names):
            return True
        e = e.__cause__ or e.__context__
    return False


try:
    local = snapshot_download(repo, repo_type="dataset", revision=args.revision, cache_dir=args.cache_dir,
                              allow_patterns=[f"{pre}*.parquet" for pre in prefixes])
except Exception as e:  # the hub raises many types; report one line either way
    if is_network_error(e):
        fail(f"the network is unavailable (could not reach the hub for {repo})")
    fail(f"could not fetch {repo}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

try:
    import pyarrow.parquet as pq
except ImportError:
    fail("pyarrow is not installed (pip install pyarrow, or pip install -e '.[data]')")

files = sorted(Path(local).rglob("*.parquet"))
out.mkdir(parents=True, exist_ok=True)
for ours, theirs in splits.items():
    # upstream parquet files are named like SPLIT-00000-of-00001.parquet or live under SPLIT/
    chosen = [f for f in files if any(f.relative_to(local).as_posix().startswith(pre) for pre in prefixes)
              and (f.name.startswith(theirs + "-") or f.parent.name == theirs)]
    if not chosen:
        fail(f"no parquet file for split '{theirs}' in {repo}")
    rows = [row for f in chosen for row in pq.read_table(f).to_pylist()]
    missing = [k for k in fields if k not in rows[0]]
    if missing:
        fail(f"upstream split '{theirs}' lacks field(s) {', '.join(missing)}")
    path = out / f"{ours}.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    print(f"wrote {path} ({len(rows)} records from {len(chosen)} file(s))")
