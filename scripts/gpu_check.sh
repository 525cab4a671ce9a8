#!/usr/bin/env bash
# The one command a machine with CUDA GPUs runs to check every CUDA-only path, with a short throughput report.
# It fits a 10-minute GPU window: each step runs under its own time limit, and on one GPU the limits add up to
# 7 min 15 s (--quick: 2 min 45 s; FSDP, on 2 or more GPUs, adds 2.5 min). A step past its limit is stopped,
# reported so, and the check goes on. The limits are estimates (no GPU run yet): tighten them from a report.
#
#   step      limit  what, at the sizes it runs
#   deps       20 s  every dependency installed (scripts/check_deps.py names what is missing and the fix)
#   tests     100 s  the gpu-marked tests: flash SDPA under bf16, fused AdamW, compiled sampling with CUDA graphs,
#                    bf16 extraction, bf16 training steps that never wait for the GPU
#   train     120 s  GPT-B training, batch 32, bf16 + fused AdamW + flash SDPA, eager then compiled: tokens/s, MFU
#   sample    150 s  GPT-B sampling, batch 64, CFG 2, bf16, eager and compiled (CUDA graphs), MGVQ decoding
#   extract    45 s  bf16 extraction, MGVQ-f16c32-G4 encoder at 256px, batch 64, 10 batches: images/s
#   fsdp      150 s  on 2 or more GPUs only: conf/accelerate/fsdp.yaml, GPT-B, bf16, EMA, 20 steps on a synthetic
#                    store, a sharded checkpoint, and the export loaded back with gpt.load_gpt
#   zoo       240 s  optional, with ZOO_CKPT_DIR=<a released model's official files> and ZOO_REFERENCE=<ADM
#                    VIRTUAL_imagenet256_labeled.npz> (Inception weights: $MGVQ_INCEPTION_WEIGHTS; ZOO=<name>, default
#                    the first model whose files are there): 1,000 samples (sampling.zoo) and their gFID-1k, beside
#                    the published gFID-50k (biased upwards: not comparable). With --quick it fits the 10 minutes.
#   --quick runs deps, tests and sample_quick (45 s: the sampling benchmark in bf16, eager only), then zoo if asked.
#
# Usage: bash scripts/gpu_check.sh [--quick] [--dry-run | --plan] [--gpus N] [--report FILE]
#   --dry-run   without CUDA: runs every part of each step that needs no GPU (deps, the tests, which skip there,
#               the FSDP store), in the GPU run's order, sizes and limits; prints each CUDA command instead
#   --plan      only print the steps that would run, with their limits and total
#   --gpus N    the GPUs a dry run or plan is for (default 1)
#   --report    the report file (default runs/gpu_check_<UTC time>.txt), named at the start and at the end
# PYTHON picks the interpreter (default .venv/bin/python, else python3). To add a step, see "Steps" below.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
QUICK=0 DRY=0 PLAN=0 NGPU=1 REPORT=runs/gpu_check_$(date -u +%Y%m%dT%H%M%SZ).txt
while [ $# -gt 0 ]; do
    case $1 in
        --quick) QUICK=1; shift ;;
        --dry-run) DRY=1; shift ;;
        --plan) PLAN=1; DRY=1; shift ;;
        --gpus) NGPU=$2; shift 2 ;;
        --report) REPORT=$2; shift 2 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see the header of scripts/gpu_check.sh)" >&2; exit 2 ;;
    esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's code, whether or not it is installed

if [ "$DRY" = 0 ]; then
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check: no CUDA GPU is visible to torch ($PY) on $(hostname): nothing to check here. Run this on" \
             "a machine with CUDA GPUs, or with --dry-run to run the steps' CPU parts." >&2
        exit 1
    fi
    NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PY WORK NGPU DRY

cuda() {  # a command that needs CUDA: a dry run prints it instead
    if [ "$DRY" = 1 ]; then echo "needs CUDA, not run: $*"; else "$@"; fi
}

step_deps() {
    "$PY" scripts/check_deps.py --wheelhouse wheelhouse
    [ -d ../shared/golden ] || echo "note: ../shared/golden is not beside the checkout: the 2 gpu tests that read" \
                                    "golden vectors will fail"
}

step_tests() {
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
}

step_train() {
    local args=(train --preset gpt_b --batch-size 32 --precision bf16 --attention flash --head ar)
    cuda "$PY" scripts/bench.py "${args[@]}"
    cuda "$PY" scripts/bench.py "${args[@]}" --compile
}

step_sample() {
    cuda "$PY" scripts/bench.py sample --preset gpt_b --batch-size 64 --cfg-scale 2.0 --precision bf16 --compile \
        --steps 2
}

step_sample_quick() {
    cuda "$PY" scripts/bench.py sample --preset gpt_b --batch-size 64 --cfg-scale 2.0 --precision bf16 --steps 1
}

step_extract() {
    cuda "$PY" scripts/bench.py extract --preset mgvq-f16c32-g4 --image-size 256 --batch-size 64 --precision bf16 \
        --steps 10
}

step_fsdp() {
    "$PY" scripts/bench.py store --out "$WORK/codes" --images 4096 --views 2
    cuda "$PY" -m accelerate.commands.launch --config_file conf/accelerate/fsdp.yaml --num_processes "$NGPU" \
        --main_process_port 0 scripts/train_gpt.py data.codes_dir="$WORK/codes" tokenizer.checkpoint=null \
        model=gpt_b model.input_embedding=learned out_dir="$WORK/fsdp" max_steps=20 \
        global_batch_size=$((32 * NGPU)) log_every=10 ckpt_every=10 ema=0.999 precision=bf16
    cuda "$PY" - "$WORK/fsdp" "$NGPU" <<'EOF'
import json, sys
from pathlib import Path

from gpt import load_gpt

run, ngpu = Path(sys.argv[1]), int(sys.argv[2])
log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
shards = list((run / "checkpoints").glob("step_0000020/pytorch_model_fsdp_0/*.distcp"))
model = load_gpt(run / "export" / "model.pt")
assert log[-1]["num_processes"] == ngpu and len(shards) == ngpu, (log[-1], shards)
print(f"FSDP x{ngpu}: loss {log[0]['loss']:.3f} -> {log[-1]['loss']:.3f}, {log[-1]['tokens_per_s']:,.0f} tokens/s, "
      f"{len(shards)} model shard files, EMA export loads ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
      f"parameters)")
EOF
}

step_zoo() {
    local name=${ZOO:-$("$PY" -c "import sys; from sampling import zoo; print(*zoo.available(sys.argv[1])[:1])" \
        "$ZOO_CKPT_DIR")}
    [ -n "$name" ] || { echo "zoo: the files of no released model are in $ZOO_CKPT_DIR" >&2; exit 1; }
    echo "zoo model: $name"
    cuda "$PY" -m accelerate.commands.launch --num_processes "$NGPU" --main_process_port 0 scripts/sample_c2i_ddp.py \
        zoo="$name" ckpt_dir="$ZOO_CKPT_DIR" out_dir="$WORK/zoo" num_samples=1000
    cuda "$PY" scripts/evaluate.py samples="$WORK/zoo/samples.npz" reference="${ZOO_REFERENCE:?set ZOO_REFERENCE}" \
        progress=false
    cuda "$PY" - "$WORK/zoo/samples.metrics.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
m, p = r["metrics"], r["published"]
print(f"zoo {r['sampling']['zoo']['name']}: gFID-1k {m['fid']:.2f}, IS-1k {m['inception_score']:.1f} on 1,000 samples; "
      f"published on 50,000 (not comparable): gFID {p['fid']}, IS {p['inception_score']}")
EOF
}

# Steps, in the order they run: name, time limit (s), title, and an extended regex of the output lines the report
# keeps. Each runs as the function step_<name> above; its commands that need CUDA go through `cuda`.
# To add one: a step_<name> function and an add_step line where it should run (keep the sum of limits < 8 min).
STEPS=()
declare -A LIMIT TITLE KEEP
add_step() { STEPS+=("$1"); LIMIT[$1]=$2; TITLE[$1]=$3; KEEP[$1]=$4; }
add_step deps 20 "every dependency installed" "^dependencies|^note"
add_step tests 100 "gpu-marked tests" "^[0-9]+ (passed|failed|skipped|error)|^(FAILED|ERROR) "
if [ "$QUICK" = 1 ]; then
    add_step sample_quick 45 "GPT-B sampling, bf16, eager, with MGVQ decoding" "images/s|ratio|^needs CUDA"
else
    add_step train 120 "GPT-B training, bf16 + fused AdamW + flash SDPA (eager, then compiled)" \
        "^train |^peak memory|^needs CUDA"
    add_step sample 150 "GPT-B sampling, bf16, decode step compiled with CUDA graphs, with MGVQ decoding" \
        "images/s|ratio|warm-up|^needs CUDA"
    add_step extract 45 "bf16 extraction, MGVQ-f16c32-G4 at 256px" "^extract |^needs CUDA"
    if [ "$NGPU" -ge 2 ]; then
        add_step fsdp 150 "FSDP on $NGPU GPUs: GPT-B, bf16, EMA, sharded checkpoint, export" \
            "^FSDP|^synthetic code store|^needs CUDA"
    fi
fi
if [ -n "${ZOO_CKPT_DIR:-}" ]; then
    add_step zoo 240 "1,000 samples of a released model, gFID-1k beside the published gFID-50k" \
        "^zoo[ :]|^needs CUDA"
fi
export -f cuda $(compgen -A function step_)

TOTAL=0
for name in "${STEPS[@]}"; do TOTAL=$((TOTAL + LIMIT[$name])); done
if [ "$PLAN" = 1 ]; then
    for name in "${STEPS[@]}"; do printf '%-12s %4d s  %s\n' "$name" "${LIMIT[$name]}" "${TITLE[$name]}"; done
    echo "total ${TOTAL} s"
    exit 0
fi
mkdir -p "$(dirname "$REPORT")"
{
    echo "gpu_check $(date -u +%Y-%m-%dT%H:%MZ) on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null ||
          echo '?')$([ "$QUICK" = 0 ] || echo ', --quick')$([ "$DRY" = 0 ] || echo ", --dry-run for $NGPU GPU(s)")"
    "$PY" -c "import sys, torch; print(f'python {sys.version.split()[0]}, torch {torch.__version__}, CUDA \
{torch.version.cuda}, ' + (f'{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}' \
if torch.cuda.is_available() else 'no GPU'))"
    echo "steps: ${STEPS[*]}; their limits add up to ${TOTAL} s"
    [ "$QUICK" = 1 ] || [ "$NGPU" -ge 2 ] || echo "fsdp: not run on 1 GPU (accelerate runs one process, unsharded)"
} | tee "$REPORT"
echo "report: $REPORT"

FAILED=0
for name in "${STEPS[@]}"; do
    echo
    echo "== $name (limit ${LIMIT[$name]} s): ${TITLE[$name]}"
    start=$(date +%s%N)
    set +e
    timeout -k 3 "${LIMIT[$name]}" bash -c "set -euo pipefail; step_$name" 2>&1 | tee "$WORK/$name.txt"
    rc=${PIPESTATUS[0]}
    set -e
    seconds=$(( ($(date +%s%N) - start) / 1000000 ))
    case $rc in
        0) status=ok; [ "$DRY" = 0 ] || ! grep -q "^needs CUDA" "$WORK/$name.txt" || status="planned (needs CUDA)" ;;
        124 | 137) status="STOPPED at its limit" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    [ "$rc" = 0 ] || FAILED=1
    {
        printf '%-12s %-22s %5d.%d s (limit %d s)\n' "$name" "$status" $((seconds / 1000)) $((seconds % 1000 / 100)) \
            "${LIMIT[$name]}"
        kept=$(grep -E "${KEEP[$name]}" "$WORK/$name.txt" || true)
        [ -z "$kept" ] || sed 's/^/    /' <<<"$kept"
        if [ "$rc" != 0 ]; then  # and what it said last
            tail -n 5 "$WORK/$name.txt" | { if [ -z "$kept" ]; then cat; else grep -vxF "$kept"; fi; } \
                | sed 's/^/    | /' || true
        fi
    } >> "$REPORT"
    if [ "$name" = deps ] && [ "$rc" != 0 ]; then
        echo "gpu_check: dependencies missing (above): nothing else can run" | tee -a "$REPORT" >&2
        break
    fi
done

echo
echo "== report"
cat "$REPORT"
echo "report written to $REPORT"
exit "$FAILED"
