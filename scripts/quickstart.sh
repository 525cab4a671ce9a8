#!/usr/bin/env bash
# The whole pipeline on scikit-learn's handwritten digits, on two CPU processes, in about ten minutes:
# digits -> tokenizer -> code store -> GPT (accelerate, 2 ranks) -> CFG samples -> grid + accuracy + PSNR.
#
#   bash scripts/quickstart.sh            # results: runs/quickstart/summary.json and runs/quickstart/grid.png
#   QUICKSTART_TOKENIZER=open_magvit2 bash scripts/quickstart.sh   # another family: runs/quickstart-open_magvit2/
#
# Rerunning resumes every stage from what is on disk; `rm -rf runs/quickstart` starts over.
# Environment: QUICKSTART_TOKENIZER (mgvq | llamagen_vq | ibq | open_magvit2 | mergevq, default mgvq), QUICKSTART_OUT
# (default runs/quickstart, runs/quickstart-<family> for the others), QUICKSTART_PORT (torch.distributed port, default 29731).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
FAMILY=${QUICKSTART_TOKENIZER:-mgvq}
# Per family: the tokenizer preset, its training overrides (the family's recipe otherwise: tokenizer/recipes.py;
# LPIPS needs weight files, and the GAN and SEED-Voken's EMA 0.999 more than these 600 steps: all three off here)
# and the GPT's head and input.
NO_PERCEPTUAL_GAN=(loss.perceptual_weight=0 loss.disc_weight=0 ema=0)
FULL_K=()  # MergeVQ: the tokenizer setting of extraction and PSNR (all tokens, no merging)
case "$FAMILY" in
    mgvq) PRESET=digits; TOKENIZER_ARGS=(); GPT_ARGS=(); HEAD="AR head over the 4 groups" ;;
    llamagen_vq) PRESET=llamagen-vq-digits; TOKENIZER_ARGS=("${NO_PERCEPTUAL_GAN[@]}")
        GPT_ARGS=(model.head=parallel model.input_embedding=learned); HEAD="one 1024-code book" ;;
    ibq) PRESET=ibq-digits  # 600 steps at lr 1e-3 gave 21.9 dB held-out
        # its quantization loss (1.0 in the recipe) outweighs the L1 for these few steps: at 0.25, 24.4 dB, not 23.7
        TOKENIZER_ARGS=("${NO_PERCEPTUAL_GAN[@]}" max_steps=1000 lr=3e-3 lr_schedule=cosine loss.codebook_weight=0.25)
        GPT_ARGS=(model.head=parallel model.input_embedding=learned); HEAD="one 1024-code book" ;;
    open_magvit2) PRESET=open-magvit2-digits  # 1000 steps, cosine: 600 gave 24.0 dB held-out
        TOKENIZER_ARGS=("${NO_PERCEPTUAL_GAN[@]}" max_steps=1000 lr_schedule=cosine)  # the factorized head, as
        GPT_ARGS=(model.head=factorized model.input_embedding=learned); HEAD="factorized head, 2 x 512 sub-tokens" ;;
    mergevq) PRESET=mergevq-digits  # no DINOv2 teacher here: no distillation; codes of all 16 tokens, as MergeVQ's
        TOKENIZER_ARGS=("${NO_PERCEPTUAL_GAN[@]}" loss.distill_weight=0)  # stage 2 (merge_num 0); PSNR at K = 9 too
        FULL_K=(tokenizer.config.merge_num=0)
        GPT_ARGS=(model.head=factorized model.input_embedding=learned); HEAD="factorized head, 2 x 256 sub-tokens" ;;
    *) echo "QUICKSTART_TOKENIZER=$FAMILY: expected mgvq, llamagen_vq, ibq, open_magvit2 or mergevq" >&2; exit 2 ;;
esac
DEFAULT_OUT=runs/quickstart
[ "$FAMILY" = mgvq ] || DEFAULT_OUT=runs/quickstart-$FAMILY
OUT=${QUICKSTART_OUT:-$DEFAULT_OUT}

# The same set-up as scripts/test.sh: .venv from requirements.lock.
source scripts/_env.sh
setup_env .venv locked

# One thread per process: two processes fill the two cores, and more threads only fight over them.
export OMP_NUM_THREADS=1 ACCELERATE_USE_CPU=true HYDRA_FULL_ERROR=1
# Two gloo ranks on the CPU (--cpu would silently start one, see DESIGN.md 7).
LAUNCH=("$PY" -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
        --dynamo_backend no --main_process_port "${QUICKSTART_PORT:-29731}")
TOKENIZER="$OUT/tokenizer/export/tokenizer.pt"
stage() { printf '\n== %s (%ds so far)\n' "$1" "$(($(date +%s) - START))"; }

stage "1/7 digits: 1,797 images of 8x8 -> 16x16 PNGs, 20% held out"
"$PY" scripts/make_digits.py --out "$OUT/digits" --size 16

stage "2/7 tokenizer: $FAMILY ($PRESET), 4x4 grid (2 processes)"
"${LAUNCH[@]}" scripts/train_tokenizer.py +experiment=digits tokenizer="$PRESET" "${TOKENIZER_ARGS[@]}" \
    data.root="$OUT/digits/train" out_dir="$OUT/tokenizer"

stage "3/7 codes: the training digits -> code store"
"$PY" scripts/extract_codes.py tokenizer="$PRESET" "${FULL_K[@]}" tokenizer.checkpoint="$TOKENIZER" \
    data.root="$OUT/digits/train" data.image_size=16 data.views=plain out_dir="$OUT/codes" batch_size=256 num_workers=0

stage "4/7 GPT: class-conditional, $HEAD (2 processes)"
"${LAUNCH[@]}" scripts/train_gpt.py model=digits data.codes_dir="$OUT/codes" data.augment=false data.num_workers=0 \
    tokenizer.checkpoint="$TOKENIZER" tokenizer.family="$FAMILY" "${GPT_ARGS[@]}" out_dir="$OUT/gpt" max_steps=1500 \
    epochs=null global_batch_size=64 lr=1e-3 \
    warmup_steps=100 lr_schedule=cosine weight_decay=0.05 precision=fp32 log_every=100 ckpt_every=500

stage "5/7 samples: 500 images (50 per class) with classifier-free guidance 1.5 (2 processes)"
"${LAUNCH[@]}" scripts/sample_c2i_ddp.py tokenizer="$PRESET" tokenizer.checkpoint="$TOKENIZER" \
    gpt_ckpt="$OUT/gpt/export/model.pt" sampler.cfg_scale=1.5 num_samples=500 batch_size=50 out_dir="$OUT/samples"

stage "6/7 tokenizer PSNR on the held-out digits"
"$PY" scripts/eval_recon.py tokenizer="$PRESET" "${FULL_K[@]}" tokenizer.checkpoint="$TOKENIZER" \
    data.root="$OUT/digits/val" data.image_size=16 batch_size=128 num_workers=0 out="$OUT/recon.json"
MERGED=()
if [ "$FAMILY" = mergevq ]; then  # and at the preset's K (merge_num 7: 9 of the 16 tokens)
    "$PY" scripts/eval_recon.py tokenizer="$PRESET" tokenizer.checkpoint="$TOKENIZER" data.root="$OUT/digits/val" \
        data.image_size=16 batch_size=128 num_workers=0 out="$OUT/recon_merged.json"
    MERGED=(--recon-merged "$OUT/recon_merged.json")
fi

stage "7/7 evaluation: sample grid, conditional accuracy"
"$PY" scripts/quickstart_eval.py --digits "$OUT/digits" --samples "$OUT/samples/samples.npz" \
    --recon "$OUT/recon.json" "${MERGED[@]}" --out "$OUT" --start "$START"
