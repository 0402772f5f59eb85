"""The Task interface shared by every task, the JSONL reader, and the one-line data error.

A task turns upstream records (each in its dataset's own field layout) into what the loop needs:

    load(path_or_split) -> list[dict]     the records, each validated for the fields the task reads
    prompt(ex) -> str                     the zero-shot, completion-style prompt
    reference(ex) -> str                  the gold completion that SFT trains on (the loop appends EOS)
    extract(text) -> str | None           the final answer read from a completion (None: no answer found)
    is_correct(ex, text) -> bool          the binary verifier R(x, y): 1 when the completion's answer is right
    is_correct_batch(exs, texts)          a list of verdicts; tasks that execute code run it in parallel
    level(ex) -> int | None               the difficulty level used for the OOD groups (None: no level)
    harness_stats(reset=False) -> dict    {"programs": n, "harness_errors": m} for tasks that run code

A task that runs model-written code (MBPP) raises `HarnessError` from is_correct / is_correct_batch when its
harness could not judge a program (the sandbox is broken here): such a program is neither right nor wrong, so it
must never be counted, trained on or logged as a wrong answer. Tasks that run no code never raise it.

`load` accepts a path to a .jsonl file, a directory holding `<split>.jsonl` files together with a split name
written as `DIR:SPLIT`, or a bare split name, resolved to `data/<task.name>/<split>.jsonl` under the repository
root. Bad input (a malformed line, a missing field, an empty file) raises `DataError`, whose message is one line:
`path:lineno: field 'x' missing`.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "data"


class HarnessError(RuntimeError):
    """The verifier's harness could not judge one or more programs. str(e) is one line naming the cause and the
    fix; `count` is how many programs of the batch were not judged, `cause` the harness's own reason."""

    def __init__(self, message: str, *, count: int = 1, cause: str = ""):
        super().__init__(message.replace("\n", " "))
        self.count, self.cause = count, cause or message


class DataError(ValueError):
    """Bad task data: one line naming the file, the line number and the field."""

    def __init__(self, path, lineno: int | None, message: str):
        where = f"{path}:{lineno}" if lineno is not None else f"{path}"
        super().__init__(f"{where}: {message}".replace("\n", " "))
        self.path, self.lineno = str(path), lineno


def read_jsonl(path: str | Path, required: dict[str, type | tuple[type, ...]] | None = None,
               check=None) -> list[dict]:
    """Read a JSONL file, one JSON object per non-blank line; check each `required` field exists with its type,
    then call `check(row, path, lineno)` (which raises DataError) on each record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(path, lineno, f"expected a JSON object, got {type(row).__name__}")
            for field, typ in (required or {}).items():
                if field not in row:
                    raise DataError(path, lineno, f"field '{field}' missing")
                if not isinstance(row[field], typ):
                    names = "/".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
                    raise DataError(path, lineno, f"field '{field}' should be {names}, got {type(row[field]).__name__}")
            if check is not None:
                check(row, path, lineno)
            rows.append(row)
    if not rows:
        raise DataError(path, None, "empty file (no records)")
    return rows


class Task:
    """Base class; subclasses set `name`, `fields`, `splits` and implement prompt/reference/extract/is_correct."""

    name: str = ""
    fields: dict[str, type | tuple[type, ...]] = {}  # required field -> type, checked on every loaded record
    splits: dict[str, str] = {"train": "train", "test": "test", "ood": "ood"}
    ood_task: str | None = None  # when the OOD split belongs to another task (GSM8K -> MATH), its name

    def resolve(self, path_or_split: str | Path) -> Path:
        """A .jsonl path as is; `DIR:SPLIT` -> DIR/SPLIT.jsonl; a bare split name -> data/<task>/<split>.jsonl."""
        s = str(path_or_split)
        p = Path(s)
        if p.suffix == ".jsonl" or p.is_file():
            return p
        if ":" in s and Path(s.rsplit(":", 1)[0]).is_dir():
            d, split = s.rsplit(":", 1)
            return Path(d) / f"{split}.jsonl"
        if "/" not in s and "\\" not in s:
            return DATA_DIR / self.name / f"{s}.jsonl"
        raise DataError(s, None, "not a .jsonl file, a DIR:SPLIT pair or a split name")

    def load(self, path_or_split: str | Path) -> list[dict]:
        path = self.resolve(path_or_split)
        if not path.is_file() and path.parent == DATA_DIR / self.name and self.name != "arith":
            raise DataError(path, None, f"file not found (fetch it with: python data/prepare.py {self.name})")
        return read_jsonl(path, self.fields, self.validate)

    def validate(self, ex: dict, path, lineno: int) -> None:
        """Task-specific checks beyond field presence and type; raise DataError(path, lineno, ...)."""

    def prompt(self, ex: dict) -> str:
        raise NotImplementedError

    def reference(self, ex: dict) -> str:
        raise NotImplementedError

    def extract(self, text: str) -> str | None:
        raise NotImplementedError

    def is_correct(self, ex: dict, text: str) -> bool:
        raise NotImplementedError

    def is_correct_batch(self, exs: list[dict], texts: list[str]) -> list[bool]:
        if len(exs) != len(texts):
            raise ValueError(f"{len(exs)} records but {len(texts)} completions")
        return [self.is_correct(ex, t) for ex, t in zip(exs, texts)]

    def level(self, ex: dict) -> int | None:
        return None

    def harness_stats(self, reset: bool = False) -> dict[str, int]:
        """{"programs": n, "harness_errors": m}: how many programs this task object ran in its harness since the
        last reset, and how many of them the harness could not judge (both 0 for tasks that run no code)."""
        stats = dict(getattr(self, "_harness", None) or {"programs": 0, "harness_errors": 0})
        if reset:
            self._harness = {"programs": 0, "harness_errors": 0}
        return stats

    def _count_harness(self, programs: int, harness_errors: int) -> None:
        stats = self.harness_stats()
        self._harness = {"programs": stats["programs"] + programs,
                         "harness_errors": stats["harness_errors"] + harness_errors}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
