"""A second opinion on math verdicts: Hugging Face's math-verify (https://github.com/huggingface/Math-Verify).

Our verifiers (minisirev.tasks) read the final answer with a few rules and compare numbers or normalised strings.
math-verify parses both the gold answer and the completion into SymPy objects and compares them symbolically,
so where the two disagree one of them misreads an answer, and every accuracy in the report rests on that verdict.

    gold      gsm8k / arith: the text after the record's last "####", as "$N$";  math: the record's solution
              (math-verify takes its last \\boxed{...})
    verdict   math_verify.verify(parse(gold), parse(completion))   with the package's default extraction
              (LaTeX, then plain expressions: the last answer-like span of the text)

math-verify is optional (`pip install math-verify`, the kit's extra "mathverify"): without it `second_opinion`
returns None and `compare_verifiers` says it is not installed. It only applies to tasks with a mathematical
answer, MATH_TASKS. math-verify bounds each parse and comparison with SIGALRM, which only works in the main thread;
elsewhere the timeout is off.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import Any

MATH_TASKS = ("gsm8k", "math", "arith")
TIMEOUT_S = 5  # per parse / comparison (math-verify's default)
TEXT_TAIL = 300  # characters of a completion quoted in an example (the answer is at its end)


def _math_verify() -> Any:
    """The math_verify module, or None when it is not installed."""
    try:
        import math_verify
    except ImportError:
        return None
    return math_verify


def version() -> str | None:
    """math-verify's installed version, or None."""
    import importlib.metadata

    try:
        return importlib.metadata.version("math-verify") if _math_verify() is not None else None
    except importlib.metadata.PackageNotFoundError:
        return None


def gold_text(task_name: str, ex: dict) -> str:
    """The gold answer as math-verify should read it (see the module docstring)."""
    if task_name == "math":
        return ex["solution"]
    return "$" + ex["answer"].rsplit("####", 1)[-1].strip() + "$"


@functools.lru_cache(maxsize=4096)
def _parse_gold(text: str, timeout: int | None) -> Any:
    """math-verify's parse of a gold answer, once per process: every iteration judges the same test and OOD
    records (parse returns a list of SymPy objects and strings that verify only reads)."""
    return _math_verify().parse(text, parsing_timeout=timeout)


def _check_task(task_name: str) -> None:
    if task_name not in MATH_TASKS:
        raise ValueError(f"the second verifier applies to {', '.join(MATH_TASKS)}, not to task {task_name!r}")


def _judge(task_name: str, records: Sequence[dict], texts: Sequence[str]) -> tuple[list[bool], list] | None:
    """(verdicts, parsed completions), or None without math-verify."""
    _check_task(task_name)
    if len(records) != len(texts):
        raise ValueError(f"second verifier: {len(records)} records but {len(texts)} completions")
    mv = _math_verify()
    if mv is None:
        return None
    timeout = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    verdicts, parsed = [], []
    for ex, text in zip(records, texts):
        gold = _parse_gold(gold_text(task_name, ex), timeout)
        parsed.append(mv.parse(text, parsing_timeout=timeout))
        verdicts.append(bool(mv.verify(gold, parsed[-1], timeout_seconds=timeout)))
    return verdicts, parsed


def second_opinion(task_name: str, records: Sequence[dict], texts: Sequence[str]) -> list[bool] | None:
    """math-verify's verdict on each completion texts[i] of records[i]; None when math-verify is not installed.

    Records may repeat (n samples of one question), and later calls judge the same records again: each distinct
    gold answer is parsed once per process.
    """
    judged = _judge(task_name, records, texts)
    return None if judged is None else judged[0]


def disagreement(ours: Sequence[bool], theirs: Sequence[bool], *, items: Sequence[dict] | None = None,
                 examples: int = 3) -> dict:
    """How often two verifiers disagree on the same completions.

        {"rate": disagreements / n (None if n = 0), "n", "disagree", "ours_only": we say correct and they do not,
         "theirs_only": the reverse, "examples": the first `examples` disagreements}

    An example is {"index": i, "ours", "theirs"} plus items[i] when `items` (one dict per completion) is given.
    """
    if len(ours) != len(theirs) or (items is not None and len(items) != len(ours)):
        raise ValueError(f"disagreement: {len(ours)} of our verdicts, {len(theirs)} of theirs"
                         + ("" if items is None else f", {len(items)} items"))
    diff = [i for i, (a, b) in enumerate(zip(ours, theirs)) if bool(a) != bool(b)]
    ex = [{"index": i, "ours": bool(ours[i]), "theirs": bool(theirs[i]), **(items[i] if items is not None else {})}
          for i in diff[:examples]]
    return {"rate": len(diff) / len(ours) if len(ours) else None, "n": len(ours), "disagree": len(diff),
            "ours_only": sum(bool(ours[i]) for i in diff), "theirs_only": sum(bool(theirs[i]) for i in diff),
            "examples": ex}


def compare_verifiers(task_name: str, records: Sequence[dict], texts: Sequence[str], ours: Sequence[bool], *,
                      examples: int = 3, ids: Sequence[Any] | None = None) -> dict:
    """One iteration's entry of summary["second_verifier"]: our verdicts `ours` against math-verify's.

        {"installed": True, "version", "task", **disagreement(...)}   each example with "id", "gold", "ours_answer"
                                                                      (our extraction), "theirs_answer" and "text"
        {"installed": False, "task", "reason"}                        without math-verify
    """
    _check_task(task_name)
    if len(ours) != len(texts):
        raise ValueError(f"compare_verifiers: {len(ours)} verdicts for {len(texts)} completions")
    judged = _judge(task_name, records, texts)
    if judged is None:
        return {"installed": False, "task": task_name,
                "reason": "math-verify is not installed (pip install math-verify, or the kit's extra 'mathverify')"}
    from minisirev.tasks import get_task

    theirs, parsed = judged
    task = get_task(task_name)
    d = disagreement(ours, theirs, examples=examples)
    for e in d["examples"]:
        i = e["index"]
        ex = records[i]
        e.update(id=ids[i] if ids is not None else ex.get("id", i), gold=task.extract(task.reference(ex)),
                 ours_answer=task.extract(texts[i]), theirs_answer=str(parsed[i][-1]) if parsed[i] else None,
                 text=texts[i][-TEXT_TAIL:])
    return {"installed": True, "version": version(), "task": task_name, **d}
