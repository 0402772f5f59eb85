"""The run directory: one object that knows every path of a run, its stored config, and the inputs it reads.

    runs/NAME/config.json                 every resolved flag (`Run.check_config` compares a resumed command)
    runs/NAME/log.jsonl                   one line per finished generation stage (counts, harness errors, time)
    runs/NAME/iter_0/                     M0, the base model, evaluated: eval/ and metrics.json (the t = 0 row)
    runs/NAME/iter_t/model/               M_t, a Hugging Face checkpoint (t >= 1)
    runs/NAME/iter_t/train_data.jsonl     what M_t was trained on (gold solutions at t = 1)
    runs/NAME/iter_t/train_log.jsonl      one line per optimiser step
    runs/NAME/iter_t/samples.jsonl        M_t's N samples per training question with their verdicts: M1's
                                          coverage, and the data of round t + 1
    runs/NAME/iter_t/eval/*.jsonl         M_t's generations on the test and OOD questions, with verdicts
    runs/NAME/iter_t/metrics.json         M_t's metrics (docs/method.md)
    runs/NAME/summary.json, report.md, plots/

Data flows one way: iteration t reads only its own directory and earlier ones. Every file is written under a
temporary name and renamed when complete, so a file that exists is finished: that is the whole resume rule
(`done`), and a killed run restarted with the same command skips what is done.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from minisirev.tasks import Task, get_task

# ---- atomic files ---------------------------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL file this kit wrote (task data files are read, validated, by tasks.read_jsonl)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_partial_rows(path: Path) -> list[dict]:
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


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# ---- the run directory ----------------------------------------------------------------------------------------

# flags that may change between a run and its resumption: they do not change what the run computes
NOT_COMPARED = ("iter", "force", "log_every", "device", "out", "skip_base", "world_size", "plan", "gpu_memory",
                "cpu_offload")


@dataclass(frozen=True)
class Run:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    # paths only: nothing is created until it is written (the writers make their directories)
    def iter_dir(self, t: int) -> Path:
        return self.root / f"iter_{t}"

    def model(self, t: int) -> Path:
        return self.root / f"iter_{t}" / "model"

    def samples(self, t: int) -> Path:
        return self.iter_dir(t) / "samples.jsonl"

    def train_data(self, t: int) -> Path:
        return self.iter_dir(t) / "train_data.jsonl"

    def train_log(self, t: int) -> Path:
        return self.iter_dir(t) / "train_log.jsonl"

    def eval_file(self, t: int, name: str) -> Path:
        return self.iter_dir(t) / "eval" / f"{name}.jsonl"

    def metrics(self, t: int) -> Path:
        return self.iter_dir(t) / "metrics.json"

    # state
    def has_model(self, t: int) -> bool:
        return (self.model(t) / "config.json").exists()

    def trained_iters(self) -> list[int]:
        """t of every M_t saved, in order (a run's models are consecutive from 1)."""
        ts = sorted(int(p.name.split("_")[1]) for p in self.root.glob("iter_*") if (p / "model" / "config.json")
                    .exists())
        return [t for i, t in enumerate(ts, 1) if t == i]

    def stored_config(self) -> dict | None:
        return read_json(self.config) if self.config.exists() else None

    def config_conflict(self, config: dict) -> str | None:
        """Why `config` cannot continue the run stored here (None: it can). A different setting would mix two
        experiments in one directory; a lower --iter than what is finished would shrink a finished report."""
        old = self.stored_config()
        if old is None:
            return None
        diff = [k for k in config if k not in NOT_COMPARED and old.get(k) != config[k]]
        if diff:
            shown = ", ".join(f"--{k.replace('_', '-')} {old.get(k)!r} -> {config[k]!r}" for k in diff[:4])
            return (f"{self.root} holds a run with other settings ({shown}); use another --out, or --force to "
                    "start over")
        done = self.trained_iters()
        if "iter" in config and done and config["iter"] < done[-1]:
            return (f"{self.root} holds {done[-1]} finished iterations; --iter {config['iter']} would rewrite its "
                    f"summary and report with fewer (use --iter {done[-1]} or more to extend it, or another --out)")
        return None


    def m1_conflict(self, config: dict) -> str | None:
        """Why this run's M0 and M1 cannot stand for those of a run with `config` (None: they can): M1 and the
        evaluations of M0 and M1 depend only on the settings in M1_SETTINGS."""
        old = self.stored_config()
        if old is None or not self.has_model(1):
            return f"{self.root}: no finished M1 to start from (iter_1/model is missing)"
        diff = [k for k in M1_SETTINGS if old.get(k) != config.get(k)]
        if diff:
            shown = ", ".join(f"--{k.replace('_', '-')} {old.get(k)!r} here, {config.get(k)!r} asked" for k in diff[:3])
            return f"{self.root}: its M1 was made with other settings ({shown})"
        return None

    def adopt_m1(self, src: Run) -> None:
        """Start from `src`'s M0 evaluation and M1 (iter_0, iter_1: copied, so that both runs can be compared as
        methods applied to one M1, as the paper's figures do); what this run already has is kept."""
        for t in (0, 1):
            a, b = src.iter_dir(t), self.iter_dir(t)
            if a.exists() and not b.exists():
                tmp = b.with_name(b.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(a, tmp)
                os.replace(tmp, b)


# the settings M0's evaluation, M1 and M1's samples depend on (not the method of the later rounds)
M1_SETTINGS = ("model", "task", "data", "n_train", "n_test", "n_ood", "n_samples", "temperature", "top_p", "top_k",
               "max_new_tokens", "eval_samples", "eval_temperature", "semantic_questions", "semantic_samples", "lr",
               "m1_epochs", "batch_size", "grad_accum", "warmup", "clip", "sft_reduction", "seed", "dtype",
               "skip_base")


# ---- the inputs a run reads -----------------------------------------------------------------------------------


@dataclass
class Inputs:
    task: Task
    ood_task: Task
    train: list[dict]
    test: list[dict]
    ood: list[dict]


def load_inputs(task_name: str, data: str | None, *, n_train: int | None, n_test: int, n_ood: int) -> Inputs:
    """The records of a run: the first n_train training questions (None: no training split needed), the first
    n_test test and n_ood OOD questions (0 = all). `data` is a directory holding the task's split files
    (default data/TASK/). The OOD split of a task is its own (arith: levels 1-5), or another task's when the
    task names one (GSM8K -> MATH by level, as in the paper); raises DataError / ValueError, one line each."""
    task = get_task(task_name)

    def split(t: Task, name: str):
        return Path(data) / f"{name}.jsonl" if data and t is task else name

    ood_task = get_task(task.ood_task) if getattr(task, "ood_task", None) else task
    train = task.load(split(task, task.splits["train"]))[:n_train] if n_train is not None else []
    test = task.load(split(task, task.splits["test"]))[:n_test or None]
    ood = ood_task.load(split(ood_task, task.splits["ood"]))[:n_ood or None] if task.splits.get("ood") else []
    if n_train is not None and not train or not test:
        raise ValueError(f"task {task_name}: no training or no test questions found")
    return Inputs(task, ood_task, train, test, ood)
