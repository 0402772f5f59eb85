#!/usr/bin/env bash
# Every GPU check of the kit in one call: the kernel and model tests natively on CUDA, the default run, and the
# benchmarks (attention, fused DPO loss, sampler, training throughput). Each step runs under its own time limit,
# logs to LOGDIR/<step>.log and appends one line (exit code, seconds) to LOGDIR/summary.txt; the result files the
# benchmarks write under bench/results/ are copied to LOGDIR/results/ after every step, and with --tar FILE the
# whole LOGDIR is packed into FILE after every step too (so a call cut short still returns what finished).
#
#   bench/gpu_suite.sh                          # every step, logs in bench/results/gpu_suite/
#   bench/gpu_suite.sh --logs /tmp/l tests dpo  # some steps
#   bench/gpu_suite.sh --list                   # the steps, their time limits and commands
#
# Needs a CUDA GPU, torch and triton (any recent pair: the kit runs on torch 2.11 / triton 3.6 as on 2.13 / 3.9),
# pytest (pytest-xdist, when present, spreads the tests' compilation over the cores), transformers < 5.25 for the
# model and sampler comparisons, liger-kernel for its DPO columns, math-verify for the default run's verifier.
# Without the repo installed, the repo root is put on PYTHONPATH.
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
LOGDIR="$ROOT/bench/results/gpu_suite"
TAR=""
PY=${PYTHON:-python3}

# name | seconds | command (run with bash -c from the repo root)
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 12" || echo "")
STEPS=(
  "env|30|nvidia-smi; $PY -c 'import torch, triton, sys; print(sys.version); print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), torch.version.cuda)'; $PY -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|liger|math|pytest)'"
  "tests|200|$PY -m pytest -p no:cacheprovider -q $XDIST --timeout 180 -rfE tests/test_attention.py tests/test_dpo_kernel.py tests/test_model.py tests/test_losses.py tests/test_sampler.py"
  "default-run|150|rm -rf /tmp/gpu_suite_run; TIMEFORMAT='default run: %R s wall'; time $PY train.py --iter 3 --method sft-dpo --out /tmp/gpu_suite_run"
  "training|150|$PY bench/training.py"
  "dpo|120|$PY bench/dpo_loss.py --tokens 4096 8192 16384 32768 --min-runs 5 --min-seconds 0.3"
  "attention|240|$PY bench/attention.py --sweeps seqlen seqlen-gqa4 headdim --modes fwd bwd --providers ours sdpa-flash sdpa-cudnn naive --min-runs 5 --min-seconds 0.25"
  "sampler|240|$PY bench/sampler.py --config llama-1b --dtype bfloat16 --device cuda --n 8 --max-new-tokens 256 --repeats 2"
  "all-tests|300|$PY -m pytest -p no:cacheprovider -q $XDIST --timeout 280 -rfE"
)

usage() { sed -n 2,15p "$0" | sed 's/^# \{0,1\}//'; }
SELECTED=()
while [ $# -gt 0 ]; do
  case "$1" in
    --logs|--tar)
      [ $# -ge 2 ] || { echo "gpu_suite.sh: $1 needs a path (see --help)" >&2; exit 2; }
      if [ "$1" = --logs ]; then LOGDIR="$2"; else TAR="$2"; fi
      shift 2 ;;
    --list) for s in "${STEPS[@]}"; do IFS='|' read -r n t c <<<"$s"; printf '%-12s %4ss  %s\n' "$n" "$t" "$c"; done; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_suite.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
    *) SELECTED+=("$1"); shift ;;
  esac
done
for want in "${SELECTED[@]+"${SELECTED[@]}"}"; do
  found=0
  for s in "${STEPS[@]}"; do [ "${s%%|*}" = "$want" ] && found=1; done
  [ $found = 1 ] || { echo "gpu_suite.sh: unknown step '$want' (see --list)" >&2; exit 2; }
done
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_suite.sh: no CUDA GPU visible to $PY; nothing run" >&2
  exit 1
fi

mkdir -p "$LOGDIR/results"
STAMP="$LOGDIR/.start"
touch "$STAMP"
echo "# gpu_suite $(date -u '+%Y-%m-%d %H:%M UTC') $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)" >>"$LOGDIR/summary.txt"
for s in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$s"
  if [ ${#SELECTED[@]} -gt 0 ] && [[ ! " ${SELECTED[*]} " =~ " $name " ]]; then continue; fi
  [ ${#SELECTED[@]} -eq 0 ] && [ "$name" = all-tests ] && continue  # the whole suite only when asked for
  echo "== $name (limit ${limit}s): $cmd"
  t0=$(date +%s)
  timeout -k 10 "$limit" bash -c "$cmd" >"$LOGDIR/$name.log" 2>&1
  rc=$?
  line="$name rc=$rc $(( $(date +%s) - t0 ))s$([ $rc = 124 ] && echo ' (time limit)')"
  echo "$line" | tee -a "$LOGDIR/summary.txt"
  tail -n 3 "$LOGDIR/$name.log" | sed 's/^/   | /'
  find bench/results -maxdepth 1 -type f -newer "$STAMP" -exec cp {} "$LOGDIR/results/" \;
  [ -n "$TAR" ] && tar czf "$TAR" -C "$LOGDIR" . 2>/dev/null
done
exit 0
