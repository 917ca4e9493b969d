#!/usr/bin/env bash
# The GPU measurement in one command of at most 8 minutes, on any machine with one NVIDIA GPU of 80 GB or more, online
# or not. No weights are downloaded: every run trains random weights of gpt-oss-20b's real shapes.
#
#   bash bench/stage_offline.sh                    # here, online: the missing wheels and the model's small files
#   OUT=results bash bench/device_run.sh           # there: installs the staged wheels, then runs the table
#
# With .offline/ staged, its wheels are installed with pip --no-index --no-deps --target (nothing else on the machine
# changes) and the model's config and tokenizer are read from it; without it, the installed packages and MODEL (default
# ../shared/gpt-oss-20b) are used. BUDGET seconds (default 450, for a job limit of 480) bound the whole command: runs go
# most important first, each within its own cap and what is left, and each lands in $OUT the moment it ends, so a
# job killed at its limit still returns every finished run. $OUT gets at most 6 files: machine.txt (written first),
# results.jsonl (a row per run), results.md (the table, rewritten after each run), logs.txt (each run's last lines),
# check_attention.txt, mask_bench.txt. One process per run: a run that runs out of memory or crashes takes nothing
# after it down, and each starts with an empty GPU.
#
# Without a GPU (or DRY=1): the same command on the demo's tiny model (3 steps of 2 rows of 512 tokens per run, no
# run's own cap) to check the command itself on a CPU; tests/test_bench.py runs it. Its numbers mean nothing.
set -u
cd "$(dirname "$0")/.."
start=$(date +%s)
OUT=${OUT:-device_results} BUDGET=${BUDGET:-450} STAGED=${STAGED:-.offline} WORK=${WORK:-/tmp/device_run} DRY=${DRY:-0}
mkdir -p "$OUT" "$WORK"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python3} RUN_DIR=$WORK/runs TORCH_LOGS=recompiles
left() { echo $(( BUDGET - ($(date +%s) - start) )); }

{ echo "started $(date -u '+%F %T') UTC, budget $BUDGET s"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no NVIDIA GPU"
  echo "$(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB RAM, $($PYTHON --version 2>&1)"
} > "$OUT/machine.txt"

MODEL=${1:-../shared/gpt-oss-20b}
if [ -d "$STAGED/wheels" ]; then
  rm -rf "$WORK/site" && $PYTHON -m pip install -q --no-index --no-deps --target "$WORK/site" "$STAGED"/wheels/*.whl \
    >> "$OUT/logs.txt" 2>&1 || { echo "installing the staged wheels failed" | tee -a "$OUT/machine.txt"; exit 1; }
  export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
  echo "installed $(ls "$STAGED/wheels" | wc -l) staged wheels into $WORK/site in $(( $(date +%s) - start )) s" >> "$OUT/machine.txt"
fi
if [ -f "$STAGED/gpt-oss-20b/tokenizer.json.gz" ]; then
  MODEL=$WORK/gpt-oss-20b && mkdir -p "$MODEL" && cp "$STAGED"/gpt-oss-20b/* "$MODEL"/ && gunzip -f "$MODEL/tokenizer.json.gz"
fi
$PYTHON -c "import importlib, torch; print('versions:', {m: importlib.import_module(m).__version__ for m in
  ('torch', 'transformers', 'trl', 'peft', 'datasets', 'accelerate', 'huggingface_hub', 'tokenizers')},
  'cuda', torch.version.cuda)" >> "$OUT/machine.txt" 2>&1 || { echo "the libraries do not import" >> "$OUT/machine.txt"; exit 1; }

if [ "$DRY" = 1 ] || ! $PYTHON -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  DRY=1
  MODEL=$($PYTHON -c "import gpt_oss_20b_sft as s; print(s.build_demo_model())" 2>> "$OUT/logs.txt" | tail -1) || exit 1
  export EXTRA_FLAGS="--max_seq_length 512 --batch_size 2 --gradient_accumulation_steps 1 --synthetic-data 16" \
    GRPO_EXTRA_FLAGS="--num_generations 2 --batch_size 2 --max_completion_length 16 --synthetic-data 16"
  echo "DRY run on the CPU with $MODEL: checks the command, measures nothing" >> "$OUT/machine.txt"
fi
echo "model $MODEL" >> "$OUT/machine.txt"

# gpt-oss-120b's shape: 36 layers, 128 experts, 4 per token; the rest as 20b (DRY: 4 layers, 8 experts, to be quick).
BIG=$WORK/gpt-oss-120b-shape LAYERS=36 EXPERTS=128
[ "$DRY" = 1 ] && LAYERS=4 EXPERTS=8
mkdir -p "$BIG" && cp "$MODEL"/*token* "$MODEL"/*.jinja "$BIG"/ 2>/dev/null
$PYTHON -c "import json,sys; c=json.load(open(sys.argv[1]+'/config.json')); n=int(sys.argv[3]); c.update(num_hidden_layers=n, num_local_experts=int(sys.argv[4]), num_experts_per_tok=4, experts_per_token=4, layer_types=['sliding_attention','full_attention']*(n//2)); json.dump(c, open(sys.argv[2]+'/config.json','w'))" "$MODEL" "$BIG" $LAYERS $EXPERTS

# seconds a step may take: its cap (none in a DRY run, which measures nothing), or what is left less 10 s to write
# results; 0 (skip) under 30 s
seconds_for() { local l=$(( $(left) - 10 )); local c=$(( $1 < l && DRY != 1 ? $1 : l )); echo $(( c < 30 ? 0 : c )); }

# one training run: NAME STEPS CAP [MODEL_DIR LABEL]; its row goes into $OUT/results.jsonl, the table is redrawn
run() {
  local cap=$(seconds_for $3) steps=$2
  [ "$DRY" = 1 ] && steps=3
  if [ "$cap" = 0 ]; then echo "== ${5:+$5:}$1: skipped, out of time" >> "$OUT/logs.txt"; return; fi
  LABEL=${5:-} STEPS=$steps RUN_TIMEOUT=$cap RUNS=$1 LOG_DIR=$WORK/logs bash bench/benchmark.sh "${4:-$MODEL}" "$OUT" \
    > "$WORK/$1.out" 2>&1
  { echo "== ${5:+$5:}$1 ($steps steps, cap $cap s, done at $(( $(date +%s) - start )) s)"
    grep -E '^(exit code|\{)' "$WORK/$1.out"
    tr '\r' '\n' < "$WORK/logs/$1.log" | grep -E 'Error|error:|Traceback|it/s\]|s/it\]|recompile limit' | uniq | tail -3
  } >> "$OUT/logs.txt"
}
rm -f "$OUT/results.jsonl"

run ours 5 130                  # the seed recipe, 8 x 2,048 tokens x 2; the first 2 steps (compile, warm-up) untimed
run baseline 4 100              # the Cookbook's way at batch 8 (eager, padded, full logits): the ratio's baseline
grep -q '"run": "baseline".*tokens_per_second' "$OUT/results.jsonl" 2>/dev/null || run baseline_b4 4 90  # batch 4 x 4
run ours_4bit 4 90
run grpo 4 100                  # 8 completions of 256 tokens, then the update; the first step untimed
grep -q '"run": "grpo".*rollout_tokens_per_second' "$OUT/results.jsonl" 2>/dev/null || run grpo_eager 4 80  # flex failed
cap=$(seconds_for 60)           # packed rows against alone: logits, router top-k sets, layer 0's attention
if [ "$cap" = 0 ]; then echo "== check_attention: skipped, out of time" >> "$OUT/logs.txt"
else timeout "$cap" $PYTHON bench/check_attention.py "$MODEL" $([ "$DRY" = 1 ] && echo "--layers 2 --lengths 60,180,140 \
  --timed-lengths 100,100,110,120" || echo "--layers 4") 2>&1 \
  | grep '^{' > "$OUT/check_attention.txt"; fi
run ours_packing 5 90
run ours_checkpoint_every2 4 80
run ours_4bit_b1_ga2 3 100 "$BIG" 120b
run ours_compile 5 120          # --compile: regional compile of the MoE blocks, its warm-up untimed
cap=$(seconds_for 60)           # the packed BlockMask's build, ours against transformers' compiled builder
[ "$cap" != 0 ] && timeout "$cap" $PYTHON bench/mask_bench.py --config "$MODEL" --tokens $([ "$DRY" = 1 ] && echo 2048 || echo 16384) \
  2>&1 | grep '^{' > "$OUT/mask_bench.txt"
echo "done in $(( $(date +%s) - start )) s" | tee -a "$OUT/logs.txt"
cat "$OUT/results.md" 2>/dev/null || echo "no run finished: see $OUT/logs.txt"
