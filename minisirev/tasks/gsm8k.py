"""GSM8K (Cobbe et al. 2021, arXiv 2110.14168): grade-school word problems with a numeric final answer.

Records keep the upstream layout: `{"question": str, "answer": str}`, where `answer` is the worked solution, one
step per line with `<<expr=value>>` calculator annotations, ending in a line `#### N`.

    prompt(ex)    = "Question: {question}\\nAnswer:\\n"     (zero-shot, completion style)
    reference(ex) = ex["answer"]                           (the solution itself, ending "#### N")

Answer extraction (`extract_number`, shared with the `arith` task):
  1. if the text contains "####", the first number after the last "####";
  2. otherwise (or when nothing numeric follows the last "####") the last number in the text.
Number normalisation (`normalize_number`): thousands commas ("1,234"), currency signs ("$5"), a trailing percent
sign, trailing units or words ("5 apples", "12 dollars."), a trailing period and trailing zeros after the point
("5.0", "2.50") are dropped; a leading minus is kept only when it is not a subtraction ("3-5" reads 5 as the last
number, "-5" reads -5). Fractions "a/b" are read as exact rationals. Comparison is exact rational equality, so
"8", "8.0", "8.00" and "$8" all equal 8, and "0.5" equals "1/2".

The OOD split of a GSM8K run is the MATH test set (as in the paper; docs/method.md): `splits["ood"]` names a
split of `ood_task`.
"""

from __future__ import annotations

import re
from fractions import Fraction

from minisirev.tasks.base import DataError, Task

# a number: optional sign (not a subtraction), optional $, digits with optional thousands commas and decimals,
# or a bare decimal ".5"; optionally "/denominator".
_NUM = r"(?<![\w)\]}.])-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|(?<![\w.])\.\d+"
NUMBER_RE = re.compile(_NUM)


def normalize_number(s: str | None) -> str | None:
    """Canonical string of a number written GSM8K-style ("1,000", "$5.00", "50%", "3/4", "-2"); None if none.

    Integers print as integers ("8.0" -> "8"), other rationals as a reduced fraction "a/b" when they are not
    terminating decimals, else as the shortest decimal ("2.50" -> "2.5").
    """
    if s is None:
        return None
    m = NUMBER_RE.search(s.strip())
    if m is None:
        return None
    return _canon(_to_fraction(m.group(0)))


def _to_fraction(tok: str) -> Fraction:
    tok = tok.replace("$", "").replace(",", "")
    if "/" in tok:
        num, den = tok.split("/", 1)
        d = Fraction(den)
        return Fraction(num) / d if d != 0 else Fraction(num)
    return Fraction(tok)


def _canon(x: Fraction) -> str:
    if x.denominator == 1:
        return str(x.numerator)
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d == 1:  # terminating decimal
        s = f"{float(x):.12f}".rstrip("0").rstrip(".")
        if Fraction(s) == x:
            return s
    return f"{x.numerator}/{x.denominator}"


def extract_number(text: str | None) -> str | None:
    """The final answer of a GSM8K-style solution, normalised (see the module docstring); None if no number."""
    if not text:
        return None
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        m = NUMBER_RE.search(tail)
        if m is not None:
            return _canon(_to_fraction(m.group(0)))
    found = NUMBER_RE.findall(text)
    return _canon(_to_fraction(found[-1])) if found else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Exact rational equality of two normalised numbers; False when either is None."""
    if a is None or b is None:
        return False
    try:
        return Fraction(a) == Fraction(b)
    except (ValueError, ZeroDivisionError):
        return a == b


class GSM8K(Task):
    name = "gsm8k"
    fields = {"question": str, "answer": str}
    splits = {"train": "train", "test": "test", "ood": "test"}
    ood_task = "math"

    def validate(self, ex: dict, path, lineno: int) -> None:
        if extract_number(ex["answer"].rsplit("####", 1)[-1] if "####" in ex["answer"] else "") is None:
            raise DataError(path, lineno, "field 'answer' has no '#### N' final line")

    def prompt(self, ex: dict) -> str:
        return f"Question: {ex['question'].strip()}\nAnswer:\n"

    def reference(self, ex: dict) -> str:
        return ex["answer"]

    def gold(self, ex: dict) -> str | None:
        return extract_number(ex["answer"])

    def extract(self, text: str) -> str | None:
        return extract_number(text)

    def is_correct(self, ex: dict, text: str) -> bool:
        return numbers_equal(self.extract(text), self.gold(ex))
