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

from minisirev import distributed as dist
from minisirev import metrics as M
from minisirev.run import Inputs, Run, append_jsonl, read_json, read_partial_rows, read_rows, write_json, write_jsonl
from minisirev.tasks import HarnessError
from minisirev.training import step_methods

# ---- settings -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn. temperature 0 is greedy (top_p, top_k then do nothing)."""
    n: int
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 192  # the longest gold solution of arith's level 5 is 161 tokens
    seed: int = 0


@dataclass(frozen=True)
class EvalSettings:
    """How every model of a run is evaluated; these are the defaults of train.py and eval.py."""
    n_test: int = 200  # test questions (first N; 0 = all)
    n_ood: int = 0  # OOD questions (first N; 0 = all: arith's 500, 100 per level)
    samples: int = 64  # sampled completions per test question: pass@k up to k = samples (the paper's k = 64)
    temperature: float = 0.75
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 192  # the longest gold solution of arith's level 5 is 161 tokens
    seed: int = 0
    semantic_questions: int = 0  # questions the semantic diversity is averaged over (0 = all)
    semantic_samples: int = 8  # samples per question and group it is computed over (0 = all): the encoder's cost


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


def generation_settings(task, records: list[dict], sampling: Sampling) -> dict:
    """What a generation file is a function of: recorded beside it, compared before it is reused."""
    return {**dataclasses.asdict(sampling), "records": len(records), "task": task.name}


def read_if_exists(path: Path):
    return read_json(path) if path.exists() else None


def settings_path(out: Path) -> Path:
    return out.with_name(out.name + ".settings.json")


def is_done(out: Path, settings: dict) -> bool:
    """The generation file exists and was made with these settings."""
    sp = settings_path(out)
    return out.exists() and sp.exists() and read_json(sp) == settings


ROWS_PER_CHUNK = 2048  # completions per generate call: enough rows for the sampler to batch well, small to redo


def generate_and_verify(model, tok, task, records: list[dict], out: Path, sampling: Sampling, *,
                        chunk: int | None = None, desc: str = "sample", log: Path | None = None,
                        gen_kw: dict | None = None) -> list[dict]:
    """n completions per record with the task's verdicts, one JSONL row per record:
    {"idx", "id", "prompt", "completions", "correct"[, "level"]}.

    Records go in chunks (default: ROWS_PER_CHUNK completions, at most 256 records), appended to OUT.partial with an
    fsync; a restart keeps the whole chunks already there (if they were drawn with the same settings). The sampler
    draws from a random stream keyed by (seed, question index, sample index), so the result depends neither on the
    chunking nor on where a run was killed. A verifier that cannot judge a completion (tasks.HarnessError) stops the
    stage before its chunk is written: a harness failure is never recorded as a wrong answer. When every chunk is
    in, OUT.partial becomes OUT, and a line with the stage's counts goes to `log`."""
    from minisirev.sampler import generate

    settings = generation_settings(task, records, sampling)
    if is_done(out, settings):
        return read_rows(out)
    partial, sp = out.with_name(out.name + ".partial"), settings_path(out)
    same = sp.exists() and read_json(sp) == settings
    rows = read_partial_rows(partial) if same else []
    chunk = chunk or max(1, min(256, ROWS_PER_CHUNK // sampling.n))
    rows = rows[:len(rows) // chunk * chunk]  # a chunk cut short by a kill is redone whole
    dist.barrier()  # under torchrun: every rank has read the files before rank 0 rewrites them
    main = dist.is_main()
    if main:
        out.unlink(missing_ok=True)
        write_json(sp, settings)  # (makes out's directory)
        write_jsonl(partial, rows)
    s, t0, n_tokens = sampling, time.perf_counter(), 0
    gen_kw = gen_kw or {}
    with dist.sink(partial) as f, tqdm(total=len(records), initial=len(rows), desc=desc, unit="q", leave=False,
                                       **dist.quiet()) as bar:
        for c in range(len(rows) // chunk, math.ceil(len(records) / chunk)):
            recs = records[c * chunk:(c + 1) * chunk]
            prompts = [task.prompt(ex) for ex in recs]
            # under torchrun each rank draws (and below grades) its share of the chunk; all get every result
            outs = dist.map_shards(lambda ps, ks: generate(
                model, ps, n=s.n, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                top_k=s.top_k, stop_ids=stop_ids(tok), seed=s.seed, keys=ks, **gen_kw),
                [tok.encode_prompt(p) for p in prompts], list(range(c * chunk, c * chunk + len(recs))))
            texts = [[tok.decode(ids) for ids in per_prompt] for per_prompt in outs]
            try:
                verdicts = dist.map_shards(task.is_correct_batch, [ex for ex, ts in zip(recs, texts) for _ in ts],
                                           [t for ts in texts for t in ts])
            except HarnessError as e:  # the chunk is not written: its verdicts do not exist
                if log is not None and main:
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
    if main:
        os.replace(partial, out)
    if log is not None:
        correct = sum(sum(r["correct"]) for r in rows)
        # under torchrun every rank graded a share: its counts are summed
        harness = dist.sum_counts(task.harness_stats(reset=True) if hasattr(task, "harness_stats") else {})
        if main:
            append_jsonl(log, {"stage": desc, "file": str(out), "questions": len(rows),
                               "completions": len(rows) * s.n, "correct": correct,
                               "programs_run": harness.get("programs", 0),
                               "harness_errors": harness.get("harness_errors", 0),
                               "seconds": round(time.perf_counter() - t0, 1)})
    dist.barrier()  # OUT is on disk before any rank reads it
    return rows


# ---- evaluation -----------------------------------------------------------------------------------------------


def evaluate(run: Run, t: int, model: Callable, tok, inputs: Inputs, settings: EvalSettings, step_method: str
             ) -> dict:
    """Generate what M_t's metrics need (greedy and sampled test answers, greedy OOD answers) into iter_t/eval/,
    then derive from those files, in order: the per-question record (eval/per_question.json: verdicts, counts,
    diversity per question; the encoder runs here, once), metrics.json with its 95% intervals ("ci"),
    transitions.json (questions gained and lost against M1 and M_{t-1}) and, for math tasks, the second
    verifier's agreement (second_verifier.json). `model()` returns M_t; it is called only when a generation is
    missing. Seeds: evaluation of M_t draws with seed + 7919 t."""
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
        if not is_done(out, generation_settings(task, records, sampling)):
            generate_and_verify(model(), tok, task, records, out, sampling, desc=f"iter {t} {name}", log=run.log)
            fresh = True
    if dist.is_main():  # under torchrun rank 0 derives and writes; the others wait, then read
        pq_path = run.iter_dir(t) / "eval" / "per_question.json"
        if fresh or not pq_path.exists():
            write_json(pq_path, per_question(run, t, semantic_questions=e.semantic_questions,
                                         semantic_samples=e.semantic_samples))
        if fresh or not run.metrics(t).exists():
            write_json(run.metrics(t), compute_metrics(run, t, step_method, seed=seed))
            write_json(run.iter_dir(t) / "transitions.json", transitions(run, t))
            if inputs.task.name in SECOND_VERIFIER_TASKS:
                write_json(run.iter_dir(t) / "second_verifier.json", second_opinion(run, t, inputs))
    dist.barrier()
    return read_json(run.metrics(t))


def per_question(run: Run, t: int, *, semantic_questions: int = 0, semantic_samples: int = 0) -> dict:
    """metrics.per_question of M_t from its generation files."""
    greedy = read_rows(run.eval_file(t, "test_greedy"))
    samples = read_rows(run.eval_file(t, "test_samples"))
    ood = read_rows(run.eval_file(t, "ood_greedy")) if run.eval_file(t, "ood_greedy").exists() else None
    return M.per_question(ids=[r["id"] for r in greedy], greedy_correct=[bool(r["correct"][0]) for r in greedy],
                          sample_texts=[r["completions"] for r in samples],
                          sample_verdicts=[r["correct"] for r in samples],
                          ood_levels=None if ood is None else [r.get("level") for r in ood],
                          ood_correct=None if ood is None else [bool(r["correct"][0]) for r in ood],
                          semantic_questions=semantic_questions or None, semantic_samples=semantic_samples or None)


def load_per_question(run: Run, t: int) -> dict | None:
    return read_if_exists(run.iter_dir(t) / "eval" / "per_question.json")


def compute_metrics(run: Run, t: int, step_method: str, *, seed: int = 0) -> dict:
    """metrics.json of M_t from its per-question record and, for t >= 2, M1's (the improvement set); M1's
    coverage comes from its own samples on the training questions (iter_1/samples.jsonl). "ci" holds the
    seeded bootstrap intervals of every headline number, in the same layout."""
    pq, m1 = load_per_question(run, t), load_per_question(run, 1) if t >= 2 else None
    coverage = None
    if t == 1 and run.samples(1).exists():
        train = read_rows(run.samples(1))
        coverage = M.coverage([sum(r["correct"]) for r in train], len(train[0]["correct"]))
    out = M.metrics_from_questions(pq, iter=t, step_method=step_method, m1=m1, coverage=coverage)
    if coverage is not None:
        out["recommendation"] = M.recommend(coverage)
    out["ci"] = M.iteration_intervals(pq, m1=m1, seed=seed)
    return out


def transitions(run: Run, t: int) -> dict:
    """The test questions M_t gained and lost (greedy) against M1 (t >= 2) and against M_{t-1} (t >= 1)."""
    return M.iteration_transitions(t, load_per_question(run, t), m1=load_per_question(run, 1) if t >= 2 else None,
                                   prev=load_per_question(run, t - 1) if t >= 1 else None)


SECOND_VERIFIER_TASKS = ("arith", "gsm8k", "math")


def second_opinion(run: Run, t: int, inputs: Inputs) -> dict:
    """math-verify's verdicts beside ours on M_t's greedy answers (test and OOD), with the disagreement rate."""
    from minisirev.second_verifier import compare_verifiers

    def compare(task, records, name):
        rows = read_rows(run.eval_file(t, name))
        return compare_verifiers(task.name, records, [r["completions"][0] for r in rows],
                                 [bool(r["correct"][0]) for r in rows], ids=[r["id"] for r in rows])

    out = {"iter": t, **compare(inputs.task, inputs.test, "test_greedy")}
    if inputs.ood and inputs.ood_task.name in SECOND_VERIFIER_TASKS:
        out["ood"] = compare(inputs.ood_task, inputs.ood, "ood_greedy")
    return out


# ---- provenance -----------------------------------------------------------------------------------------------


def write_provenance(run: Run, t: int, config: dict, device) -> dict:
    """iter_t/provenance.json: the hashes of what produced M_t (the weights it started from, DPO's reference,
    its training data, the samples that data came from, its own weights), the verifier's version, the seeds and
    sampling settings, the kit's commit, package versions and the device. A checkpoint already hashed in the
    previous record is not hashed again."""
    from minisirev import provenance as prov

    path = run.iter_dir(t) / "provenance.json"
    if path.exists():
        return read_json(path)
    prev = read_if_exists(run.iter_dir(t - 1) / "provenance.json") if t >= 1 else None
    base = config["model"] if Path(config["model"]).exists() else None  # a Hub id is recorded by name only
    if t == 0:
        files = {"model": base}
    else:
        start = (prev or {}).get("files", {}).get("model") or (base if t == 1 else run.model(t - 1))
        ref = None
        if "dpo" in step_methods(config["method"], t, config.get("schedule", "alternate")):
            m1 = (read_if_exists(run.iter_dir(1) / "provenance.json") or {}).get("files", {}).get("model") \
                or run.model(1)
            ref = start if config.get("ref") == "prev" or t == 2 else m1
        files = {"start_model": start, "ref_model": ref, "train_data": run.train_data(t),
                 "samples": run.samples(t - 1) if t >= 2 else None, "model": run.model(t)}
    s = config.get("seed", 0)
    record = prov.iteration_provenance(
        iter=t, files=files, verifier=prov.verifier_version(config.get("task")),
        seeds={"seed": s, "samples": s + t + 1, "eval": s + 7919 * t, "pairs": s + t},
        sampling={k: config.get(k) for k in ("n_samples", "temperature", "top_p", "top_k", "max_new_tokens",
                                             "eval_samples", "eval_temperature")},
        device=device, base_model=config["model"])
    write_json(path, record)
    return record


# ---- the summary ----------------------------------------------------------------------------------------------


def write_summary(run: Run, config: dict) -> dict:
    """summary.json from M0's and every finished iteration's files: metrics, paired comparisons (M_t against
    M0, M1 and M_{t-1}), transitions, provenance and the second verifier; then report.md and the plots."""
    from minisirev.report import write_report

    ts = ([0] if run.metrics(0).exists() else []) + [t for t in run.trained_iters() if run.metrics(t).exists()]
    metrics = {t: read_json(run.metrics(t)) for t in ts}
    pqs = {t: load_per_question(run, t) for t in ts}
    seed = config.get("seed", 0)
    comparisons = [M.iteration_comparisons(t, pqs[t], m0=pqs.get(0), m1=pqs.get(1) if t >= 2 else None,
                                           prev=pqs.get(t - 1) if t >= 3 else None, seed=seed + t)
                   for t in ts if t >= 1]

    def gather(name: str) -> list[dict]:
        return [read_json(p) for t in ts if (p := run.iter_dir(t) / name).exists()]

    summary = {"task": config.get("task"), "method": config.get("method"), "base": metrics.get(0),
               "iterations": [metrics[t] for t in ts if t >= 1], "comparisons": comparisons,
               "transitions": gather("transitions.json"), "provenance": gather("provenance.json"),
               "second_verifier": gather("second_verifier.json"), "config": config}
    write_json(run.summary, summary)
    write_report(run.root, summary)
    return summary
