"""Tasks and verifiers: every fixture record verifies against its own reference, wrong answers are rejected,
tricky extractions per task, the arith generator and its shipped splits, and one-line errors on bad input."""

import collections
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from minisirev.tasks import TASKS, DataError, get_task
from minisirev.tasks.arith import check_solution, make_problem, make_problems, make_splits
from minisirev.tasks.csqa import extract_choice
from minisirev.tasks.gsm8k import extract_number, normalize_number
from minisirev.tasks.math_task import extract_math_answer, math_equal
from minisirev.tasks.mbpp import extract_code

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
REAL = ["gsm8k", "math", "csqa", "mbpp"]


def records(name):
    return get_task(name).load(str(FIX / f"{name}.jsonl"))


def wrong_answer(name, ex):
    """A completion that is well-formed but wrong for `ex`."""
    if name in ("gsm8k", "arith"):
        return f"So the answer is\n#### {int(float(extract_number(ex['answer']))) + 1}"
    if name == "math":
        return "Therefore the answer is $\\boxed{\\frac{7}{13}}$."
    if name == "csqa":
        other = next(lab for lab in ex["choices"]["label"] if lab != ex["answerKey"])
        return f"The answer is {other}."
    return "```python\ndef nothing():\n    return None\n```"


# ---- the interface ---------------------------------------------------------------------------------------------


def test_get_task_names_and_unknown():
    for name in TASKS:
        t = get_task(name)
        assert t.name == name
        assert set(t.splits) == {"train", "test", "ood"}
    with pytest.raises(ValueError, match="valid tasks: arith, gsm8k, math, csqa, mbpp"):
        get_task("gsm9k")
    assert get_task("gsm8k").ood_task == "math"


@pytest.mark.parametrize("name", REAL)
def test_reference_verifies_and_wrong_is_rejected(name):
    t = get_task(name)
    exs = records(name)
    refs = [t.reference(ex) for ex in exs]
    for ex, ref in zip(exs, refs):
        assert t.prompt(ex).endswith("\n") and t.prompt(ex).strip()
        assert t.extract(ref) is not None
    assert t.is_correct_batch(exs, refs) == [True] * len(exs)
    assert t.is_correct_batch(exs, [wrong_answer(name, ex) for ex in exs]) == [False] * len(exs)
    assert t.is_correct_batch(exs, [""] * len(exs)) == [False] * len(exs)
    if name != "mbpp":  # one-at-a-time path as well (MBPP's is the sandbox, exercised by the batch above)
        assert all(t.is_correct(ex, ref) for ex, ref in zip(exs, refs))


def test_levels():
    assert [get_task("math").level(ex) for ex in records("math")] == [1, 2, 3, 4, 5, None, 2]
    assert get_task("gsm8k").level(records("gsm8k")[0]) is None
    arith = get_task("arith")
    assert {arith.level(ex) for ex in arith.load("ood")} == {1, 2, 3, 4, 5}


# ---- tricky extraction tables ----------------------------------------------------------------------------------

GSM8K_CASES = [  # completion, gold, correct?
    ("She pays 1,000+250=<<1000+250=1250>>1,250 dollars.\n#### 1,250", "1250", True),
    ("#### $1,250.00", "1250", True),
    ("#### 8 apples", "8", True),
    ("#### 8.0", "8", True),
    ("The answer is 18.", "18", True),
    ("It costs $5.50 in total", "5.5", True),
    ("#### -6", "-6", True),
    ("The loss is 4-10=-6 degrees\n#### -6", "-6", True),
    ("5 apples, then 3 more: 8 apples\n#### 9", "8", False),  # the number after #### wins over earlier ones
    ("#### 3/4", "0.75", True),
    ("#### 50%", "50", True),
    ("#### 1,2", "12", False),  # not a thousands comma: reads 1
    ("no number at all", "0", False),
    ("####", "0", False),
]


@pytest.mark.parametrize("text,gold,ok", GSM8K_CASES)
def test_gsm8k_extraction(text, gold, ok):
    ex = {"question": "q", "answer": f"#### {gold}"}
    assert get_task("gsm8k").is_correct(ex, text) is ok


def test_normalize_number():
    assert normalize_number("$1,234.50") == "1234.5"
    assert normalize_number("12 dollars.") == "12"
    assert normalize_number("2/4") == "0.5"
    assert normalize_number("1/3") == "1/3"
    assert normalize_number("none") is None


MATH_CASES = [  # completion, gold boxed content, equivalent?
    ("so $\\boxed{\\frac{1}{2}}$", "0.5", True),
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}", True),
    ("\\boxed{\\tfrac{3}{4}}", "3/4", True),
    ("\\boxed{ 5 }", "5", True),
    ("\\boxed{5.0}", "5", True),
    ("\\boxed{x = 3}", "3", True),
    ("\\boxed{10\\%}", "10", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{90^{\\circ}}", "90", True),
    ("\\boxed{12 \\text{ cm}}", "12", True),
    ("\\boxed{\\left( 1,3 \\right]}", "(1,3]", True),
    ("The answer is \\boxed{\\frac{\\sqrt{3}}{2}}.", "\\frac{\\sqrt3}{2}", True),
    ("\\boxed{3.}", "3", True),
    ("\\boxed{\\$ 1,000}", "1000", True),
    ("\\fbox{7}", "7", True),
    ("\\boxed 7", "7", True),
    ("\\boxed{-\\frac{1}{3}}", "-1/3", True),
    ("\\boxed{\\!5}", "5", True),
    ("\\boxed{.5}", "\\frac12", True),
    ("\\boxed{\\text{(B)}}", "(B)", True),
    ("first \\boxed{1}, finally \\boxed{2}", "2", True),
    ("GSM8K style\n#### 42", "42", True),
    ("\\boxed{\\frac{1}{3}}", "0.33", False),
    ("\\boxed{2}", "3", False),
    ("\\boxed{x^2}", "x^3", False),
    ("\\boxed{\\frac{1}{2}", "2", False),  # unbalanced box: no answer, never the stray "2"
    ("no answer here", "5", False),
]


@pytest.mark.parametrize("text,gold,ok", MATH_CASES)
def test_math_extraction(text, gold, ok):
    assert math_equal(extract_math_answer(text), gold) is ok
    ex = {"problem": "p", "solution": f"\\boxed{{{gold}}}", "level": "Level 1", "type": "Algebra"}
    assert get_task("math").is_correct(ex, text) is ok


CSQA_CASES = [  # completion, extracted letter
    ("The answer is B (go to sleep).", "B"),
    ("B", "B"),
    ("b", "B"),
    ("(C)", "C"),
    ("C) bank", "C"),
    ("I think the right choice is (D) candles.", "D"),
    ("Answer: E", "E"),
    ("the answer is e.", "E"),
    ("A person would keep it in a bank, so the answer is C.", "C"),
    ("A good place is the bank", "C"),  # choice text match; the article "A" is no answer
    ("the answer is a bank", "C"),  # "a" is an article here, then the choice text is matched
    ("Between A. and B., the best is B", "B"),
    ("I am not sure.", None),
    ("The answer is F.", None),  # not a label of this question
]


@pytest.mark.parametrize("text,letter", CSQA_CASES)
def test_csqa_extraction(text, letter):
    ex = records("csqa")[2]  # choices: street, pocket of old coat, bank, beach, bus; key C
    assert extract_choice(text, ex["choices"]["label"], ex["choices"]["text"]) == letter


MBPP_CASES = [
    ("```python\ndef f():\n    return 1\n```\nThis returns one.", "def f():\n    return 1\n"),
    ("Here you go:\n```\ndef f():\n    return 1\n```", "def f():\n    return 1\n"),
    ("```python\ndef f():\n    return 1", "def f():\n    return 1"),  # unterminated fence
    ("def f():\n    return 1\n[DONE]", "def f():\n    return 1"),
    ("   ", None),
]


@pytest.mark.parametrize("text,code", MBPP_CASES)
def test_mbpp_extraction(text, code):
    assert extract_code(text) == code


def test_mbpp_prompt_shows_tests():
    ex = records("mbpp")[0]
    p = get_task("mbpp").prompt(ex)
    assert ex["text"] in p and all(t in p for t in ex["test_list"])


# ---- arith -----------------------------------------------------------------------------------------------------


def test_arith_generator_is_deterministic():
    a = make_problems(123, 60, (1, 2, 3, 4, 5))
    assert a == make_problems(123, 60, (1, 2, 3, 4, 5))
    assert a != make_problems(124, 60, (1, 2, 3, 4, 5))
    assert [ex["level"] for ex in a[:10]] == [1, 2, 3, 4, 5] * 2
    held = {ex["question"] for ex in a}
    assert not held & {ex["question"] for ex in make_problems(123, 60, (1, 2, 3, 4, 5), exclude=held)}


def test_arith_levels_grow():
    steps, sizes = {}, {}
    for level in range(1, 6):
        rng = random.Random(level)
        exs = [make_problem(rng, level) for _ in range(200)]
        assert all(check_solution(ex["answer"]) for ex in exs)
        steps[level] = sum(ex["answer"].count("<<") for ex in exs) / len(exs)
        sizes[level] = max(int(ex["answer"].rsplit("####", 1)[1]) for ex in exs)
    assert steps[1] < steps[2] < steps[3] < steps[4] < steps[5]
    assert 1 <= steps[1] <= 2 and steps[5] >= 6
    assert sizes[1] < 100 < sizes[4]


def test_arith_verifier_is_strict():
    """arith grades the "#### N" line only (lm-evaluation-harness's strict-match); GSM8K falls back to the last
    number. The same right number in another layout is wrong for arith and right for GSM8K."""
    t, g = get_task("arith"), get_task("gsm8k")
    ex = {"question": "q", "answer": "Ann has 7+5=<<7+5=12>>12 pens.\n#### 12", "level": 1}
    prose = "Ann has 7+5=12 pens. The answer is 12."
    assert t.is_correct(ex, ex["answer"]) and t.is_correct(ex, "#### 12.0") and t.is_correct(ex, "x\n#### $12")
    assert not t.is_correct(ex, prose) and g.is_correct(ex, prose)
    assert t.extract(prose) is None and t.extract("#### ") is None and t.extract("") is None
    assert not t.is_correct(ex, "#### 12\n#### 13")  # the last "####" counts
    assert t.is_correct(ex, "#### 13\n#### 12 pens")


def test_arith_level_profile():
    """Levels 4-5 stay in reach of a tiny model: amounts up to 60, the level-5 price at most 5, three people."""
    for level in (4, 5):
        rng = random.Random(level)
        for _ in range(200):
            ex = make_problem(rng, level)
            assert ex["answer"].count("\n") == level + 1  # 3 people, the sum, the loss (+ the price), "####"
            assert int(ex["answer"].rsplit("####", 1)[1]) < 10000


def test_arith_shipped_splits():
    t = get_task("arith")
    splits = {s: t.load(s) for s in ("train", "test", "ood")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 2000, "test": 300, "ood": 500}
    assert collections.Counter(ex["level"] for ex in splits["ood"]) == {lv: 100 for lv in range(1, 6)}
    for s in ("train", "test"):
        assert {ex["level"] for ex in splits[s]} == {1, 2, 3}
    questions = {s: {ex["question"] for ex in v} for s, v in splits.items()}
    for s, v in splits.items():
        assert len(questions[s]) == len(v), f"duplicate question inside {s}"
    assert not questions["train"] & questions["test"]
    assert not questions["train"] & questions["ood"]
    assert not questions["test"] & questions["ood"]
    for v in splits.values():
        assert all(check_solution(ex["answer"]) for ex in v)
        assert t.is_correct_batch(v, [t.reference(ex) for ex in v]) == [True] * len(v)
    assert splits == make_splits()  # the shipped files are what the generator makes


def test_arith_make_check():
    r = subprocess.run([sys.executable, str(ROOT / "data" / "arith" / "make.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_arith_admits_several_solution_orders():
    t = get_task("arith")
    exs = t.load("test")
    multi = [ex for ex in exs if ex["answer"].count("\n") >= 3]  # two or more independent sub-results, then a sum
    assert len(multi) > 50
    for ex in multi[:20]:
        lines = ex["answer"].split("\n")
        subs = [ln for ln in lines if ln.split()[0] != "They" and not ln.startswith("####")]
        rest = [ln for ln in lines if ln not in subs]
        reordered = "\n".join(subs[::-1] + rest)
        assert t.is_correct(ex, reordered)
    orders = {tuple(ln.split()[0] for ln in ex["answer"].split("\n")[:2]) for ex in multi}
    assert len(orders) > 5


# ---- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fname,where,what", [
    ("bad_malformed.jsonl", ":2:", "malformed JSON"),
    ("bad_missing.jsonl", ":3:", "field 'answer' missing"),
    ("bad_empty.jsonl", "bad_empty.jsonl:", "empty file"),
    ("does_not_exist.jsonl", "does_not_exist.jsonl:", "file not found"),
])
def test_bad_input_is_one_line(fname, where, what):
    with pytest.raises(DataError) as e:
        get_task("gsm8k").load(str(FIX / fname))
    msg = str(e.value)
    assert "\n" not in msg and fname in msg and where in msg and what in msg


def test_bad_fields_per_task(tmp_path):
    bad = {
        "math": {"problem": "p", "solution": "no box", "level": "Level 1", "type": "Algebra"},
        "csqa": {"question": "q", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": "C"},
        "mbpp": {"text": "t", "code": "c", "test_list": []},
        "arith": {"question": "q", "answer": "#### 3", "level": 9},
        "gsm8k": {"question": "q", "answer": "no final line"},
    }
    for name, row in bad.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match=rf"{name}\.jsonl:1: field '"):
            get_task(name).load(str(path))
    # one bad record does not hide which one: line numbers count blank lines too
    path = tmp_path / "lines.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n\n" + json.dumps({"question": 3}) + "\n")
    with pytest.raises(DataError, match=r"lines\.jsonl:3: field 'question' should be str"):
        get_task("gsm8k").load(str(path))


def test_prepare_without_network_says_so_in_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "gsm8k", "--out", str(tmp_path / "g"),
                        "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0]
    assert "train.jsonl" in lines[0] and "test.jsonl" in lines[0]
