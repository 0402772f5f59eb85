"""MATH (Hendrycks et al. 2021, arXiv 2103.03874): competition problems, levels 1-5, seven subjects.

(The file is math_task.py so that it does not shadow the standard library's `math`; `get_task("math")` is it.)
Records keep the upstream layout: `{"problem": str, "solution": str, "level": "Level 3", "type": "Algebra"}`.

    prompt(ex)    = "Problem: {problem}\\nSolution:\\n"
    reference(ex) = ex["solution"]    (the worked solution, answer in \\boxed{...})
    level(ex)     = 3 for "Level 3"; None for "Level ?" (a few records of the train split) or a missing level

Answer extraction (`extract_math_answer`): the content of the last \\boxed{...} or \\fbox{...} (nested braces
matched; also "\\boxed 5"; a box with unbalanced braces gives no answer at all); else, for models trained on
GSM8K-style solutions (the OOD evaluation of a GSM8K run), the text after the last "####" up to the end of its line;
else the last "answer is X"; else the last number.

Normalisation (`normalize_math`, after Hendrycks's `strip_string`, extended):
  - remove spaces, newlines, "\\!", "\\,", "\\;", "\\left", "\\right", "$", "^\\circ", "^{\\circ}", "\\%", "%";
  - "\\dfrac" and "\\tfrac" -> "\\frac"; "\\frac12" -> "\\frac{1}{2}"; "\\sqrt3" -> "\\sqrt{3}";
  - units: a trailing "\\text{ units}" / "\\mbox{...}" is dropped; other "\\text{X}" -> "X";
  - an "x=" / "y =" style prefix (one or two characters before a single "=") is dropped;
  - trailing periods are dropped; a leading "." gets a "0" (".5" -> "0.5"); thousands commas in plain numbers
    ("1,000") are dropped.
Equivalence (`math_equal`): equal normalised strings, or both parse as exact rationals (integers, decimals,
"a/b", "\\frac{a}{b}", optional minus) with the same value, so "0.5", "1/2", "\\frac12" and "\\dfrac{1}{2}" agree.
"""

from __future__ import annotations

import re
from fractions import Fraction

from minisirev.tasks.base import DataError, Task
from minisirev.tasks.gsm8k import NUMBER_RE


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} with nested braces, or of "\\boxed X"; None if none."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    i = idx + (6 if text.startswith("\\boxed", idx) else 5)
    if text.startswith(" ", i) and not text.startswith("{", i):
        rest = text[i:].lstrip()
        m = re.match(r"[^\s$]+", rest)
        return m.group(0) if m else None
    if not text.startswith("{", i):
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced braces: no answer


def extract_math_answer(text: str | None) -> str | None:
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if "\\boxed" in text or "\\fbox" in text:
        return None  # a box that does not parse is no answer (never fall back to a stray number)
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().split("\n")[0].strip()
        if tail:
            return tail
    m = list(re.finditer(r"(?i)answer is:?\s*(.+)", text))
    if m:
        return m[-1].group(1).strip().split("\n")[0]
    nums = NUMBER_RE.findall(text)
    return nums[-1] if nums else None


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}, \\frac{1}2 -> \\frac{1}{2}."""
    parts = s.split("\\frac")
    out = parts[0]
    for p in parts[1:]:
        out += "\\frac"
        if p.startswith("{"):
            # numerator braced; denominator may be a bare character
            depth, j = 0, 0
            for j, c in enumerate(p):
                depth += c == "{"
                depth -= c == "}"
                if depth == 0:
                    break
            num, rest = p[: j + 1], p[j + 1:]
            if rest and rest[0] != "{":
                rest = "{" + rest[0] + "}" + rest[1:]
            out += num + rest
        elif len(p) >= 2:
            a, b, rest = p[0], p[1], p[2:]
            out += "{" + a + "}" + ("{" + b + "}" + rest if b != "{" else b + rest)
        else:
            out += p
    return out


def normalize_math(s: str | None) -> str | None:
    """Canonical form of a MATH answer string; see the module docstring for the rules."""
    if s is None:
        return None
    s = s.replace("\n", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\\\", "\\")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    # trailing unit text: "5 \text{ cm}" / "5\mbox{ inches}"
    s = re.sub(r"\s*\\(?:text|mbox|textbf|mathrm)\{\s[^{}]*\}\s*$", "", s)
    s = re.sub(r"\\(?:text|mbox|textbf|mathrm)\{([^{}]*)\}", r"\1", s)
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    # "x=5": drop a short left-hand side before a single "="
    if s.count("=") == 1 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = _fix_fracs(s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if s.startswith("."):
        s = "0" + s
    s = s.rstrip(".")
    return s


def _as_fraction(s: str) -> Fraction | None:
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    try:
        if m:
            v = Fraction(int(m.group(2)), int(m.group(3)))
            return -v if m.group(1) else v
        if re.fullmatch(r"-?\d+(\.\d+)?(/\d+)?|-?\.\d+", s):
            if "/" in s:
                a, b = s.split("/")
                return Fraction(a) / Fraction(b)
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def math_equal(pred: str | None, gold: str | None) -> bool:
    """Equivalence of two MATH answers after normalisation (strings, or exact rational values)."""
    if pred is None or gold is None:
        return False
    a, b = normalize_math(pred), normalize_math(gold)
    if a == b:
        return True
    fa, fb = _as_fraction(a), _as_fraction(b)
    return fa is not None and fb is not None and fa == fb


class MATH(Task):
    name = "math"
    fields = {"problem": str, "solution": str, "level": str, "type": str}
    splits = {"train": "train", "test": "test", "ood": "test"}

    def validate(self, ex: dict, path, lineno: int) -> None:
        if last_boxed(ex["solution"]) is None:
            raise DataError(path, lineno, "field 'solution' has no \\boxed{...} answer")

    def prompt(self, ex: dict) -> str:
        return f"Problem: {ex['problem'].strip()}\nSolution:\n"

    def reference(self, ex: dict) -> str:
        return ex["solution"]

    def extract(self, text: str) -> str | None:
        return extract_math_answer(text)

    def is_correct(self, ex: dict, text: str) -> bool:
        return math_equal(self.extract(text), last_boxed(ex["solution"]))

    def level(self, ex: dict) -> int | None:
        """3 for "Level 3" (or the int 3); None for anything else: "Level ?", a missing or null field."""
        lv = ex.get("level")
        if isinstance(lv, int) and not isinstance(lv, bool):
            return lv
        m = re.fullmatch(r"\s*Level\s+(\d+)\s*", lv) if isinstance(lv, str) else None
        return int(m.group(1)) if m else None
