"""CommonsenseQA (Talmor et al. 2019, arXiv 1811.00937): five-way multiple choice.

Records keep the upstream layout: `{"id", "question": str, "question_concept", "choices": {"label": [..],
"text": [..]}, "answerKey": "B"}` (only question, choices and answerKey are required).

    prompt(ex)    = "Question: {question}\\nA. {text}\\nB. {text}\\n...\\nAnswer:\\n"
    reference(ex) = "The answer is {key} ({text})."

Letter extraction (`extract_choice`), first rule that finds a valid label wins:
  1. the last "answer is X" / "answer: X" / "answer X" ("answer" in any case; X a capital letter, a letter in
     parentheses, or a lower-case letter followed by punctuation or the end, so "the answer is a bank" is no "A");
  2. a label alone at the start of the text: "B", "b", "B.", "(B)", "B)", "B:";
  3. the last parenthesised label "(B)" anywhere;
  4. the text (stripped of "The answer is" and punctuation) equal to one choice's text, case-insensitive, else
     exactly one choice's text occurring in it as a whole phrase ("a bank is safest" -> the choice "bank");
  5. the last standalone capital label letter, where "A" (an article) counts only when followed by ".", ")", ":",
     "," or the end of the text.
Comparison is the extracted letter against `answerKey`, case-insensitive.
"""

from __future__ import annotations

import re

from minisirev.tasks.base import DataError, Task

_ANSWER_IS = re.compile(
    r"(?i:answer)\s*(?i:is|:)?\s*:?\s*(?:\(([A-Za-z])\)|([A-Z])(?![A-Za-z'])|([a-z])(?=\s*(?:[.):,;]|$)))")
_START = re.compile(r"^\s*\(?([A-Za-z])(?:[.):]|\s*$)")


def extract_choice(text: str | None, labels: str | list[str] = "ABCDE", texts: list[str] | None = None) -> str | None:
    """The chosen label (upper case) found in free text, or None; see the module docstring for the rules."""
    if not text:
        return None
    valid = [str(lab).upper() for lab in labels]
    found = [next(g for g in m.groups() if g).upper() for m in _ANSWER_IS.finditer(text)]
    found = [f for f in found if f in valid]
    if found:
        return found[-1]
    m = _START.match(text)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    paren = [g for g in re.findall(r"\(([A-Z])\)", text) if g in valid]
    if paren:
        return paren[-1]
    if texts:
        core = re.sub(r"(?i)^\s*(the\s+)?answer\s*(is|:)?\s*", "", text).strip().strip(".!\"' ").lower()
        hits = [lab for lab, t in zip(valid, texts) if t.strip().lower() == core]
        if len(hits) == 1:
            return hits[0]
        low = text.lower()
        hits = [lab for lab, t in zip(valid, texts)
                if t.strip() and re.search(r"(?<!\w)" + re.escape(t.strip().lower()) + r"(?!\w)", low)]
        if len(hits) == 1:
            return hits[0]
    loose = []
    for m in re.finditer(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])", text):
        g = m.group(1)
        if g not in valid:
            continue
        nxt = text[m.end():m.end() + 1]
        if g == "A" and nxt not in ("", ".", ")", ":", ","):
            continue
        loose.append(g)
    return loose[-1] if loose else None


class CommonsenseQA(Task):
    name = "csqa"
    fields = {"question": str, "choices": dict, "answerKey": str}
    splits = {"train": "train", "test": "validation", "ood": None}  # the upstream test split has no labels

    def validate(self, ex: dict, path, lineno: int) -> None:
        ch = ex["choices"]
        for f in ("label", "text"):
            if not isinstance(ch.get(f), list):
                raise DataError(path, lineno, f"field 'choices.{f}' missing")
        if len(ch["label"]) != len(ch["text"]) or not ch["label"]:
            raise DataError(path, lineno, "field 'choices' has label and text lists of different lengths")
        if ex["answerKey"].strip().upper() not in [str(x).upper() for x in ch["label"]]:
            raise DataError(path, lineno, f"field 'answerKey' {ex['answerKey']!r} is not one of the choice labels")

    def prompt(self, ex: dict) -> str:
        lines = [f"Question: {ex['question'].strip()}"]
        lines += [f"{lab}. {t}" for lab, t in zip(ex["choices"]["label"], ex["choices"]["text"])]
        return "\n".join(lines) + "\nAnswer:\n"

    def reference(self, ex: dict) -> str:
        key = ex["answerKey"].strip().upper()
        labels = [str(x).upper() for x in ex["choices"]["label"]]
        return f"The answer is {key} ({ex['choices']['text'][labels.index(key)]})."

    def extract(self, text: str) -> str | None:
        return extract_choice(text)

    def is_correct(self, ex: dict, text: str) -> bool:
        got = extract_choice(text, ex["choices"]["label"], ex["choices"]["text"])
        return got is not None and got == ex["answerKey"].strip().upper()
