"""One process or many: the same scripts under `torchrun`, with PyTorch's own distributed stack (docs/distributed.md).

    torchrun --nproc-per-node 8 train.py ...        one node of 8 GPUs (NCCL); CPU ranks use gloo

What runs where, K = world size, r = this rank:
    sampling, evaluation   data-parallel: every rank holds a full replica of the model and draws its share of
                           each chunk of questions (`map_shards`); the verdicts are graded the same way; rank 0
                           writes every file. The sampler's streams are keyed by (seed, question, sample), so K
                           ranks draw what one process draws.
    training               FSDP2: `fully_shard` on every block and at the root (`parallelize`), bf16 compute with
                           fp32 master weights and fp32 gradient reduction on CUDA, optional CPU offload of the
                           sharded parameters, gradients and AdamW state. Every micro-batch is split over the
                           ranks (`shard_batch`), and every loss term is a sum over items divided by its count
                           summed over all ranks (`reduce_terms`), so the gradient is the single process's up to
                           the order of float sums.
    checkpoints            built on the meta device, every rank reads only the rows of each tensor it keeps
                           (`load_sharded`); saving gathers a full Hugging Face checkpoint on rank 0 (`save_full`).
    files                  rank 0 writes, after which every rank may read (`on_main`, `barrier`): the run directory
                           must be on a file system every node sees (`check_shared`).

Without torchrun (no WORLD_SIZE in the environment) nothing here does anything: `world() == 1`, every helper is
the identity, and the single-process path is the one it always was.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

# ---- the process group ----------------------------------------------------------------------------------------


def launched() -> bool:
    """Started by torchrun (or any launcher that sets the env:// variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def setup(prog: str, device: torch.device) -> torch.device:
    """Join the process group when started by torchrun and return this rank's device.

    CUDA ranks use NCCL and GPU LOCAL_RANK (an explicit --device cuda:N is refused: torchrun assigns the GPUs);
    CPU ranks use gloo. Ranks other than 0 print nothing on stdout (every rank computes the same lines); their
    errors still reach stderr."""
    if not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if device.index is not None:
            print(f"{prog}: error: --device {device}: under torchrun every rank uses GPU LOCAL_RANK; pass --device "
                  "cuda", file=sys.stderr)
            sys.exit(2)
        if local >= torch.cuda.device_count():
            print(f"{prog}: error: LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPU(s); "
                  "use --nproc-per-node at most that", file=sys.stderr)
            sys.exit(2)
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not active():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return device


def shutdown() -> None:
    """Leave the process group, once every rank is here: called at the end of each script, so that gloo's worker
    threads stop while the interpreter is whole (left to the interpreter's exit, a rank could abort with
    "terminate called without an active exception" after its work was done)."""
    if active():
        dist.barrier()
        dist.destroy_process_group()


# ---- rank 0 decides and writes; everyone hears --------------------------------------------------------------


def on_main(fn: Callable, *args, **kwargs):
    """fn(*args) on rank 0 only (file writes, decisions that read the run directory), then its return value, or
    the exception it raised (SystemExit of a refused flag included), on every rank. Every rank must call it."""
    if not active():
        return fn(*args, **kwargs)
    box = [None, None]
    if is_main():
        try:
            box[0] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 (re-raised on every rank below)
            box[1] = e
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        if isinstance(box[1], SystemExit) and not is_main():
            raise SystemExit(box[1].code)  # rank 0 printed the message
        raise box[1]
    return box[0]


def check_shared(path: Path, prog: str) -> None:
    """Every rank sees `path`, which rank 0 has just written: the run directory is on a shared file system."""
    if not active():
        return
    seen = torch.tensor([1.0 if Path(path).exists() else 0.0])
    seen = all_sum(seen.to(_comm_device()))
    if int(seen.item()) != world():
        if is_main():
            print(f"{prog}: error: {path} is written by rank 0 but only {int(seen.item())} of {world()} ranks see it;"
                  " under several nodes the run directory (--out) must be on a file system every node shares",
                  file=sys.stderr)
        sys.exit(2)


def sink(path: Path, mode: str = "a"):
    """A file rank 0 writes: open(path) there; an anonymous temporary file elsewhere (written and discarded, so
    the same code runs on every rank, fsync included)."""
    return open(path, mode) if is_main() else tempfile.TemporaryFile(mode)  # noqa: SIM115


def quiet() -> dict:
    """tqdm keywords: silent on ranks other than 0 (rank 0 keeps the defaults, TQDM_DISABLE included)."""
    return {} if is_main() else {"disable": True}


# ---- data parallel: shares of a list, and their merge --------------------------------------------------------


def share(n: int, r: int | None = None, k: int | None = None) -> range:
    """Indices of a list of n items that rank r takes: r, r + K, r + 2K, ... (strided, so that length-sorted
    batches give every rank rows of similar length)."""
    r = rank() if r is None else r
    k = world() if k is None else k
    return range(r, n, k)


def merge(parts: list[list], n: int) -> list:
    """Inverse of `share`: item i of the whole is item i // K of rank i % K's part."""
    k = len(parts)
    return [parts[i % k][i // k] for i in range(n)]


def gather(part: list, n: int) -> list:
    """Every rank's part of a list of n items (split by `share`), merged in order, on every rank."""
    if not active():
        return part
    parts = [None] * world()
    dist.all_gather_object(parts, part)
    return merge(parts, n)


def map_shards(fn: Callable[..., list], *lists: list) -> list:
    """fn over this rank's share of the aligned lists, results gathered in order on every rank:
    map_shards(fn, xs, ys) == fn(xs, ys) for a fn that maps item by item. An exception raised by fn on any rank
    is raised on every rank (the first rank's), so no rank is left waiting in the next collective. fn must not
    itself communicate: it may run on some ranks and not on others (a rank whose share is empty skips it)."""
    n = len(lists[0])
    if not active():
        return fn(*lists)
    idx = share(n)
    result, error = [], None
    if len(idx):
        try:
            result = fn(*[[xs[i] for i in idx] for xs in lists])
        except Exception as e:  # noqa: BLE001 (re-raised on every rank below)
            error = e
    gathered = [None] * world()
    dist.all_gather_object(gathered, (result, error))
    errors = [e for _, e in gathered if e is not None]
    if errors:
        raise errors[0]
    return merge([res for res, _ in gathered], n)


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """A dict of counts (the verifier's programs run, harness errors) summed over all ranks."""
    if not active():
        return counts
    parts = [None] * world()
    dist.all_gather_object(parts, counts)
    return {k: sum(p.get(k, 0) for p in parts) for k in dict.fromkeys(k for p in parts for k in p)}


# ---- training: shares of a micro-batch, and the global normalisation ------------------------------------------


def shard_batch(batch: list) -> tuple[list, bool]:
    """This rank's share of a micro-batch, and whether it holds any item. FSDP needs every rank in every forward
    and backward, so a rank left without items (a last batch smaller than K) gets the batch's first item to run
    on, with `live` False: `reduce_terms` then weighs its loss by 0."""
    if not active():
        return batch, True
    part = [batch[i] for i in share(len(batch))]
    return (part, True) if part else (batch[:1], False)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if active():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def reduce_terms(terms: list[tuple[float, torch.Tensor, torch.Tensor | int]], stats: dict[str, tuple],
                 n_tokens: int, live: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict[str, float], int]:
    """The loss of one micro-batch from this rank's sums: loss = sum_i coef_i * num_i / den_i, with num_i a sum
    over this rank's items and den_i (a count: tokens, sequences, pairs) summed over all ranks, so that the
    micro-batch's loss is that of the whole batch in one process. Also the loss's value over all ranks (for the
    log and the NaN guard), stats {name: (sum, count)} as global means, and the global token count.

    Returns (loss to backward on this rank, global loss value, stats, tokens). One process: loss is
    coef * (num / max(den, 1)), the value is loss itself. K ranks: FSDP averages gradients over the ranks, so
    this rank's loss is K * sum_i coef_i * num_i / DEN_i (DEN_i = sum over ranks of den_i), whose average
    over ranks is the single-process loss; a rank that is not `live` contributes 0 (its num is multiplied by 0,
    which keeps its backward, and FSDP's collectives, in step)."""
    if not active():
        loss = sum(c * (num / _clamp1(den)) for c, num, den in terms)
        return loss, loss.detach(), {k: (s / _clamp1(n)).item() for k, (s, n) in stats.items()}, n_tokens
    device = terms[0][1].device
    w = 1.0 if live else 0.0
    dens = [float(den) * w for _, _, den in terms]
    stat_items = [(float(s) * w, float(n) * w) for s, n in stats.values()]
    vec = torch.tensor(dens + [x for pair in stat_items for x in pair] + [n_tokens * w], dtype=torch.float64,
                       device=_comm_device(device))
    vec = all_sum(vec).tolist()
    k = world()
    loss = sum(c * (num * w) / max(vec[i], 1.0) for i, (c, num, _) in enumerate(terms)) * k
    value = all_sum(loss.detach().float().reshape(1)).reshape(()) / k
    s = vec[len(terms):len(terms) + 2 * len(stats)]
    out_stats = {name: s[2 * j] / max(s[2 * j + 1], 1.0) for j, name in enumerate(stats)}
    return loss, value, out_stats, int(vec[-1])


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP's gradient norm, say) as the whole tensor on every rank; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _clamp1(den):
    return den.clamp_min(1) if isinstance(den, torch.Tensor) else max(den, 1)


def _comm_device(device: torch.device | None = None) -> torch.device:
    """Where a small tensor must live for the default backend: the GPU under NCCL, the CPU under gloo."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- FSDP2: sharding, sharded loading, gathered saving --------------------------------------------------------


def parallelize(model, *, bf16: bool, cpu_offload: bool = False):
    """FSDP2 on a Transformer (built on the meta device or not): `fully_shard` on every block, then at the root
    (embedding, final norm, output head), torchtitan's layout. Parameters are sharded along dim 0 over all
    ranks. bf16: compute in bf16 while the sharded master weights, their gradients and the gradient
    reduce-scatter stay fp32 (MixedPrecisionPolicy). Forward inputs are not cast: the RoPE tables each block
    receives stay fp32, as in one process. cpu_offload: the sharded parameters, gradients and AdamW state live
    in (pinned) CPU memory and the optimiser steps there; the GPU holds only the unsharded blocks in flight.
    `Transformer.hidden` (the fused loss calls it instead of forward) is registered as an FSDP forward method,
    so it too unshards the root. Activation checkpointing stays model.py's (`checkpoint_blocks`), around each
    sharded block."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if bf16 else MixedPrecisionPolicy(cast_forward_inputs=False)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mp_policy=mp, offload_policy=offload)
    register_fsdp_forward_method(model, "hidden")
    return model


def reshard(model) -> None:
    """Under FSDP2: free every unsharded parameter, so that model.parameters() are the sharded DTensors again.
    A forward under no_grad through `hidden` (the fused reference log-probs) leaves the root unsharded; an
    optimiser built then would hold the root's temporary unsharded tensors and never update its weights."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def load_sharded(src, *, device: torch.device, dtype: torch.dtype | None, attn: str, bf16: bool,
                 cpu_offload: bool = False):
    """A checkpoint as an FSDP2-sharded Transformer: built on the meta device, sharded (`parallelize`), its
    shards allocated (`to_empty`), then each rank reads from the safetensors files only the dim-0 rows it keeps
    (`get_slice`; torch.chunk's split, the one FSDP2 uses). No rank ever holds a full copy in CPU memory.
    Checks are load_model's (every tensor present, no unknown one, shapes as config.json says): one-line
    CheckpointError. dtype None keeps the stored dtype (the master weights' dtype)."""
    from safetensors import safe_open

    from minisirev.checkpoint import resolve, tensor_index, weight_files
    from minisirev.config import ModelConfig
    from minisirev.model import Transformer

    path = resolve(src)
    config = ModelConfig.load(path / "config.json")
    files = weight_files(path)
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in Transformer(config).named_parameters()}
    sources = tensor_index(path, files, config, expected)  # our name -> (file, checkpoint name, stored dtype)
    stored = _DTYPES.get(next(iter(sources.values()))[2], torch.float32)  # the first tensor's stored dtype

    with torch.device("meta"):
        model = Transformer(config, attn=attn).to(dtype or stored)
    parallelize(model, bf16=bf16, cpu_offload=cpu_offload)
    model.to_empty(device="cpu" if cpu_offload else device)  # this rank's shards only
    with torch.no_grad():
        for name, p in model.named_parameters():
            f, hf_name, _ = sources[name]
            a, b = _rows_of_shard(p.shape[0])
            local = p.to_local()
            assert local.shape[0] == b - a, f"{name}: FSDP holds {local.shape[0]} rows here, torch.chunk {b - a}"
            with safe_open(f, framework="pt", device="cpu") as sf:
                local.copy_(sf.get_slice(hf_name)[a:b])
    return model.eval()


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _rows_of_shard(n: int) -> tuple[int, int]:
    """Rows [a, b) of a dim-0 length n that this rank holds under torch.chunk(n, K) (FSDP2's Shard(0)): chunks
    of ceil(n / K) rows, the last ones shorter or empty."""
    c = -(-n // world())
    a = min(n, rank() * c)
    return a, min(n, a + c)


def full_state(model) -> dict[str, torch.Tensor]:
    """The whole model's state dict gathered on rank 0, on the CPU, tensor by tensor (other ranks get {}). Every
    rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_full(model, out_dir, tokenizer=None):
    """A sharded model saved as one full Hugging Face checkpoint (checkpoint.save_model's files, atomic), written
    by rank 0; every rank returns once it is on disk. One process: save_model."""
    from minisirev.checkpoint import save_model

    if not active():
        return save_model(model, out_dir, tokenizer)
    state = full_state(model)
    on_main(save_model, model, out_dir, tokenizer, state=state)
    return Path(out_dir)
