"""The stages of a run that generate and measure: sample-and-verify, evaluate one model, summarise the run.

    generate_and_verify(model, tok, task, records, out, sampling)   n verified completions per record (resumable)
    evaluate(run, t, model, tok, inputs, settings, step_method)     M_t's test/OOD generations -> metrics.json
    write_summary(run, config)                                      summary.json, report.md, plots

A stage whose output file exists is finished (every write is atomic). A generation file also records the settings
that produced it (FILE.settings.json); a stage asked for other settings regenerates it, so a changed setting never
silently reuses old generations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from minisirev import metrics as M
from minisirev.run import Inputs, Run, append_jsonl, read_json, read_partial_rows, read_rows, write_json, write_jsonl
from minisirev.tasks import HarnessError

# ---- settings -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn. temperature 0 is greedy (top_p, top_k then do nothing)."""
    n: int
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 160
    seed: int = 0


@dataclass(frozen=True)
class EvalSettings:
    """How every model of a run is evaluated; these are the defaults of train.py and eval.py."""
    n_test: int = 200  # test questions (first N; 0 = all)
    n_ood: int = 250  # OOD questions (first N; 0 = all)
    samples: int = 64  # sampled completions per test question: pass@k up to k = samples
    temperature: float = 0.75
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 160
    seed: int = 0
    semantic_questions: int = 0  # questions the semantic diversity is averaged over (0 = all)


def stop_ids(tok) -> tuple[int, ...]:
    """Every end-of-sequence id of the tokenizer (a checkpoint may declare several, or none)."""
    ids = getattr(tok, "eos_ids", None)
    if ids is None:
        ids = () if tok.eos_id is None else (tok.eos_id,)
    return tuple(ids)


class Models:
    """The model of each stage, loaded on first use, at most one in memory: `models(t)` is M_t, read from
    `source(t)` (the base model for t = 0, iter_t/model after)."""

    def __init__(self, source: Callable[[int], str | Path], **load_kw):
        self.source, self.load_kw, self.held = source, load_kw, {}

    def __call__(self, t: int):
        if t not in self.held:
            from minisirev.checkpoint import load_model
            self.held.clear()
            self.held[t] = load_model(self.source(t), **self.load_kw)
        return self.held[t]

    def put(self, t: int, model) -> None:
        """M_t is `model` (just trained, already in memory)."""
        self.held = {t: model}


# ---- sample and verify ----------------------------------------------------------------------------------------


def settings_path(out: Path) -> Path:
    return out.with_name(out.name + ".settings.json")


def is_done(out: Path, settings: dict) -> bool:
    """The generation file exists and was made with these settings."""
    sp = settings_path(out)
    return out.exists() and sp.exists() and read_json(sp) == settings


def generate_and_verify(model, tok, task, records: list[dict], out: Path, sampling: Sampling, *, chunk: int = 64,
                        desc: str = "sample", log: Path | None = None, gen_kw: dict | None = None) -> list[dict]:
    """n completions per record with the task's verdicts, one JSONL row per record:
    {"idx", "id", "prompt", "completions", "correct"[, "level"]}.

    Records go in chunks, appended to OUT.partial with an fsync; a restart keeps the whole chunks already there
    (if they were drawn with the same settings). The sampler draws from a random stream keyed by (seed, question
    index, sample index), so the result depends neither on the chunking nor on where a run was killed. A verifier
    that cannot judge a completion (tasks.HarnessError) stops the stage before its chunk is written: a harness
    failure is never recorded as a wrong answer. When every chunk is in, OUT.partial becomes OUT, and a line
    with the stage's counts goes to `log`."""
    from minisirev.sampler import generate

    settings = {**dataclasses.asdict(sampling), "records": len(records), "task": task.name}
    if is_done(out, settings):
        return read_rows(out)
    partial, sp = out.with_name(out.name + ".partial"), settings_path(out)
    same = sp.exists() and read_json(sp) == settings
    rows = read_partial_rows(partial) if same else []
    rows = rows[:len(rows) // chunk * chunk]  # a chunk cut short by a kill is redone whole
    out.unlink(missing_ok=True)
    write_json(sp, settings)
    write_jsonl(partial, rows)
    s, t0, n_tokens = sampling, time.perf_counter(), 0
    gen_kw = gen_kw or {}
    with open(partial, "a") as f, tqdm(total=len(records), initial=len(rows), desc=desc, unit="q",
                                       leave=False) as bar:
        for c in range(len(rows) // chunk, math.ceil(len(records) / chunk)):
            recs = records[c * chunk:(c + 1) * chunk]
            prompts = [task.prompt(ex) for ex in recs]
            outs = generate(model, [tok.encode_prompt(p) for p in prompts], n=s.n, max_new_tokens=s.max_new_tokens,
                            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, stop_ids=stop_ids(tok),
                            seed=s.seed, keys=list(range(c * chunk, c * chunk + len(recs))), **gen_kw)
            texts = [[tok.decode(ids) for ids in per_prompt] for per_prompt in outs]
            try:
                verdicts = task.is_correct_batch([ex for ex, ts in zip(recs, texts) for _ in ts],
                                                 [t for ts in texts for t in ts])
            except HarnessError as e:  # the chunk is not written: its verdicts do not exist
                if log is not None:
                    append_jsonl(log, {"stage": desc, "file": str(out), "harness_errors": e.count, "error": str(e)})
                raise
            for j, (ex, prompt, ts) in enumerate(zip(recs, prompts, texts)):
                i = c * chunk + j
                row = {"idx": i, "id": ex.get("id", i), "prompt": prompt, "completions": ts,
                       "correct": [bool(v) for v in verdicts[j * s.n:(j + 1) * s.n]]}
                if task.level(ex) is not None:
                    row["level"] = task.level(ex)
                f.write(json.dumps(row) + "\n")
                rows.append(row)
            f.flush()
            os.fsync(f.fileno())
            n_tokens += sum(len(ids) for per_prompt in outs for ids in per_prompt)
            bar.update(len(recs))
            bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - t0):.0f}")
    os.replace(partial, out)
    if log is not None:
        correct = sum(sum(r["correct"]) for r in rows)
        harness = task.harness_stats(reset=True) if hasattr(task, "harness_stats") else {}
        append_jsonl(log, {"stage": desc, "file": str(out), "questions": len(rows), "completions": len(rows) * s.n,
                           "correct": correct, "programs_run": harness.get("programs", 0),
                           "harness_errors": harness.get("harness_errors", 0),
                           "seconds": round(time.perf_counter() - t0, 1)})
    return rows


# ---- evaluation -----------------------------------------------------------------------------------------------


def evaluate(run: Run, t: int, model: Callable, tok, inputs: Inputs, settings: EvalSettings, step_method: str
             ) -> dict:
    """Generate what M_t's metrics need (greedy and sampled test answers, greedy OOD answers) into iter_t/eval/,
    then compute iter_t/metrics.json from those files. `model()` returns M_t; it is called only when a
    generation is missing. Seeds: evaluation of M_t draws with seed + 7919 t."""
    e = settings
    seed = e.seed + 7919 * t
    jobs = [("test_greedy", inputs.task, inputs.test, Sampling(1, 0.0, max_new_tokens=e.max_new_tokens, seed=seed)),
            ("test_samples", inputs.task, inputs.test,
             Sampling(e.samples, e.temperature, e.top_p, e.top_k, e.max_new_tokens, seed))]
    if inputs.ood:
        jobs.append(("ood_greedy", inputs.ood_task, inputs.ood,
                     Sampling(1, 0.0, max_new_tokens=e.max_new_tokens, seed=seed)))
    fresh = False
    for name, task, records, sampling in jobs:
        out = run.eval_file(t, name)
        settings_now = {**dataclasses.asdict(sampling), "records": len(records), "task": task.name}
        if not is_done(out, settings_now):
            generate_and_verify(model(), tok, task, records, out, sampling, desc=f"iter {t} {name}", log=run.log)
            fresh = True
    if fresh or not run.metrics(t).exists():
        write_json(run.metrics(t), compute_metrics(run, t, step_method, semantic_questions=e.semantic_questions))
    return read_json(run.metrics(t))


def compute_metrics(run: Run, t: int, step_method: str, *, semantic_questions: int = 0) -> dict:
    """metrics.json of M_t from its own generation files and, for t >= 2, M1's (the improvement set); M1's
    coverage comes from its own samples on the training questions (iter_1/samples.jsonl)."""
    greedy = [bool(r["correct"][0]) for r in read_rows(run.eval_file(t, "test_greedy"))]
    samples = read_rows(run.eval_file(t, "test_samples"))
    m1 = {}
    if t > 1:
        m1 = {"m1_greedy_correct": [bool(r["correct"][0]) for r in read_rows(run.eval_file(1, "test_greedy"))],
              "m1_counts": M.counts_from_verdicts([r["correct"] for r in read_rows(run.eval_file(1, "test_samples"))])}
    coverage = None
    if t == 1 and run.samples(1).exists():
        train = read_rows(run.samples(1))
        coverage = M.coverage([sum(r["correct"]) for r in train], len(train[0]["correct"]))
    ood = {}
    if run.eval_file(t, "ood_greedy").exists():
        rows = read_rows(run.eval_file(t, "ood_greedy"))
        ood = {"ood_levels": [r.get("level") for r in rows], "ood_correct": [bool(r["correct"][0]) for r in rows]}
    out = M.iteration_metrics(iter=t, step_method=step_method, greedy_correct=greedy,
                              sample_texts=[r["completions"] for r in samples],
                              sample_verdicts=[r["correct"] for r in samples], coverage=coverage,
                              semantic_questions=semantic_questions or None, **m1, **ood)
    if coverage is not None:
        out["recommendation"] = M.recommend(coverage)
    return out


# ---- the summary ----------------------------------------------------------------------------------------------


def write_summary(run: Run, config: dict) -> dict:
    """summary.json from M0's and every finished iteration's metrics.json, then report.md and the plots."""
    from minisirev.report import write_report

    base = read_json(run.metrics(0)) if (run.root / "iter_0" / "metrics.json").exists() else None
    its = [read_json(run.metrics(t)) for t in run.trained_iters() if run.metrics(t).exists()]
    summary = {"task": config.get("task"), "method": config.get("method"), "base": base, "iterations": its,
               "config": config}
    write_json(run.summary, summary)
    write_report(run.root, summary)
    return summary
