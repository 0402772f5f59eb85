"""One iteration of the self-improvement loop (PAPER.md, Algorithm 1) and the run directory around it.

    t = 1:  M1 = SFT(M0 | gold solutions)                        -> iter_1/model, iter_1/metrics.json
    t >= 2: sample N per training question from M_{t-1}           -> iter_t/samples.jsonl
            verify; keep correct samples (SFT) or pairs (DPO)     -> iter_t/train_data.jsonl
            M_t = F_t(M_{t-1} | D_t), never restarting            -> iter_t/model, iter_t/train_log.jsonl
            evaluate M_t                                          -> iter_t/eval.jsonl, iter_t/metrics.json

Every stage writes its output under a temporary name and renames it when complete, so a file that exists is
finished and a killed run, restarted with the same command, skips every finished stage. Sampling is done in
chunks of questions, each with its own seed, and a partial samples file keeps its finished chunks.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minisirev.losses import IGNORE, dpo_loss, sequence_logprobs, sft_loss

# ---- small file helpers: atomic JSON / JSONL ------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_partial_jsonl(path: Path) -> list[dict]:
    """Rows of a file that may end in a half-written line (a kill mid-write): that line is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


# ---- the schedule ---------------------------------------------------------------------------------------------


def step_methods(method: str, t: int, schedule: str = "alternate") -> list[str]:
    """Which training steps make M_t. t = 1 is always SFT on gold. SFT-DPO alternates DPO (even t) and SFT
    (odd t) by default (PAPER.md: its t=2 equals DPO's), or runs SFT then DPO every iteration with 'both'."""
    if t == 1 or method == "sft":
        return ["sft"]
    if method == "dpo":
        return ["dpo"]
    if method == "sft-dpo":
        if schedule == "both":
            return ["sft", "dpo"]
        return ["dpo"] if t % 2 == 0 else ["sft"]
    raise ValueError(f"unknown method {method!r}; choose sft, dpo or sft-dpo")


# ---- training data --------------------------------------------------------------------------------------------


def build_sft_data(samples: list[dict], max_per_question: int) -> tuple[list[dict], dict]:
    """Correct samples, deduplicated by text (after stripping), at most K per question, in sampling order."""
    data, skipped = [], 0
    for q in samples:
        kept = list(dict.fromkeys(c.strip() for c, ok in zip(q["completions"], q["correct"]) if ok and c.strip()))
        if not kept:
            skipped += 1
        data += [{"idx": q["idx"], "prompt": q["prompt"], "completion": c} for c in kept[:max_per_question]]
    return data, {"examples": len(data), "questions": len(samples) - skipped, "skipped_questions": skipped}


def build_dpo_pairs(samples: list[dict], max_per_question: int, seed: int) -> tuple[list[dict], dict]:
    """(correct = chosen, incorrect = rejected) pairs of the same question: distinct texts on each side, the
    pairs drawn without repetition from all combinations by a seeded shuffle, at most K per question.
    Questions with no correct or no incorrect sample are skipped."""
    pairs, skipped = [], 0
    for q in samples:
        good = list(dict.fromkeys(c.strip() for c, ok in zip(q["completions"], q["correct"]) if ok and c.strip()))
        bad = list(dict.fromkeys(c.strip() for c, ok in zip(q["completions"], q["correct"]) if not ok and c.strip()))
        if not good or not bad:
            skipped += 1
            continue
        combos = [(g, b) for g in good for b in bad]
        random.Random(f"{seed}-{q['idx']}").shuffle(combos)
        pairs += [{"idx": q["idx"], "prompt": q["prompt"], "chosen": g, "rejected": b}
                  for g, b in combos[:max_per_question]]
    return pairs, {"pairs": len(pairs), "questions": len(samples) - skipped, "skipped_questions": skipped}


def encode_example(tok, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """[BOS] prompt completion [EOS] as input ids, and labels with the prompt masked (IGNORE)."""
    p = tok.encode_prompt(prompt)
    c = tok.encode(completion) + [tok.eos_id]
    return p + c, [IGNORE] * len(p) + c


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row: input ids with pad_id, labels with IGNORE. Causal attention never lets a
    real token see the padding after it, so no attention mask is needed."""
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)] = torch.tensor(x), torch.tensor(y)
    return ids.to(device), labels.to(device)


def length_buckets(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of indices of similar length (sorted, chunked), in a seeded random order: little padding, and
    the order of the batches still shuffled every epoch."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


# ---- the optimiser loop ---------------------------------------------------------------------------------------


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class TrainArgs:
    lr: float = 1e-3
    epochs: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    warmup: float = 0.05  # fraction of the steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    autocast_bf16: bool = False
    grad_checkpoint: bool = False


def lr_at(step: int, total: int, args: TrainArgs) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    warm = max(1, int(args.warmup * total))
    if step < warm:
        return args.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimise(model, batches: list, loss_fn, args: TrainArgs, log_path: Path, desc: str) -> list[dict]:
    """AdamW over `batches` (each micro-batch passed to loss_fn(model, batch) -> (loss, stats, n_tokens)),
    grad_accum micro-batches per step, warmup + cosine, gradient clipping, bf16 autocast on CUDA when asked.
    One JSONL line per step appended to log_path (tagged with `desc`); a console line every log_every steps;
    raises TrainingDiverged on a NaN or inf loss before the bad step touches the weights."""
    model.train()
    model.checkpoint_blocks = args.grad_checkpoint
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                            foreach=device.type == "cuda")
    total = max(1, math.ceil(len(batches) / args.grad_accum))
    log = []
    with open(log_path, "a") as logf, tqdm(total=total, desc=desc, unit="step", leave=False) as bar:
        for step in range(total):
            t0 = time.perf_counter()
            lr = lr_at(step, total, args)
            for group in opt.param_groups:
                group["lr"] = lr
            micro = batches[step * args.grad_accum:(step + 1) * args.grad_accum]
            loss_sum, tokens, stats_sum = 0.0, 0, {}
            for batch in micro:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast_bf16):
                    loss, stats, n_tok = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"{desc}: loss is {loss.item()} at step {step + 1}/{total}")
                (loss / len(micro)).backward()
                loss_sum += loss.item() / len(micro)
                tokens += n_tok
                for k, v in stats.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + v / len(micro)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip).item()
            if not math.isfinite(grad_norm):
                raise TrainingDiverged(f"{desc}: gradient norm is {grad_norm} at step {step + 1}/{total}")
            opt.step()
            opt.zero_grad(set_to_none=True)
            ms = (time.perf_counter() - t0) * 1000
            row = {"phase": desc, "step": step + 1, "loss": round(loss_sum, 6), "lr": lr,
                   "grad_norm": round(grad_norm, 4), "ms": round(ms, 1), "tok_s": round(tokens / (ms / 1000), 1),
                   **{k: round(v, 6) for k, v in stats_sum.items()}}
            logf.write(json.dumps(row) + "\n")
            log.append(row)
            bar.update()
            bar.set_postfix(loss=f"{loss_sum:.4f}")
            if (step + 1) % args.log_every == 0 or step + 1 == total:
                tqdm.write(f"{desc} step {step + 1}/{total} | loss {loss_sum:.4f} | lr {lr:.2e} | "
                           f"{ms:.0f} ms | {row['tok_s']:.0f} tok/s")
    model.eval()
    return log


def epoch_batches(n_items: int, lengths: list[int], args: TrainArgs) -> list[list[int]]:
    """Index batches for `epochs` passes (a fractional last epoch takes a prefix of its shuffled batches)."""
    out, e = [], 0
    while e < args.epochs:
        batches = length_buckets(lengths, args.batch_size, seed=args.seed * 1000 + e)
        take = len(batches) if args.epochs - e >= 1 else max(1, round(len(batches) * (args.epochs - e)))
        out += batches[:take]
        e += 1
    return out


def train_sft(model, tok, data: list[dict], args: TrainArgs, log_path: Path, *, reduction: str = "mean",
              fused: bool = False, desc: str = "sft") -> list[dict]:
    """Next-token loss on the completions only, over length-bucketed batches."""
    encoded = [encode_example(tok, d["prompt"], d["completion"]) for d in data]
    device = next(model.parameters()).device
    batches = [[encoded[i] for i in b] for b in epoch_batches(len(encoded), [len(x) for x, _ in encoded], args)]

    def loss_fn(model, rows):
        ids, labels = collate(rows, tok.pad_id or 0, device)
        sums, counts = sequence_logprobs(model, ids, labels, fused=fused)
        return sft_loss(sums, counts, reduction), {}, int(counts.sum())

    return optimise(model, batches, loss_fn, args, log_path, desc)


@torch.no_grad()
def reference_logprobs(model, tok, pairs: list[dict], batch_size: int, *, fused: bool = False
                       ) -> list[tuple[float, float]]:
    """Sequence log-probs of (chosen, rejected) under a frozen model, computed once before DPO training."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", leave=False):
        chunk = pairs[i:i + batch_size]
        rows = [encode_example(tok, p["prompt"], p["chosen"]) for p in chunk]
        rows += [encode_example(tok, p["prompt"], p["rejected"]) for p in chunk]
        ids, labels = collate(rows, tok.pad_id or 0, device)
        sums, _ = sequence_logprobs(model, ids, labels, fused=fused)
        sums = sums.float().cpu()
        out += list(zip(sums[:len(chunk)].tolist(), sums[len(chunk):].tolist()))
    return out


def train_dpo(model, tok, pairs: list[dict], ref: list[tuple[float, float]], args: TrainArgs, log_path: Path, *,
              beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid", nll_weight: float = 0.0,
              fused: bool = False, desc: str = "dpo") -> list[dict]:
    """DPO on (chosen, rejected) pairs against precomputed reference log-probs; logs TRL's reward statistics."""
    device = next(model.parameters()).device
    chosen = [encode_example(tok, p["prompt"], p["chosen"]) for p in pairs]
    rejected = [encode_example(tok, p["prompt"], p["rejected"]) for p in pairs]
    lengths = [max(len(c[0]), len(r[0])) for c, r in zip(chosen, rejected)]
    index_batches = epoch_batches(len(pairs), lengths, args)

    def loss_fn(model, idx):
        ids, labels = collate([chosen[i] for i in idx] + [rejected[i] for i in idx], tok.pad_id or 0, device)
        sums, counts = sequence_logprobs(model, ids, labels, fused=fused)
        P = len(idx)
        ref_c = torch.tensor([ref[i][0] for i in idx], device=device)
        ref_r = torch.tensor([ref[i][1] for i in idx], device=device)
        losses, r_c, r_r = dpo_loss(sums[:P].float(), sums[P:].float(), ref_c, ref_r, beta=beta,
                                    label_smoothing=label_smoothing, loss_type=loss_type)
        loss = losses.mean()
        if nll_weight > 0:  # RPO: keep the chosen answers likely (Pang et al. 2024)
            loss = loss + nll_weight * sft_loss(sums[:P], counts[:P], "mean")
        stats = {"rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
                 "rewards/margins": (r_c - r_r).mean().item(), "rewards/accuracies": (r_c > r_r).float().mean().item()}
        return loss, stats, int(counts.sum())

    return optimise(model, index_batches, loss_fn, args, log_path, desc)


# ---- generation stages (sampling for training, and every generation evaluation needs) -------------------------


def generate_and_verify(model, tok, task, records: list[dict], out_path: Path, *, n: int, temperature: float,
                        top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256, seed: int = 0,
                        chunk: int = 64, desc: str = "sample") -> list[dict]:
    """n completions per record, each with the task's verdict, one JSONL row per record in out_path.

    Records go in chunks of `chunk`, appended to out_path + ".partial" with an fsync; a restart keeps the whole
    chunks already there. The sampler draws from a random stream keyed by (seed, question index, sample index),
    so the result depends neither on the chunking nor on where a run was killed. The file is renamed to out_path
    when every chunk is in."""
    from minisirev.sampler import generate

    if out_path.exists():
        return read_jsonl(out_path)
    partial = out_path.with_name(out_path.name + ".partial")
    rows = read_partial_jsonl(partial)
    rows = rows[:len(rows) // chunk * chunk]  # a chunk cut short by a kill is redone whole
    write_jsonl(partial, rows)
    stop = tok.eos_id if isinstance(tok.eos_id, (list, tuple)) else (tok.eos_id,)
    n_chunks = math.ceil(len(records) / chunk)
    with open(partial, "a") as f, tqdm(total=len(records), initial=len(rows), desc=desc, unit="q",
                                       leave=False) as bar:
        for c in range(len(rows) // chunk, n_chunks):
            recs = records[c * chunk:(c + 1) * chunk]
            t0 = time.perf_counter()
            prompts = [tok.encode_prompt(task.prompt(ex)) for ex in recs]
            outs = generate(model, prompts, n=n, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, top_k=top_k, stop_ids=stop, seed=seed,
                            keys=list(range(c * chunk, c * chunk + len(recs))))
            texts = [[tok.decode(ids) for ids in per_prompt] for per_prompt in outs]
            flat_ex = [ex for ex, ts in zip(recs, texts) for _ in ts]
            verdicts = task.is_correct_batch(flat_ex, [t for ts in texts for t in ts])
            for j, (ex, ts) in enumerate(zip(recs, texts)):
                row = {"idx": c * chunk + j, "id": ex.get("id", c * chunk + j), "prompt": task.prompt(ex),
                       "completions": ts, "correct": [bool(v) for v in verdicts[j * n:(j + 1) * n]]}
                if task.level(ex) is not None:
                    row["level"] = task.level(ex)
                f.write(json.dumps(row) + "\n")
                rows.append(row)
            f.flush()
            os.fsync(f.fileno())
            new_tokens = sum(len(ids) for per_prompt in outs for ids in per_prompt)
            bar.update(len(recs))
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.0f}")
    os.replace(partial, out_path)
    return rows


# ---- evaluation -----------------------------------------------------------------------------------------------

def evaluate(get_model, tok, task, ood_task, test_recs, ood_recs, it: Path, run_dir: Path, *, t: int,
             step_method: str, n_samples: int, temperature: float, top_p: float, top_k: int, max_new_tokens: int,
             seed: int, semantic_questions: int | None = None) -> dict:
    """Generate what M_t's metrics need (greedy and sampled test answers, greedy OOD answers) into it/eval/,
    then compute metrics.json from those files. The model is only loaded when a file is missing."""
    ev = it / "eval"
    ev.mkdir(exist_ok=True)
    jobs = [("test_greedy", task, test_recs, 1, 0.0), ("test_samples", task, test_recs, n_samples, temperature)]
    if ood_recs:
        jobs.append(("ood_greedy", ood_task, ood_recs, 1, 0.0))
    for name, tsk, recs, n, temp in jobs:
        if not (ev / f"{name}.jsonl").exists():
            generate_and_verify(get_model(), tok, tsk, recs, ev / f"{name}.jsonl", n=n, temperature=temp,
                                top_p=top_p if temp > 0 else 1.0, top_k=top_k if temp > 0 else 0,
                                max_new_tokens=max_new_tokens, seed=seed + 7919 * t, desc=f"iter {t} {name}")
    metrics = compute_metrics(run_dir, t, step_method, semantic_questions=semantic_questions)
    write_json(it / "metrics.json", metrics)
    return metrics


def compute_metrics(run_dir: Path, t: int, step_method: str, *, semantic_questions: int | None = None) -> dict:
    """metrics.json of M_t (keys in DESIGN.md) from the generation files of iteration t and of M1: greedy test
    answers (pass@1, IS(t)), sampled test answers (pass@k, diversity), greedy OOD answers, and for M1 its
    samples on the training questions (coverage, from iter_2/samples.jsonl)."""
    from minisirev import metrics as M

    it, one = run_dir / f"iter_{t}", run_dir / "iter_1"
    greedy = [bool(r["correct"][0]) for r in read_jsonl(it / "eval" / "test_greedy.jsonl")]
    samples = read_jsonl(it / "eval" / "test_samples.jsonl")
    m1 = {}
    if t > 1:
        m1_samples = read_jsonl(one / "eval" / "test_samples.jsonl")
        m1 = {"m1_greedy_correct": [bool(r["correct"][0]) for r in read_jsonl(one / "eval" / "test_greedy.jsonl")],
              "m1_counts": M.counts_from_verdicts([r["correct"] for r in m1_samples])}
    coverage = None
    if t == 1 and (run_dir / "iter_2" / "samples.jsonl").exists():
        train = read_jsonl(run_dir / "iter_2" / "samples.jsonl")
        coverage = M.coverage([sum(r["correct"]) for r in train], len(train[0]["correct"]))
    ood = {}
    if (it / "eval" / "ood_greedy.jsonl").exists():
        rows = read_jsonl(it / "eval" / "ood_greedy.jsonl")
        ood = {"ood_levels": [r.get("level") for r in rows], "ood_correct": [bool(r["correct"][0]) for r in rows]}
    out = M.iteration_metrics(iter=t, step_method=step_method, greedy_correct=greedy,
                              sample_texts=[r["completions"] for r in samples],
                              sample_verdicts=[r["correct"] for r in samples], coverage=coverage,
                              semantic_questions=semantic_questions or None, **m1, **ood)
    if coverage is not None:
        out["recommendation"] = M.recommend(coverage)
    return out


def write_summary(run_dir: Path, *, task: str, method: str, iters: int, config: dict | None = None) -> dict:
    """summary.json from every finished iteration's metrics.json, then report.md and the plots."""
    from minisirev.report import write_report

    its = []
    for t in range(1, iters + 1):
        path = run_dir / f"iter_{t}" / "metrics.json"
        if path.exists():
            its.append(json.loads(path.read_text()))
    summary = {"task": task, "method": method, "iterations": its, "config": config or {}}
    write_json(run_dir / "summary.json", summary)
    write_report(run_dir, summary)
    return summary
