"""The math-verify wrapper: its verdicts on the fixtures, the disagreement counts, and the not-installed path."""

import builtins
import json
from pathlib import Path

import pytest

from minisirev import second_verifier as sv
from minisirev.tasks import get_task

FIXTURES = Path(__file__).parent / "fixtures"


def _records(name):
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def test_disagreement_hand_built():
    ours = [True, True, False, False, True, False]
    theirs = [True, False, False, True, True, True]
    got = sv.disagreement(ours, theirs, items=[{"id": f"q{i}"} for i in range(6)], examples=2)
    assert got["n"] == 6 and got["disagree"] == 3 and got["rate"] == pytest.approx(0.5)
    assert got["ours_only"] == 1 and got["theirs_only"] == 2
    assert got["examples"] == [{"index": 1, "ours": True, "theirs": False, "id": "q1"},
                               {"index": 3, "ours": False, "theirs": True, "id": "q3"}]
    assert sv.disagreement([], [])["rate"] is None
    with pytest.raises(ValueError):
        sv.disagreement([True], [True, False])


def test_not_installed_is_reported(monkeypatch):
    real_import = builtins.__import__

    def no_math_verify(name, *args, **kwargs):
        if name == "math_verify" or name.startswith("math_verify."):
            raise ImportError("No module named 'math_verify'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_math_verify)
    recs = _records("gsm8k")
    assert sv.second_opinion("gsm8k", recs, [r["answer"] for r in recs]) is None
    assert sv.version() is None
    got = sv.compare_verifiers("gsm8k", recs, [r["answer"] for r in recs], [True] * len(recs))
    assert got["installed"] is False and "not installed" in got["reason"]


def test_only_math_tasks():
    with pytest.raises(ValueError, match="not to task 'csqa'"):
        sv.second_opinion("csqa", [], [])


def test_gold_text():
    assert sv.gold_text("gsm8k", {"answer": "a\n#### 1,325"}) == "$1,325$"
    assert sv.gold_text("arith", {"answer": "x #### 3\n#### 12"}) == "$12$"
    assert sv.gold_text("math", {"solution": "so \\boxed{5}"}) == "so \\boxed{5}"


def test_math_verify_agrees_on_clear_cases():
    pytest.importorskip("math_verify")  # the optional extra; the tests above cover the path without it
    gsm = _records("gsm8k")
    texts = [r["answer"] for r in gsm]  # the gold solutions themselves: right for both verifiers
    texts += ["So they have 41 left.\n#### 41"] * len(gsm)  # no fixture's answer is 41: wrong for both
    recs = gsm + gsm
    theirs = sv.second_opinion("gsm8k", recs, texts)
    ours = get_task("gsm8k").is_correct_batch(recs, texts)
    assert theirs == ours == [True] * len(gsm) + [False] * len(gsm)

    math_recs = [r for r in _records("math") if "interval" not in r["solution"]]
    math_texts = [r["solution"] for r in math_recs]
    assert sv.second_opinion("math", math_recs, math_texts) == [True] * len(math_recs)
    half = {"problem": "p", "solution": "$\\boxed{\\frac{1}{2}}$", "level": "Level 1", "type": "Algebra"}
    assert sv.second_opinion("math", [half] * 3, ["\\boxed{0.5}", "\\boxed{\\dfrac12}", "\\boxed{2}"]) == \
        [True, True, False]


def test_compare_verifiers_shows_a_disagreement():
    pytest.importorskip("math_verify")
    rec = {"id": "arith-test-00001", "question": "q", "answer": "2+3=<<2+3=5>>5\n#### 5", "level": 1}
    # Ours reads the number after the last "####" (4: wrong); math-verify reads the last number (5: right).
    texts = ["2+3=<<2+3=5>>5\n#### 5", "#### 4\nso the total is 5"]
    ours = get_task("arith").is_correct_batch([rec, rec], texts)
    assert ours == [True, False]
    got = sv.compare_verifiers("arith", [rec, rec], texts, ours)
    assert got["installed"] is True and got["version"] and got["task"] == "arith"
    assert got["n"] == 2 and got["disagree"] == 1 and got["theirs_only"] == 1 and got["rate"] == 0.5
    (e,) = got["examples"]
    assert e["id"] == "arith-test-00001" and e["gold"] == "5" and e["ours_answer"] == "4"
    assert e["theirs_answer"] == "5" and e["ours"] is False and e["theirs"] is True
    json.dumps(got, allow_nan=False)


def test_gold_answers_are_parsed_once_per_process(monkeypatch):
    mv = pytest.importorskip("math_verify")
    recs = _records("gsm8k")
    golds = {sv.gold_text("gsm8k", r) for r in recs}
    seen = []
    real_parse = mv.parse
    monkeypatch.setattr(mv, "parse", lambda text, **kw: seen.append(text) or real_parse(text, **kw))
    sv._parse_gold.cache_clear()
    texts = [r["answer"] for r in recs]
    first = sv.second_opinion("gsm8k", recs + recs, texts + texts)  # each record twice: n samples of a question
    again = sv.second_opinion("gsm8k", recs, texts)  # the next iteration judges the same records
    assert first == [True] * (2 * len(recs)) and again == [True] * len(recs)
    assert sorted(t for t in seen if t in golds) == sorted(golds)  # each gold once, over both calls
    assert sum(t not in golds for t in seen) == 3 * len(recs)  # every completion parsed, on every call
