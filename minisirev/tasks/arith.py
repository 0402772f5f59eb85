"""arith: the embedded default task, GSM8K-shaped word problems generated from a seed (no network needed).

Records use GSM8K's field layout plus two extras:
    {"id": "arith-train-00017", "question": str, "answer": str, "level": int}
`answer` is written the way GSM8K writes solutions: one step per line with a `<<expr=value>>` calculator
annotation, then a final line `#### N`. All arithmetic is exact on integers and every value is non-negative.

A problem is a few people, each holding a quantity of one item, combined into one total:
    direct    "Ann has 7 pens."                             (no step: the number enters the sum)
    change    "Ann has 7 pens and gets 5 more."             -> "Ann has 7+5=<<7+5=12>>12 pens."
    product   "Ann has 3 bags with 4 pens each."           -> "Ann has 3*4=<<3*4=12>>12 pens."
then "They have 12+9+4=<<12+9+4=25>>25 pens in total.", optionally a loss ("They lose 6 pens.") and at level 5 a
price ("They sell each of the rest for 3 dollars."). The people's sub-results are independent, so they can be
computed in any order and the sum's terms can be written in any order: the gold solution picks one order with the
seeded generator, and the verifier only checks the final "#### N", so solution diversity and distinct equation
sequences are measurable.

Levels (more steps, and more numbers to carry from the question, as the level rises):
    1  one change, or a sum of two direct amounts, or a change plus a direct amount (1-2 steps; numbers < 30)
    2  a product (2-4 x 2-9) and a direct or changed amount, summed, sometimes a loss (2-3 steps)
    3  two computed amounts (products or changes) and maybe a direct one, summed, sometimes a loss (3-4 steps)
    4  three computed amounts, summed, then a loss (5 steps; amounts up to 60)
    5  three computed amounts, summed, a loss, then a price of 2-5 dollars each (6 steps; up to 4 digits)
The vocabulary is deliberately small (six names, six items, three containers, a few verbs) and the numbers stay
small enough that a model of about a million parameters solves every level at some rate: the levels differ in
length (steps, and numbers copied from the question), so accuracy falls with the level without reaching zero.

Shipped splits (data/arith/, regenerated bit-for-bit by `python data/arith/make.py`): train (2000, levels 1-3),
test (300, levels 1-3), ood (500, levels 1-5, 100 per level). No question appears in two splits.
Prompt and reference are GSM8K's (see gsm8k.py): prompt "Question: ...\\nAnswer:\\n", reference the solution.
The verifier is GSM8K's strict form: a completion is correct iff it has a "#### N" line and the number after the
last "####" equals the gold answer (lm-evaluation-harness's "strict-match" for GSM8K). The answer format is part
of the task: a completion that reaches the right number in another layout ("... The answer is 25.") is wrong,
which is what a pretrained model that was never taught the format gets (GSM8K's own verifier falls back to the
last number in the text; arith does not).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

from minisirev.tasks.base import DataError
from minisirev.tasks.gsm8k import GSM8K, NUMBER_RE, extract_number, normalize_number

NAMES = ["Tom", "Ann", "Ben", "Mia", "Sam", "Eva"]
ITEMS = ["apples", "pens", "books", "eggs", "cards", "stamps"]
CONTAINERS = ["bags", "boxes", "packs"]

# per level: range of direct amounts, of small changes, of container counts and of items per container
_RANGES = {
    1: dict(n=(1, 20), m=(1, 9), a=(2, 3), b=(2, 5)),
    2: dict(n=(1, 30), m=(1, 9), a=(2, 4), b=(2, 9)),
    3: dict(n=(1, 50), m=(1, 20), a=(2, 6), b=(2, 12)),
    4: dict(n=(10, 60), m=(1, 20), a=(2, 6), b=(2, 12)),
    5: dict(n=(10, 60), m=(1, 20), a=(2, 6), b=(2, 12), p=(2, 5)),
}


def _person(rng: random.Random, kind: str, name: str, item: str, r: dict) -> tuple[str, str | None, int]:
    """One person's sentence, solution line (None for a direct amount) and value."""
    if kind == "direct":
        n = rng.randint(*r["n"])
        return f"{name} has {n} {item}.", None, n
    if kind == "up":
        n, m = rng.randint(*r["n"]), rng.randint(*r["m"])
        v = n + m
        return f"{name} has {n} {item} and gets {m} more.", f"{name} has {n}+{m}=<<{n}+{m}={v}>>{v} {item}.", v
    if kind == "down":
        n = rng.randint(max(r["n"][0], r["m"][0] + 1), r["n"][1])
        m = rng.randint(r["m"][0], min(r["m"][1], n - 1))
        v = n - m
        return f"{name} has {n} {item} and gives away {m}.", f"{name} has {n}-{m}=<<{n}-{m}={v}>>{v} {item}.", v
    a, b, c = rng.randint(*r["a"]), rng.randint(*r["b"]), rng.choice(CONTAINERS)
    v = a * b
    return f"{name} has {a} {c} with {b} {item} each.", f"{name} has {a}*{b}=<<{a}*{b}={v}>>{v} {item}.", v


def _plan(rng: random.Random, level: int) -> tuple[list[str], bool, bool]:
    """The kinds of the people, whether a loss follows the sum, whether a price follows the loss."""
    computed = lambda: rng.choice(["up", "down", "product"])  # noqa: E731
    change = lambda: rng.choice(["up", "down"])  # noqa: E731
    if level == 1:
        shape = rng.randrange(3)
        if shape == 0:
            return [change()], False, False
        if shape == 1:
            return ["direct", "direct"], False, False
        return [change(), "direct"], False, False
    if level == 2:
        return ["product", rng.choice(["direct", "up", "down"])], rng.random() < 0.5, False
    if level == 3:
        kinds = [computed(), computed()] + (["direct"] if rng.random() < 0.5 else [])
        return kinds, rng.random() < 0.5, False
    if level == 4:
        return [computed() for _ in range(3)], True, False
    return [computed() for _ in range(3)], True, True


def make_problem(rng: random.Random, level: int) -> dict:
    """One problem at `level` (1..5): {"question", "answer", "level"}."""
    if level not in _RANGES:
        raise ValueError(f"arith level must be 1..5, got {level}")
    r = _RANGES[level]
    kinds, loss, price = _plan(rng, level)
    item = rng.choice(ITEMS)
    names = rng.sample(NAMES, len(kinds))
    people = [_person(rng, k, nm, item, r) for k, nm in zip(kinds, names)]
    sentences = [p[0] for p in people]
    values = [p[2] for p in people]
    # the people's sub-results are independent: the gold solution computes them in a seeded order
    order = list(range(len(people)))
    rng.shuffle(order)
    lines = [people[i][1] for i in order if people[i][1] is not None]
    if len(people) == 1:
        question = f"{sentences[0]} How many {item} does {names[0]} have now?"
        total = values[0]
    else:
        terms = [values[i] for i in order]
        total = sum(terms)
        expr = "+".join(map(str, terms))
        lines.append(f"They have {expr}=<<{expr}={total}>>{total} {item} in total.")
        question = " ".join(sentences)
        if not loss:
            question += f" How many {item} do they have in total?"
    if loss:
        lo = r["m"][0]
        m = rng.randint(lo, max(lo, min(r["m"][1], total - 1)))
        m = min(m, total)
        left = total - m
        lines.append(f"They have {total}-{m}=<<{total}-{m}={left}>>{left} {item} left.")
        question += f" They lose {m} {item}."
        total = left
        if price:
            p = rng.randint(*r["p"])
            money = total * p
            lines.append(f"They get {total}*{p}=<<{total}*{p}={money}>>{money} dollars.")
            question += f" They sell each of the rest for {p} dollars. How many dollars do they get?"
            total = money
        else:
            question += f" How many {item} do they have left?"
    lines.append(f"#### {total}")
    return {"question": question, "answer": "\n".join(lines), "level": level}


def make_problems(seed: int, n: int, levels: Iterable[int] = (1, 2, 3), *, exclude: Iterable[str] = (),
             prefix: str = "arith") -> list[dict]:
    """`n` distinct problems from `seed`, levels taken round-robin from `levels`, none whose question is in
    `exclude`. Records: {"id": f"{prefix}-{i:05d}", "question", "answer", "level"}. Deterministic in its inputs."""
    levels = list(levels)
    if not levels:
        raise ValueError("arith.make_problems needs at least one level")
    rng = random.Random(seed)
    seen = set(exclude)
    out = []
    tries = 0
    while len(out) < n:
        level = levels[len(out) % len(levels)]
        ex = make_problem(rng, level)
        tries += 1
        if tries > 1000 * (n + 10):
            raise RuntimeError(f"arith.make_problems: could not find {n} distinct problems at levels {levels}")
        if ex["question"] in seen:
            continue
        seen.add(ex["question"])
        out.append({"id": f"{prefix}-{len(out):05d}", **ex})
    return out


# the shipped splits: (split, seed, size, levels), generated in this order, each excluding the questions before it
SPLITS = [("train", 1, 2000, (1, 2, 3)), ("test", 2, 300, (1, 2, 3)), ("ood", 3, 500, (1, 2, 3, 4, 5))]


def make_splits() -> dict[str, list[dict]]:
    """The shipped splits of data/arith/, disjoint by question text."""
    out, seen = {}, set()
    for split, seed, size, levels in SPLITS:
        out[split] = make_problems(seed, size, levels, exclude=seen, prefix=f"arith-{split}")
        seen.update(ex["question"] for ex in out[split])
    return out


class Arith(GSM8K):
    name = "arith"
    fields = {"question": str, "answer": str, "level": int}
    splits = {"train": "train", "test": "test", "ood": "ood"}
    ood_task = None

    def validate(self, ex: dict, path, lineno: int) -> None:
        super().validate(ex, path, lineno)
        if not 1 <= ex["level"] <= 5:
            raise DataError(path, lineno, f"field 'level' should be 1..5, got {ex['level']}")

    def level(self, ex: dict) -> int | None:
        return ex["level"]

    def extract(self, text: str) -> str | None:
        """The number after the last "####" (normalised as GSM8K's); None when there is no "#### N"."""
        if not text or "####" not in text:
            return None
        m = NUMBER_RE.search(text.rsplit("####", 1)[1])
        return normalize_number(m.group(0)) if m else None


def check_solution(answer: str) -> bool:
    """Every `<<expr=value>>` annotation evaluates exactly (integers, + - *) and the last one equals `#### N`."""
    anns = re.findall(r"<<([0-9+\-*]+)=(-?\d+)>>", answer)
    if not anns:
        return False
    for expr, val in anns:
        if _eval_int(expr) != int(val):
            return False
    return extract_number(answer) == str(int(anns[-1][1]))


def _eval_int(expr: str) -> int:
    """Exact + - * over non-negative integers with the usual precedence, no eval()."""
    total = 0
    for i, term in enumerate(expr.replace("-", "+-").split("+")):
        if term == "" and i == 0:
            continue
        sign = -1 if term.startswith("-") else 1
        prod = 1
        for f in term.lstrip("-").split("*"):
            prod *= int(f)
        total += sign * prod
    return total
