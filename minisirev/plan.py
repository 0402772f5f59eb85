"""What a run needs per GPU, before anything loads: `python train.py --plan 8` (docs/distributed.md).

    estimate(config, ranks=K, rows=R, seq_len=T, ...) -> Plan       bytes per rank, by component
    check(prog, args, inputs, tok, device, world)                   train.py's --plan, and the refusal of a run
                                                                    that cannot fit

Symbols: P parameters (P_root: embedding, final norm, output head; P_block: one block), K ranks, L layers, C model
dim, H heads, KVH kv heads, D head dim, F feed-forward dim, V vocab, N = R * T tokens per rank per micro-batch,
b bytes per element of the compute dtype (2 for bf16), m of the master weights (4 for fp32).

Training, per rank (FSDP2, K >= 1 under torchrun):
    parameters, gradients     m * P / K each (sharded fp32 master weights and their reduced gradients)
    AdamW state               2 m * P / K (exp_avg, exp_avg_sq)
    with --cpu-offload those three live in CPU memory (host column) and not on the GPU
    unsharded, in flight      2 b * P_root (the root's parameters and gradients, held through a step)
                              + max(2 b * P_block + (b + 4) * P_block, 4 * P_root): two blocks gathered (the
                              current and the prefetched one) and one block's gradients with their fp32
                              reduce-scatter buffer; or, at the end of backward, the root's fp32 reduce input
    one process (no torchrun) instead holds the whole model: m * P parameters + m * P gradients + 2 m * P AdamW,
                              + 2 * P for autocast's bf16 copies of the weights on CUDA
    activations               N * (L * A + A_out) without checkpointing; N * (L * b * C + A + A_out) with it
                              (each block keeps only its input; one block is recomputed at a time)
    A, saved for backward per token and block (model.py's ops, flash-style attention):
        RMSNorm x 2           4 C (the fp32 input) + b C (normalised) + b C (the weighted output, saved by the
                              next linear) each
        attention             b (H D + 2 KVH D) (rotated q, k and v) + b H D (output) + 4 H (row logsumexp),
                              + b H D with the Triton kernel: its [B, H, T, D] output is copied into o_proj's
                              [B, T, H D] input (SDPA's output keeps q's [B, T, H, D] memory order, which RoPE
                              preserves, so o_proj reads it as a view)
        SwiGLU                4 b F (gate output, its silu, up output, their product)
    A_out                     4 C + 2 b C (final norm) + 12 (the token ids, the final norm's fp32 1/rms)
                              + 8 D / rows (the fp32 RoPE factors, [T, D] each, shared by every block and
                              every row)
    loss                      unfused: 12 V per token (bf16 logits, their fp32 copy, log-softmax, its gradient);
                              fused (kernels/dpo_loss.py): one fp32 tile of <= 2^26 logits and its gradient, plus
                              the fp32 dH [N, C] and dW chunk accumulators
Sampling and evaluation, per rank (a full replica, data-parallel):
    weights                   w * P (w: the bytes of --dtype)
    one decode slot           2 L KVH D S w (K and V: its own max_new_tokens keys and at most one prompt slot of
                              the longest prompt, S = longest prompt + max_new_tokens) + 32 V (sampler.row_bytes);
                              the sampler fills 80% of the memory left with slots (more when slots share prompts)

These are estimates of what PyTorch allocates (not the CUDA context, about 0.5-1 GiB, nor fragmentation); a plan
`fits` when its total is at most 90% of the GPU. tests/test_distributed.py checks A against the tensors autograd
really saves; docs/distributed.md lists the check against torch.cuda.max_memory_allocated on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30
HEADROOM = 0.9  # fraction of a GPU's memory a plan may fill (the rest: CUDA context, allocator fragmentation)
FUSED_TILE = 1 << 26  # logits per tile of kernels/dpo_loss.py


def block_params(cfg) -> int:
    attn = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    return attn + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim


def root_params(cfg) -> int:
    return cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2) + cfg.dim


def activation_bytes_per_token(cfg, b: int, attn: str = "triton") -> int:
    """A: bytes autograd keeps per token and block (module docstring), for a flash-style backend."""
    C, D, H, KVH, F = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim
    norms = 2 * (4 * C + 2 * b * C)
    attention = b * (H * D + 2 * KVH * D) + b * H * D + 4 * H + (b * H * D if attn == "triton" else 0)
    return norms + attention + 4 * b * F


def output_activation_bytes_per_token(cfg, b: int, rows: int = 1) -> float:
    return 4 * cfg.dim + 2 * b * cfg.dim + 12 + 8 * cfg.head_dim / rows


@dataclass
class Plan:
    ranks: int
    rows: int  # sequences per rank per micro-batch
    seq_len: int
    params: int
    # training, bytes per GPU
    weights: int
    grads: int
    optimizer: int
    unsharded: int
    activations: int
    activations_ckpt: int
    loss: int
    grad_checkpoint: bool
    host: int  # bytes per rank in CPU memory (with --cpu-offload)
    # sampling, bytes per GPU
    replica: int
    slot: int
    cache_len: int

    @property
    def train_total(self) -> int:
        act = self.activations_ckpt if self.grad_checkpoint else self.activations
        return self.weights + self.grads + self.optimizer + self.unsharded + act + self.loss

    def slots(self, gpu_bytes: float) -> int:
        """Decode slots the sampler's budget (80% of what the replica leaves) holds."""
        return max(0, int(0.8 * (gpu_bytes - self.replica) // self.slot))

    def fits(self, gpu_bytes: float) -> bool:
        return self.train_total <= HEADROOM * gpu_bytes and self.slots(HEADROOM * gpu_bytes) >= 1

    def table(self, gpu_bytes: float, header: str = "") -> str:
        def row(label: str, value) -> str:
            v = f"{value / GiB:10.2f}" if isinstance(value, int | float) and not isinstance(value, bool) else value
            return f"  {label:<60}{v}"

        fits = self.train_total <= HEADROOM * gpu_bytes
        n = self.slots(HEADROOM * gpu_bytes)
        lines = [header] if header else []
        lines += [f"training, per GPU: {self.rows} sequence(s) x {self.seq_len} tokens per rank per micro-batch"
                  f"{'':>8}GiB",
                  row("parameters", self.weights), row("gradients", self.grads), row("AdamW state", self.optimizer),
                  row("unsharded parameters and gradients in flight", self.unsharded),
                  row("activations without checkpointing", self.activations),
                  row("activations with checkpointing (--grad-checkpoint)", self.activations_ckpt),
                  row("loss (logits)", self.loss),
                  row(f"total (checkpointing {'on' if self.grad_checkpoint else 'off'})", self.train_total)
                  + f"  of {gpu_bytes / GiB:.1f}: {'fits' if fits else 'DOES NOT FIT'}"]
        if self.host:
            lines.append(row("in CPU memory per rank (--cpu-offload)", self.host))
        lines += ["sampling and evaluation, per GPU (a full replica on every rank)",
                  row("model replica", self.replica),
                  row(f"one decode slot (KV cache of {self.cache_len} tokens, sampler work)", self.slot),
                  row("decode slots the sampler can hold", f"{n:10d}") + ("" if n else "  DOES NOT FIT")]
        return "\n".join(lines)


def estimate(cfg, *, ranks: int, rows: int, seq_len: int, cache_len: int, sharded: bool, bf16: bool,
             master_bytes: int, grad_checkpoint: bool, cpu_offload: bool, fused: bool, attn: str = "triton"
             ) -> Plan:
    """Per-rank bytes of a run (formulas in the module docstring). rows: sequences per rank per micro-batch
    (chosen and rejected counted apart); seq_len: the longest training sequence; cache_len: the sampler's
    longest prompt + max_new_tokens; sharded: FSDP2 under torchrun (else one process holds everything)."""
    P, Pb, Pr = cfg_params(cfg), block_params(cfg), root_params(cfg)
    m = master_bytes
    b = 2 if bf16 else m
    N = rows * seq_len
    if sharded:
        shard = -(-P // ranks)
        weights, grads, optimizer = m * shard, m * shard, 2 * m * shard
        unsharded = 2 * b * Pr + max(2 * b * Pb + (b + 4) * Pb, 4 * Pr)
    else:
        weights, grads, optimizer = m * P, m * P, 2 * m * P
        unsharded = 2 * P if bf16 else 0  # autocast's bf16 weight copies
    host = 0
    if cpu_offload and sharded:
        host, weights, grads, optimizer = weights + grads + optimizer, 0, 0, 0
    A, A_out = activation_bytes_per_token(cfg, b, attn), output_activation_bytes_per_token(cfg, b, rows)
    activations = int(N * (cfg.n_layers * A + A_out))
    activations_ckpt = int(N * (cfg.n_layers * b * cfg.dim + A + A_out))
    if fused:
        v_c = max(1, FUSED_TILE // min(N, 8192))
        loss = 2 * 4 * min(N * cfg.vocab_size, FUSED_TILE) + 4 * N * cfg.dim + 4 * min(v_c, cfg.vocab_size) * cfg.dim
    else:
        loss = 12 * N * cfg.vocab_size
    replica = m * P
    slot = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cache_len * m + 32 * cfg.vocab_size
    return Plan(ranks=ranks, rows=rows, seq_len=seq_len, params=P, weights=weights, grads=grads, optimizer=optimizer,
                unsharded=unsharded, activations=activations, activations_ckpt=activations_ckpt, loss=loss,
                grad_checkpoint=grad_checkpoint, host=host, replica=replica, slot=slot, cache_len=cache_len)


def cfg_params(cfg) -> int:
    return cfg.n_layers * block_params(cfg) + root_params(cfg)


# ---- train.py's --plan and the refusal of a run that cannot fit ----------------------------------------------


def check(prog: str, args, inputs, tok, device, world: int) -> None:
    """--plan RANKS: print the plan, exit 0 when it fits and 1 when it does not. A run on CUDA (or any run given
    --gpu-memory) whose plan does not fit: refused in one line (exit 2) with what would make it fit, before any
    weight loads. A CPU run without either: nothing to check."""
    import torch

    from minisirev import cli
    from minisirev import distributed as dist
    from minisirev.checkpoint import resolve
    from minisirev.config import ModelConfig

    if args.plan is None and device.type != "cuda" and args.gpu_memory is None:
        return
    ranks = args.plan or world
    cfg = ModelConfig.load(resolve(args.model, patterns=["*.json"]) / "config.json")
    prompts = [len(tok.encode_prompt(inputs.task.prompt(ex))) for ex in inputs.train + inputs.test]
    prompts += [len(tok.encode_prompt(inputs.ood_task.prompt(ex))) for ex in inputs.ood]
    gold = max(len(tok.encode(inputs.task.reference(ex))) for ex in inputs.train)
    seq_len = max(prompts) + max(gold, args.max_new_tokens) + 1  # + EOS
    per_micro = 2 * args.batch_size if args.method != "sft" else args.batch_size  # DPO: chosen + rejected
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype or "float32"]
    cuda = device.type == "cuda" or args.plan is not None  # a plan is for GPUs
    sharded = ranks > 1 or dist.active()  # torchrun with one rank still trains under FSDP2 (CPU offload)
    fused = args.fused_loss == "on" or (args.fused_loss == "auto" and cuda)
    p = estimate(cfg, ranks=ranks, rows=-(-per_micro // ranks) if sharded else per_micro, seq_len=seq_len,
                 cache_len=max(prompts) + args.max_new_tokens, sharded=sharded, bf16=cuda and dtype_bytes == 4,
                 master_bytes=dtype_bytes, grad_checkpoint=args.grad_checkpoint,
                 cpu_offload=args.cpu_offload and sharded, fused=fused,
                 attn=args.attn or ("triton" if cuda else "sdpa"))
    if args.gpu_memory:
        gpu = args.gpu_memory * GiB
    elif device.type == "cuda":
        gpu = torch.cuda.get_device_properties(device).total_memory
    else:
        gpu = 80 * GiB
    if args.plan is not None:
        header = (f"plan for {args.model}: {p.params / 1e9:.2f} B parameters (L={cfg.n_layers}, C={cfg.dim}, "
                  f"V={cfg.vocab_size}), {args.method}, --batch-size {args.batch_size} over {ranks} rank(s), "
                  f"{'bf16 compute, ' if cuda and dtype_bytes == 4 else ''}{args.dtype or 'float32'} master weights, "
                  f"fused loss {'on' if fused else 'off'}")
        print(p.table(gpu, header))
        raise SystemExit(0 if p.fits(gpu) else 1)
    if not p.fits(gpu):
        hints = []
        if not args.grad_checkpoint:
            hints.append("--grad-checkpoint")
        if sharded and not args.cpu_offload:
            hints.append("--cpu-offload")
        hints += ["more GPUs (torchrun --nproc-per-node / --nnodes)", "a smaller --batch-size"]
        what = (f"training needs {p.train_total / GiB:.1f} GiB per GPU" if p.train_total > HEADROOM * gpu else
                f"sampling needs {(p.replica + p.slot) / GiB:.1f} GiB per GPU for one slot")
        cli.fail(prog, f"this run does not fit: {what}, this GPU has {gpu / GiB:.0f} GiB (a plan may use "
                 f"{HEADROOM:.0%}); try {', '.join(hints)} (python train.py ... --plan {ranks} prints the plan)")


def note_world_change(old: dict | None, new: dict) -> None:
    """A run resumed under another world size continues: finished stages are full checkpoints and files, and K
    ranks compute what one process computes up to the order of float sums. Say so, once, on the console."""
    if old and old.get("world_size", 1) != new["world_size"]:
        print(f"resuming a run made with {old.get('world_size', 1)} rank(s) with {new['world_size']}: finished "
              "stages are kept; the rest is computed as one process would, up to the order of float sums")
