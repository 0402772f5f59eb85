"""MBPP (Austin et al. 2021, arXiv 2108.07732): short Python functions checked by three asserts.

Records keep the upstream layout: `{"task_id": int, "text": str, "code": str, "test_list": [str, ...],
"test_setup_code": str, "challenge_test_list": [...]}` (text, code and test_list are required;
test_setup_code defaults to "").

    prompt(ex)    = "You are an expert Python programmer, and here is your task: {text} Your code should pass
                     these tests:\\n\\n{test 1}\\n{test 2}\\n{test 3}\\n\\nCode:\\n"   (the MBPP paper's prompt,
                     with the tests shown, completion style)
    reference(ex) = ex["code"] with Windows line endings normalised

Code extraction (`extract_code`): the first fenced block (```python ... ``` or ``` ... ```) when the text has
one, an unterminated fence running to the end of the text included; else the whole text. A trailing
"[DONE]"/"[END]" marker is removed. A verdict is a pass only when the sandbox proves every assert ran
(sandbox.py); `is_correct_batch` runs the programs in parallel.

Harness errors: before the first program, the sandbox's self-test runs a known-good and a known-bad program
(once per process). If it fails, or if the sandbox could not run some program of a batch (Verdict status
"harness"), is_correct / is_correct_batch raise HarnessError instead of answering False: a program the harness
could not run is not a wrong program. `harness_stats()` counts programs and harness errors; `verdicts()` is the
raw view (Verdict objects, harness ones included, no self-test, never raises).
"""

from __future__ import annotations

import re

from minisirev.tasks import sandbox
from minisirev.tasks.base import DataError, HarnessError, Task
from minisirev.tasks.sandbox import Verdict, run_many, run_program

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str | None) -> str | None:
    """The program in a completion; None for empty output."""
    if text is None:
        return None
    m = _FENCE.search(text)
    code = m.group(1) if m else text
    code = re.sub(r"\s*\[(DONE|END)\]\s*$", "", code.replace("\r\n", "\n"))
    return code if code.strip() else None


class MBPP(Task):
    name = "mbpp"
    fields = {"text": str, "code": str, "test_list": list}
    splits = {"train": "train", "test": "test", "ood": None}
    limits = {"timeout": 5.0, "memory_mb": 512}  # sandbox limits used by is_correct / is_correct_batch

    def validate(self, ex: dict, path, lineno: int) -> None:
        if not ex["test_list"] or not all(isinstance(t, str) for t in ex["test_list"]):
            raise DataError(path, lineno, "field 'test_list' should be a non-empty list of strings")
        if not isinstance(ex.get("test_setup_code", ""), str):
            raise DataError(path, lineno, "field 'test_setup_code' should be str")

    def prompt(self, ex: dict) -> str:
        tests = "\n".join(ex["test_list"])
        return (f"You are an expert Python programmer, and here is your task: {ex['text'].strip()} "
                f"Your code should pass these tests:\n\n{tests}\n\nCode:\n")

    def reference(self, ex: dict) -> str:
        return ex["code"].replace("\r\n", "\n")

    def extract(self, text: str) -> str | None:
        return extract_code(text)

    def verdict(self, ex: dict, text: str) -> Verdict:
        code = extract_code(text)
        if code is None:
            return Verdict("fail", "no code in the completion")
        return run_program(code, ex["test_list"], setup=ex.get("test_setup_code") or "", **self.limits)

    def is_correct(self, ex: dict, text: str) -> bool:
        return self.is_correct_batch([ex], [text])[0]

    def verdicts(self, exs: list[dict], texts: list[str], workers: int | None = None) -> list[Verdict]:
        if len(exs) != len(texts):
            raise ValueError(f"{len(exs)} records but {len(texts)} completions")
        codes = [extract_code(t) for t in texts]
        todo = [i for i, c in enumerate(codes) if c is not None]
        ran = run_many([(codes[i], exs[i]["test_list"], exs[i].get("test_setup_code") or "") for i in todo],
                       workers=workers, **self.limits)
        out = [Verdict("fail", "no code in the completion")] * len(texts)
        for i, v in zip(todo, ran):
            out[i] = v
        return out

    def is_correct_batch(self, exs: list[dict], texts: list[str]) -> list[bool]:
        """One bool per completion; raises HarnessError when the sandbox fails its self-test or cannot run a
        program (see the module docstring)."""
        if len(exs) != len(texts):
            raise ValueError(f"{len(exs)} records but {len(texts)} completions")
        problem = sandbox.self_test(**self.limits)
        if problem is not None:
            self._count_harness(len(texts), len(texts))
            raise HarnessError(problem, count=len(texts), cause=problem)
        verdicts = self.verdicts(exs, texts)
        broken = [v for v in verdicts if v.harness_error]
        self._count_harness(len(verdicts), len(broken))
        if broken:
            raise HarnessError(f"the sandbox could not run {len(broken)} of {len(verdicts)} programs; first: "
                               f"{broken[0].reason}", count=len(broken), cause=broken[0].reason)
        return [v.passed for v in verdicts]
