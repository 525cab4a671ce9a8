#!/usr/bin/env bash
# The one command a machine with CUDA GPUs runs to check every CUDA-only path, with a short throughput report:
#   1. the `gpu`-marked tests (flash SDPA under bf16, fused AdamW, compiled sampling with CUDA graphs, bf16 extraction)
#   2. GPT-B training steps: bf16 autocast + fused AdamW + flash SDPA only, eager and compiled: tokens/s and MFU
#   3. compiled sampling (CUDA graphs) of GPT-B in bf16 with MGVQ decoding: images/s
#   4. bf16 extraction (MGVQ-f16c32-G4 encoder at 256px): images/s
#   5. FSDP (conf/accelerate/fsdp.yaml) on every GPU present: GPT-B, bf16, EMA, 20 steps on a synthetic store,
#      a sharded checkpoint, and the export loaded back with gpt.load_gpt
#   zoo (optional, with ZOO_CKPT_DIR): 1,000 samples of a released model (sampling.zoo) and their gFID-1k
# Usage: bash scripts/gpu_check.sh [report file, default gpu_check_report.txt]. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
REPORT=${1:-gpu_check_report.txt}

if ! nvidia-smi -L >/dev/null 2>&1 \
        || ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU is visible to torch on $(hostname) (torch.cuda.is_available() is False):" \
         "nothing to check here. Run this on a machine with CUDA GPUs." >&2
    exit 1
fi
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
step() { echo; echo "== $*"; }

{
    echo "gpu_check $(date -u +%Y-%m-%dT%H:%MZ) on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    "$PY" -c "import torch, accelerate; print(f'torch {torch.__version__}, accelerate {accelerate.__version__}, ' \
f'CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}')"
} | tee "$REPORT"

step "gpu-marked tests"
set +e
"$PY" -m pytest -q -m gpu tests/test_gpu.py > "$WORK/tests.txt" 2>&1
TESTS_RC=$?
set -e
tail -n 15 "$WORK/tests.txt"

step "GPT-B training, bf16 + fused AdamW + flash SDPA (eager, then compiled)"
"$PY" scripts/bench.py train --preset gpt_b --batch-size 32 --precision bf16 --attention flash --head ar \
    | tee "$WORK/train.txt"
"$PY" scripts/bench.py train --preset gpt_b --batch-size 32 --precision bf16 --attention flash --head ar --compile \
    | tee -a "$WORK/train.txt"

step "GPT-B sampling, bf16, decode step compiled with CUDA graphs, with MGVQ decoding"
"$PY" scripts/bench.py sample --preset gpt_b --batch-size 64 --cfg-scale 2.0 --precision bf16 --compile --steps 2 \
    | tee "$WORK/sample.txt"

step "bf16 extraction, MGVQ-f16c32-G4 at 256px"
"$PY" scripts/bench.py extract --preset mgvq-f16c32-g4 --image-size 256 --batch-size 64 --precision bf16 --steps 10 \
    | tee "$WORK/extract.txt"

step "FSDP on $NGPU GPU(s): GPT-B, bf16, EMA, sharded checkpoint, export"
if [ "$NGPU" -lt 2 ]; then
    echo "FSDP needs 2 or more GPUs (accelerate runs 1 process without sharding): skipped, $NGPU present" \
        | tee "$WORK/fsdp.txt"
else
    "$PY" scripts/bench.py store --out "$WORK/codes" --images 4096 --views 2 >/dev/null
    "$PY" -m accelerate.commands.launch --config_file conf/accelerate/fsdp.yaml --num_processes "$NGPU" \
        --main_process_port 0 scripts/train_gpt.py data.codes_dir="$WORK/codes" tokenizer.checkpoint=null \
        model=gpt_b model.input_embedding=learned out_dir="$WORK/fsdp" max_steps=20 \
        global_batch_size=$((32 * NGPU)) log_every=10 ckpt_every=10 ema=0.999 precision=bf16 2>&1 | tail -n 5
    "$PY" - "$WORK/fsdp" "$NGPU" <<'EOF' | tee "$WORK/fsdp.txt"
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
fi

# Optional zoo step: ZOO_CKPT_DIR=<folder with a released model's official files> ZOO_REFERENCE=<ADM
# VIRTUAL_imagenet256_labeled.npz> (Inception weights: $MGVQ_INCEPTION_WEIGHTS) [ZOO=<name>, default: the first model
# whose files are there]. Its gFID on 1,000 samples is biased upwards: it is not the published 50k number.
if [ -n "${ZOO_CKPT_DIR:-}" ]; then
    ZOO_NAME=${ZOO:-$("$PY" -c "import sys; from sampling import zoo; print(*zoo.available(sys.argv[1])[:1])" \
        "$ZOO_CKPT_DIR")}
    [ -n "$ZOO_NAME" ] || { echo "zoo: the files of no released model are in $ZOO_CKPT_DIR" >&2; exit 1; }
    step "zoo: 1,000 samples of $ZOO_NAME, gFID-1k beside the published gFID-50k"
    "$PY" -m accelerate.commands.launch --num_processes "$NGPU" --main_process_port 0 scripts/sample_c2i_ddp.py \
        zoo="$ZOO_NAME" ckpt_dir="$ZOO_CKPT_DIR" out_dir="$WORK/zoo" num_samples=1000 2>&1 | tail -n 2
    "$PY" scripts/evaluate.py samples="$WORK/zoo/samples.npz" reference="${ZOO_REFERENCE:?set ZOO_REFERENCE}" \
        progress=false | tail -n 9
    "$PY" - "$WORK/zoo/samples.metrics.json" <<'EOF' | tee -a "$REPORT"
import json, sys
r = json.load(open(sys.argv[1]))
m, p = r["metrics"], r["published"]
print(f"zoo {r['sampling']['zoo']['name']}: gFID-1k {m['fid']:.2f}, IS-1k {m['inception_score']:.1f} on 1,000 samples; "
      f"published on 50,000 (not comparable): gFID {p['fid']}, IS {p['inception_score']}")
EOF
fi

step "report"
{
    grep -E "passed|failed|error" "$WORK/tests.txt" | tail -n 1 | sed 's/^/tests: /'
    sed 's/^/training: /' "$WORK/train.txt"
    grep -E "images/s" "$WORK/sample.txt" | sed 's/^/sampling: /'
    sed 's/^/extraction: /' "$WORK/extract.txt" | grep -v "peak memory"
    sed 's/^/fsdp: /' "$WORK/fsdp.txt"
} | tee -a "$REPORT"
echo "report written to $REPORT"
exit "$TESTS_RC"
