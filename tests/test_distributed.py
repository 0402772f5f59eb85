"""torchrun on CPUs (gloo): K ranks compute what one process computes (minisirev/distributed.py), --plan's numbers
and refusals (minisirev/plan.py).

The loop test runs train.py twice on a miniature of the embedded default, once as one process and once under
`torchrun --nproc-per-node 2`: every generation file (M0's, M1's and M2's evaluations, M1's self-samples) must be
byte-identical, the trained weights equal up to float summation order, the metrics equal. The FSDP2 test runs this
file as a torchrun worker: one SFT step (fused loss, activation checkpointing, uneven shares, a rank left empty)
and one DPO step with an NLL term, each compared with the single process's step on the same data.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "data" / "base_model"
MINI = ["--model", str(BASE), "--n-train", "12", "--n-test", "4", "--n-ood", "4", "--n-samples", "4",
        "--eval-samples", "2", "--max-new-tokens", "96", "--m1-epochs", "2", "--batch-size", "4", "--iter", "2",
        "--method", "sft-dpo", "--semantic-questions", "2"]
# one thread per process in both runs: the same matmul blocking, so rounding differs only by the batch split
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # a free port

pytestmark = pytest.mark.skipif(not (BASE / "config.json").exists(), reason="data/base_model is not built")


def run(cmd: list[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)
    if check:
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def generation_files(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): p.read_text() for p in sorted(d.rglob("*.jsonl"))
            if p.name not in ("log.jsonl", "train_log.jsonl")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    run([sys.executable, "train.py", *MINI, "--out", str(d / "one")])
    run([*TORCHRUN, "train.py", *MINI, "--out", str(d / "two")])
    return d / "one", d / "two"


def test_two_ranks_compute_what_one_process_computes(runs):
    one, two = runs
    a, b = generation_files(one), generation_files(two)
    assert a.keys() == b.keys() and "iter_1/samples.jsonl" in a and "iter_2/eval/test_samples.jsonl" in a
    assert [k for k in a if a[k] != b[k]] == []  # the same samples, verdicts and training data, byte for byte
    for t in (1, 2):
        wa, wb = (load_file(r / f"iter_{t}" / "model" / "model.safetensors") for r in (one, two))
        assert wa.keys() == wb.keys()
        for k in wa:  # AdamW's first steps move each weight by ~lr; a float-order difference stays far below it
            torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=0, msg=k)
        assert any(not torch.equal(wa[k], load_file(BASE / "model.safetensors")[k]) for k in wa)  # it trained
        ma, mb = (json.loads((r / f"iter_{t}" / "metrics.json").read_text()) for r in (one, two))
        assert ma == mb
        la, lb = ([json.loads(x) for x in (r / f"iter_{t}" / "train_log.jsonl").read_text().splitlines()]
                  for r in (one, two))
        assert len(la) == len(lb) > 0  # one log, written by rank 0 only
        for x, y in zip(la, lb):
            assert abs(x["loss"] - y["loss"]) < 1e-4 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-3
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    assert not list(two.rglob("*.partial")) and not list(two.rglob("*.tmp"))


def test_killed_torchrun_run_resumes(runs, tmp_path):
    _, two = runs
    killed = tmp_path / "killed"
    cmd = [*TORCHRUN, "train.py", *MINI, "--out", str(killed)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)  # its own process group: the agent and both workers
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (killed / "iter_1" / "model" / "config.json").exists():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists() and not (killed / "iter_2" / "model").exists()
    run(cmd)  # the same command
    assert generation_files(killed) == generation_files(two)
    for t in (1, 2):
        wa, wb = (load_file(r / f"iter_{t}" / "model" / "model.safetensors") for r in (two, killed))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same ranks, same data: the same floats
    assert (killed / "summary.json").exists()


def test_eval_py_under_two_ranks_writes_what_one_process_writes(runs, tmp_path):
    import shutil

    _, two = runs
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(two, a)
    shutil.copytree(two, b)
    run([sys.executable, "eval.py", "--run", str(a), "--n-ood", "2"])  # fewer OOD questions: regenerated
    run([*TORCHRUN, "eval.py", "--run-dir", str(b), "--n-ood", "2"])  # torchrun would take --run for --run-path
    assert generation_files(a) == generation_files(b)
    for t in (0, 1, 2):
        assert (a / f"iter_{t}" / "metrics.json").read_text() == (b / f"iter_{t}" / "metrics.json").read_text()
    assert json.loads((b / "config.json").read_text())["n_ood"] == 2


def test_sample_py_under_two_ranks_writes_the_one_process_file(tmp_path):
    # --n-samples, not --n: torchrun's argparse would take --n as an abbreviation of its own flags
    flags = ["sample.py", "--model", str(BASE), "--split", "test", "--limit", "5", "--n-samples", "3",
             "--max-new-tokens", "40", "--batch-size", "4"]
    run([sys.executable, *flags, "--out", str(tmp_path / "one.jsonl")])
    r = run([*TORCHRUN, *flags, "--out", str(tmp_path / "two.jsonl")])
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()
    assert r.stdout.count("wrote 5 questions") == 1  # rank 0 alone prints


# ---- one process: the helpers are the identity, the loss is today's ------------------------------------------


@pytest.mark.parametrize("n,k", [(0, 2), (1, 2), (7, 2), (7, 3), (8, 8), (5, 8)])
def test_shares_cover_a_list_once_and_merge_back(n, k):
    from minisirev.distributed import merge, share

    idx = [list(share(n, r, k)) for r in range(k)]
    assert sorted(i for part in idx for i in part) == list(range(n))
    items = [f"q{i}" for i in range(n)]
    assert merge([[items[i] for i in part] for part in idx], n) == items


def test_one_process_loss_is_the_mean_it_always_was():
    from minisirev import distributed as dist
    from minisirev.losses import dpo_loss, sft_loss
    from minisirev.training import sft_term

    g = torch.Generator().manual_seed(0)
    sums, counts = -torch.rand(5, generator=g) * 40, torch.randint(1, 30, (5,), generator=g)
    for red in ("mean", "sum"):  # bit for bit: the seeded single-process run must not move
        loss, value, _, _ = dist.reduce_terms([(1.0, *sft_term(sums, counts, red))], {}, 0)
        assert torch.equal(loss, sft_loss(sums, counts, red)) and torch.equal(value, loss)
    pc, pr, rc, rr = (-torch.rand(5, generator=g) * 40 for _ in range(4))
    losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta=0.1)
    loss, _, stats, n = dist.reduce_terms([(1.0, losses.sum(), 5), (0.5, *sft_term(pc, counts, "mean"))],
                                          {"rewards/chosen": (r_c.sum(), 5)}, 17)
    assert torch.equal(loss, losses.mean() + 0.5 * sft_loss(pc, counts, "mean")) and n == 17
    assert stats["rewards/chosen"] == r_c.mean().item()
    assert dist.map_shards(lambda xs, ys: [x + y for x, y in zip(xs, ys)], [1, 2], [10, 20]) == [11, 22]
    assert dist.shard_batch([1, 2, 3]) == ([1, 2, 3], True) and dist.gather([4, 5], 2) == [4, 5]


# ---- the plan -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_plan_activations_are_what_autograd_saves(n_kv_heads):
    """A and A_out of plan.py against the bytes of every tensor autograd saves in a training forward (saved-tensor
    hooks, each storage counted once, parameters excluded), fp32 on the CPU with SDPA: L = 4 minus L = 2 gives
    two blocks' worth, and checkpointing leaves b C per token and block."""
    from minisirev import plan
    from minisirev.config import ModelConfig
    from minisirev.model import Transformer

    def saved_bytes_per_token(n_layers: int, ckpt: bool) -> float:
        cfg = ModelConfig.from_preset("tiny", n_kv_heads=n_kv_heads, n_layers=n_layers)
        model = Transformer(cfg, attn="sdpa").init_weights(seed=0).train()
        model.checkpoint_blocks = ckpt
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
            return t

        B, T = 2, 64
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randint(0, cfg.vocab_size, (B, T)))
        return sum(seen.values()) / (B * T)

    cfg = ModelConfig.from_preset("tiny", n_kv_heads=n_kv_heads)
    per_block = (saved_bytes_per_token(4, False) - saved_bytes_per_token(2, False)) / 2
    assert per_block == pytest.approx(plan.activation_bytes_per_token(cfg, 4, "sdpa"), rel=0.01)
    out = saved_bytes_per_token(2, False) - 2 * per_block
    assert out == pytest.approx(plan.output_activation_bytes_per_token(cfg, 4, rows=2), rel=0.02)
    ckpt_block = (saved_bytes_per_token(4, True) - saved_bytes_per_token(2, True)) / 2
    assert ckpt_block == 4 * cfg.dim


@pytest.fixture
def llama3_8b_dir(tmp_path):
    """A Llama-3-8B config.json beside the shipped tokenizer, and no weights at all: --plan and the refusal must
    not need any."""
    from minisirev.config import ModelConfig

    d = tmp_path / "llama3-8b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(ModelConfig.from_preset("llama3-8b").to_hf()))
    for f in BASE.glob("*token*"):
        (d / f.name).write_bytes(f.read_bytes())
    return d


def test_plan_reports_and_refuses(llama3_8b_dir, tmp_path):
    from minisirev import plan
    from minisirev.config import ModelConfig

    flags = ["train.py", "--model", str(llama3_8b_dir), "--n-train", "16", "--n-test", "4", "--n-ood", "4"]
    r = run([sys.executable, *flags, "--plan", "8", "--grad-checkpoint"])
    assert "8.03 B parameters" in r.stdout and "fits" in r.stdout and "DOES NOT FIT" not in r.stdout
    shard = 4 * -(-plan.cfg_params(ModelConfig.from_preset("llama3-8b")) // 8) / plan.GiB
    assert f"parameters{'':<50}{shard:10.2f}" in r.stdout  # 8.03e9 fp32 / 8 ranks = 3.74 GiB
    r = run([sys.executable, *flags, "--plan", "1"], check=False)  # 16 bytes a parameter on one GPU
    assert r.returncode == 1 and "DOES NOT FIT" in r.stdout
    out = tmp_path / "run"
    r = run([sys.executable, *flags, "--gpu-memory", "80", "--out", str(out)], check=False)
    assert r.returncode == 2 and "does not fit" in r.stderr and "--grad-checkpoint" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()  # refused before anything loads (there are no weights)


# ---- FSDP2 steps, in a torchrun worker (this file run as a script) -------------------------------------------


@pytest.mark.parametrize("mode", ["plain", "fused"])
def test_fsdp_steps_match_one_process(tmp_path, mode):
    r = run([*TORCHRUN, __file__, str(tmp_path), mode], timeout=600)
    assert "worker ok" in r.stdout, r.stdout[-2000:]


def _worker(out: Path, mode: str) -> None:
    """Under torchrun: the FSDP2 path (sharded load, steps with activation checkpointing, gathered save) against
    one process's steps; mode "fused": with the Triton fused log-prob kernel (interpreter)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from minisirev import distributed as dist
    from minisirev import training as tr
    from minisirev.checkpoint import load_model
    from minisirev.tokenizer import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(BASE)
    sft = [{"prompt": f"What is {i} + {2 * i}?", "completion": f"{i} + {2 * i} = {3 * i}. #### {3 * i}"}
           for i in range(7)]  # batches of 3, 3, 1: shares 2/1, 2/1 and 1/empty
    # chosen and rejected share no completion token: a shared prefix's gradients cancel to float noise, and
    # AdamW's first step moves such coordinates by +-lr whatever the noise's sign
    pairs = [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}", "rejected": f"no, {i + 7} it is"}
             for i in range(5)]
    args = tr.TrainArgs(lr=1e-3, epochs=1, batch_size=3, grad_checkpoint=True, fused=mode == "fused", log_every=100)
    dpo = tr.DPOArgs(beta=0.1, nll_weight=0.5)

    def steps(model, tag):
        tr.train_sft(model, tok, sft, args, out / f"{tag}_sft.jsonl")
        ref = tr.reference_logprobs(model, tok, pairs, args)
        tr.train_dpo(model, tok, pairs, ref, args, out / f"{tag}_dpo.jsonl", dpo)
        return ref

    if os.environ["RANK"] == "0":  # the single process's steps, before the process group exists
        full = load_model(BASE)
        start = {k: v.clone() for k, v in full.state_dict().items()}
        ref_1 = steps(full, "one")
    dist.setup("test", torch.device("cpu"))
    sharded = dist.load_sharded(BASE, device=torch.device("cpu"), dtype=torch.float32, attn="sdpa", bf16=False)
    if dist.is_main():
        for name, p in sharded.named_parameters():  # rank 0 read exactly its rows
            a, b = dist._rows_of_shard(p.shape[0])
            assert torch.equal(p.to_local(), start[name][a:b]), name
    ref_k = steps(sharded, "k")
    dist.save_full(sharded, out / "k_model", tok)
    if dist.is_main():
        # sequence log-prob sums of size ~60 after the SFT steps: a few fp32 ulps apart
        torch.testing.assert_close(torch.tensor(ref_k), torch.tensor(ref_1), atol=1e-5, rtol=1e-6)
        saved = load_model(out / "k_model").state_dict()
        for k, v in full.state_dict().items():
            assert not torch.equal(v, start[k]) or k.endswith("norm.weight"), k  # the steps moved it
            # AdamW (lr 1e-3, 5 steps) moves a coordinate whose gradient is near 0 by up to lr per step whatever
            # the float noise in it: a few of them end ~3e-5 apart; the rest agree to 1e-6
            torch.testing.assert_close(saved[k], v, atol=1e-4, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
        for phase in ("sft", "dpo"):
            la = [json.loads(x) for x in (out / f"one_{phase}.jsonl").read_text().splitlines()]
            lb = [json.loads(x) for x in (out / f"k_{phase}.jsonl").read_text().splitlines()]
            assert len(la) == len(lb) > 0, (len(la), len(lb))
            for x, y in zip(la, lb):
                assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-4, (x, y)
                assert all(abs(x[k] - y[k]) < 1e-5 for k in x if k.startswith("rewards/")), (x, y)
        print("worker ok")
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
