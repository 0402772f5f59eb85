"""SFT-data and DPO-pair construction on constructed samples: dedupe, caps, questions with no usable sample;
the schedule of SFT-DPO; reference log-probs come from the frozen reference, not the policy being trained."""

import torch

from minisirev.config import ModelConfig
from minisirev.model import Transformer
from minisirev.tokenizer import train_tokenizer
from minisirev.training import (
    TrainArgs,
    build_dpo_pairs,
    build_sft_data,
    reference_logprobs,
    step_methods,
    train_dpo,
)

SAMPLES = [
    {"idx": 0, "prompt": "Q0", "completions": ["a", "a ", "b", "x", "y", "x"], "correct": [1, 1, 1, 0, 0, 0]},
    {"idx": 1, "prompt": "Q1", "completions": ["x", "y"], "correct": [0, 0]},  # no correct sample
    {"idx": 2, "prompt": "Q2", "completions": ["c", "c", "d", "e"], "correct": [1, 1, 1, 1]},  # no incorrect
    {"idx": 3, "prompt": "Q3", "completions": ["f", "", "z"], "correct": [1, 1, 0]},  # an empty completion
]


def test_sft_data_dedupes_caps_and_skips():
    data, stats = build_sft_data(SAMPLES, max_per_question=2)
    assert [(d["idx"], d["completion"]) for d in data] == [(0, "a"), (0, "b"), (2, "c"), (2, "d"), (3, "f")]
    assert stats == {"examples": 5, "questions": 3, "skipped_questions": 1}


def test_dpo_pairs_distinct_capped_and_skipped():
    pairs, stats = build_dpo_pairs(SAMPLES, max_per_question=3, seed=0)
    by_q = {}
    for p in pairs:
        by_q.setdefault(p["idx"], []).append((p["chosen"], p["rejected"]))
    assert set(by_q) == {0, 3}
    assert len(by_q[0]) == 3 and len(set(by_q[0])) == 3  # 2 correct x 2 incorrect = 4 combos, capped at 3
    assert all(c in ("a", "b") and r in ("x", "y") for c, r in by_q[0])
    assert by_q[3] == [("f", "z")]
    assert stats == {"pairs": 4, "questions": 2, "skipped_questions": 2}
    assert pairs == build_dpo_pairs(SAMPLES, max_per_question=3, seed=0)[0]  # seeded


def test_schedules():
    assert [step_methods("sft-dpo", t) for t in range(1, 6)] == [["sft"], ["dpo"], ["sft"], ["dpo"], ["sft"]]
    assert step_methods("sft-dpo", 3, "both") == ["sft", "dpo"]
    assert step_methods("dpo", 1) == ["sft"] and step_methods("dpo", 4) == ["dpo"]


def test_reference_logprobs_come_from_the_frozen_reference(tmp_path):
    tok = train_tokenizer(["the answer is 12", "the answer is 7", "Q: what?"] * 5, vocab_size=280)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_dim=64, eos_id=2, bos_id=1)
    policy = Transformer(cfg).init_weights(seed=0)
    ref_model = Transformer(cfg).init_weights(seed=1)  # a different model: its numbers must be the ones used
    pairs = [{"prompt": "Q: what?", "chosen": "the answer is 12", "rejected": "the answer is 7"}] * 2
    ref = reference_logprobs(ref_model, tok, pairs, TrainArgs(batch_size=2))
    own = reference_logprobs(policy, tok, pairs, TrainArgs(batch_size=2))
    assert ref != own
    before = [p.clone() for p in ref_model.parameters()]
    log = train_dpo(policy, tok, pairs, ref, TrainArgs(lr=1e-2, batch_size=2, epochs=1), tmp_path / "log.jsonl")
    # at step 1 the DPO margin is measured against ref_model's log-probs, so the implied reward of the chosen
    # answer is beta * (policy - ref) with the *reference model's* value
    pol = reference_logprobs(Transformer(cfg).init_weights(seed=0), tok, pairs[:1], TrainArgs(batch_size=1))[0]
    assert abs(log[0]["rewards/chosen"] - 0.1 * (pol[0] - ref[0][0])) < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(before, ref_model.parameters()))  # the reference stays frozen


def test_reference_logprobs_share_the_policys_precision(tmp_path):
    """Under bf16 autocast the reference log-probs run in bf16 as the policy's do, so DPO's first step, with the
    reference equal to the policy, has a zero margin (it once computed the reference in fp32: a spurious margin)."""
    tok = train_tokenizer(["the answer is 12", "the answer is 7", "Q: what?"] * 5, vocab_size=280)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_dim=64, eos_id=2, bos_id=1)
    policy = Transformer(cfg).init_weights(seed=0)
    pairs = [{"prompt": "Q: what?", "chosen": "the answer is 12", "rejected": "the answer is 7"}] * 2
    args = TrainArgs(lr=1e-2, batch_size=2, epochs=1, autocast_bf16=True)
    ref = reference_logprobs(policy, tok, pairs, args)
    log = train_dpo(policy, tok, pairs, ref, args, tmp_path / "log.jsonl")
    assert log[0]["rewards/margins"] == 0.0 and log[0]["rewards/chosen"] == 0.0
