"""Training: the schedule of methods, the data each step trains on, and the optimiser loop (docs/method.md).

    step_methods(method, t, schedule)    which steps make M_t ("sft", "dpo" or both)
    gold_sft_data / build_sft_data / build_dpo_pairs    what a step trains on, one dict a row
    train_sft(model, tok, data, args, log_path)         next-token loss on the completions
    reference_logprobs(model, tok, pairs, args)         the frozen reference's sequence log-probs, once per round
    train_dpo(model, tok, pairs, ref, args, log_path, dpo)   DPO against those log-probs

Every step runs through `optimise`: AdamW, warmup + cosine, gradient clipping, accumulation, bf16 autocast when
asked, a NaN guard that stops before a bad step touches the weights, one JSONL line a step.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minisirev import distributed as dist
from minisirev.losses import IGNORE, dpo_loss, sequence_logprobs

# ---- the schedule ---------------------------------------------------------------------------------------------


def step_methods(method: str, t: int, schedule: str = "alternate") -> list[str]:
    """Which training steps make M_t. t = 1 is always SFT on gold. SFT-DPO alternates DPO (even t) and SFT
    (odd t) by default (the paper's t = 2 step equals iterative DPO's), or runs SFT then DPO every round with
    'both' (docs/method.md, "SFT-DPO")."""
    if t == 1 or method == "sft":
        return ["sft"]
    if method == "dpo":
        return ["dpo"]
    if method == "sft-dpo":
        if schedule == "both":
            return ["sft", "dpo"]
        return ["dpo"] if t % 2 == 0 else ["sft"]
    raise ValueError(f"unknown method {method!r}; choose sft, dpo or sft-dpo")


# ---- training data ---------------------------------------------------------------------------------------------


def gold_sft_data(task, records: list[dict]) -> list[dict]:
    """M1's data: every training question with its gold solution."""
    return [{"idx": i, "prompt": task.prompt(ex), "completion": task.reference(ex)} for i, ex in enumerate(records)]


def round_data(samples: list[dict], methods: list[str], max_per_question: int, seed: int
               ) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """The training data of one self-improvement round from M_{t-1}'s verified samples: SFT examples and/or
    DPO pairs, with their counts."""
    data, stats = {}, {}
    if "sft" in methods:
        data["sft"], stats["sft"] = build_sft_data(samples, max_per_question)
    if "dpo" in methods:
        data["dpo"], stats["dpo"] = build_dpo_pairs(samples, max_per_question, seed)
    return data, stats


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
    autocast_bf16: bool = False  # bf16 autocast of every forward, the reference log-probs' included
    grad_checkpoint: bool = False
    fused: bool = False  # log-probs through kernels/ (the [B, T, V] logits are never built)
    sft_reduction: str = "mean"


@dataclass
class DPOArgs:
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    nll_weight: float = 0.0  # RPO: weight of an NLL term on the chosen answers (Pang et al. 2024)


def lr_at(step: int, total: int, args: TrainArgs) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    warm = max(1, int(args.warmup * total))
    if step < warm:
        return args.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimise(model, batches: list, loss_fn, args: TrainArgs, log_path: Path, desc: str) -> list[dict]:
    """AdamW over `batches` (each micro-batch passed to loss_fn(model, batch) -> (terms, stats, n_tokens): loss
    terms (coef, sum, count) and stats {name: (sum, count)}, combined by distributed.reduce_terms into
    sum_i coef_i * sum_i / count_i), grad_accum micro-batches per step, warmup + cosine, gradient clipping, bf16
    autocast on CUDA when asked. Under torchrun each rank takes its share of every micro-batch and the counts
    are summed over the ranks, so K ranks take the single process's steps.
    One JSONL line per step appended to log_path (tagged with `desc`); a console line every log_every steps;
    raises TrainingDiverged on a NaN or inf loss before the bad step touches the weights."""
    model.train()
    model.checkpoint_blocks = args.grad_checkpoint
    dist.reshard(model)  # FSDP2: the optimiser must hold the sharded parameters
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                            foreach=device.type == "cuda")
    total = max(1, math.ceil(len(batches) / args.grad_accum))
    log = []
    with dist.sink(log_path) as logf, tqdm(total=total, desc=desc, unit="step", leave=False, **dist.quiet()) as bar:
        for step in range(total):
            t0 = time.perf_counter()
            lr = lr_at(step, total, args)
            for group in opt.param_groups:
                group["lr"] = lr
            micro = batches[step * args.grad_accum:(step + 1) * args.grad_accum]
            loss_sum, tokens, stats_sum = 0.0, 0, {}
            for batch in micro:
                part, live = dist.shard_batch(batch)
                with autocast(device, args):
                    terms, stats, n_tok = loss_fn(model, part)
                loss, value, stats, n_tok = dist.reduce_terms(terms, stats, n_tok, live)
                if not torch.isfinite(value):
                    raise TrainingDiverged(f"{desc}: loss is {value.item()} at step {step + 1}/{total}")
                (loss / len(micro)).backward()
                loss_sum += value.item() / len(micro)
                tokens += n_tok
                for k, v in stats.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + v / len(micro)
            grad_norm = dist.full(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)).item()
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


def autocast(device: torch.device, args: TrainArgs):
    """The precision every forward of a training step runs in: the policy's and the reference's alike, so that
    at step 0 of DPO the policy and an identical reference give a zero margin."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast_bf16)


def train_sft(model, tok, data: list[dict], args: TrainArgs, log_path: Path, *, desc: str = "sft") -> list[dict]:
    """Next-token loss on the completions only, over length-bucketed batches."""
    encoded = [encode_example(tok, d["prompt"], d["completion"]) for d in data]
    device = next(model.parameters()).device
    batches = [[encoded[i] for i in b] for b in epoch_batches(len(encoded), [len(x) for x, _ in encoded], args)]

    def loss_fn(model, rows):
        ids, labels = collate(rows, tok.pad_id or 0, device)
        sums, counts = sequence_logprobs(model, ids, labels, fused=args.fused)
        return [(1.0, *sft_term(sums, counts, args.sft_reduction))], {}, int(counts.sum())

    return optimise(model, batches, loss_fn, args, log_path, desc)


def sft_term(sums: torch.Tensor, counts: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor | int]:
    """losses.sft_loss as (numerator, denominator): "mean" = -sum of log-probs / labelled tokens, "sum" = -sum of
    log-probs / sequences. Split so that the denominator can be summed over ranks."""
    if reduction == "mean":
        return -sums.sum(), counts.sum()
    if reduction == "sum":
        return -sums.sum(), len(sums)
    raise ValueError(f"unknown SFT reduction {reduction!r}; choose 'mean' or 'sum'")


@torch.no_grad()
def reference_logprobs(model, tok, pairs: list[dict], args: TrainArgs) -> list[tuple[float, float]]:
    """Sequence log-probs of (chosen, rejected) under a frozen model, computed once before DPO training, in the
    same precision as the policy's (`autocast`)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, len(pairs), args.batch_size), desc="reference log-probs", leave=False, **dist.quiet()):
        chunk, live = dist.shard_batch(pairs[i:i + args.batch_size])  # under torchrun: this rank's share
        rows = [encode_example(tok, p["prompt"], p["chosen"]) for p in chunk]
        rows += [encode_example(tok, p["prompt"], p["rejected"]) for p in chunk]
        ids, labels = collate(rows, tok.pad_id or 0, device)
        with autocast(device, args):
            sums, _ = sequence_logprobs(model, ids, labels, fused=args.fused)
        sums = sums.float().cpu()
        mine = list(zip(sums[:len(chunk)].tolist(), sums[len(chunk):].tolist()))
        out += dist.gather(mine if live else [], len(pairs[i:i + args.batch_size]))
    return out


def train_dpo(model, tok, pairs: list[dict], ref: list[tuple[float, float]], args: TrainArgs, log_path: Path,
              dpo: DPOArgs | None = None, *, desc: str = "dpo") -> list[dict]:
    """DPO on (chosen, rejected) pairs against precomputed reference log-probs; logs TRL's reward statistics."""
    dpo = dpo or DPOArgs()
    device = next(model.parameters()).device
    chosen = [encode_example(tok, p["prompt"], p["chosen"]) for p in pairs]
    rejected = [encode_example(tok, p["prompt"], p["rejected"]) for p in pairs]
    lengths = [max(len(c[0]), len(r[0])) for c, r in zip(chosen, rejected)]
    index_batches = epoch_batches(len(pairs), lengths, args)

    def loss_fn(model, idx):
        ids, labels = collate([chosen[i] for i in idx] + [rejected[i] for i in idx], tok.pad_id or 0, device)
        sums, counts = sequence_logprobs(model, ids, labels, fused=args.fused)
        P = len(idx)
        ref_c = torch.tensor([ref[i][0] for i in idx], device=device)
        ref_r = torch.tensor([ref[i][1] for i in idx], device=device)
        losses, r_c, r_r = dpo_loss(sums[:P].float(), sums[P:].float(), ref_c, ref_r, beta=dpo.beta,
                                    label_smoothing=dpo.label_smoothing, loss_type=dpo.loss_type)
        terms = [(1.0, losses.sum(), P)]  # the mean over pairs
        if dpo.nll_weight > 0:  # RPO: keep the chosen answers likely
            terms.append((dpo.nll_weight, *sft_term(sums[:P], counts[:P], "mean")))
        stats = {"rewards/chosen": (r_c.sum(), P), "rewards/rejected": (r_r.sum(), P),
                 "rewards/margins": ((r_c - r_r).sum(), P), "rewards/accuracies": ((r_c > r_r).float().sum(), P)}
        return terms, stats, int(counts.sum())

    return optimise(model, index_batches, loss_fn, args, log_path, desc)
