#!/usr/bin/env bash
# The whole GPU measurement of the speed work in one command, on any machine with one NVIDIA GPU of 80 GB or more
# (H100, H200, A100 80GB). No weights are downloaded: every run trains random weights of the real shapes.
#
#   pip install -r requirements.txt            # CUDA torch >= 2.8, transformers 5.23, trl 1.16, peft 0.21.2, datasets
#   OUT=device_results bash bench/device_run.sh [MODEL_DIR]
#
# MODEL_DIR: a folder with gpt-oss-20b's config.json and tokenizer files (default ../shared/gpt-oss-20b), or the hub
# id openai/gpt-oss-20b (fetches those small files only). gpt-oss-120b's shape (36 layers, 128 experts) is derived
# from it. About 20 minutes on an H100, most of it model set-up and compile warm-up; BUDGET (seconds, default 1500)
# bounds the whole script, each run gets at most its own cap and what is left, and what did not fit says so.
# Everything lands in $OUT: machine.txt, logs.txt, results_<model>.jsonl and .md (each run's speed.json as a row,
# the table with its ratio to the baseline that fit), check_attention.txt, mask_bench.txt, dequant_bench.txt.
# TORCH_LOGS=recompiles is set, so every table row counts that run's recompiles.
#
# Without a GPU (DRY=1, or none found): the same script on the demo's tiny model (built by `--demo` on first use),
# 3 short steps per run, CPU-only flags dropped, to check the script itself. Its numbers mean nothing.
set -u
cd "$(dirname "$0")/.."
start=$(date +%s)
OUT=${OUT:-device_results}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0} PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python3} RUN_DIR=${RUN_DIR:-/tmp/device_runs}
export TORCH_LOGS=recompiles
MODEL=${1:-../shared/gpt-oss-20b}
if [ "${DRY:-0}" = 1 ] || ! $PYTHON -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  DRY=1
  MODEL=$($PYTHON -c "import gpt_oss_20b_sft as s; print(s.build_demo_model())" | tail -1) || exit 1
  export EXTRA_FLAGS="--max_seq_length 256 --batch_size 2 --gradient_accumulation_steps 2"
  echo "DRY run on the CPU with $MODEL: checks the script, measures nothing" | tee "$OUT/logs.txt"
fi
{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no NVIDIA GPU"
  $PYTHON -c "import torch,transformers,trl,peft,datasets,accelerate;print({m.__name__:m.__version__ for m in (torch,transformers,trl,peft,datasets,accelerate)})" 2>&1 | tail -1
} | tee "$OUT/machine.txt"

# gpt-oss-120b's shape: 36 layers, 128 experts, 4 per token; the rest as 20b.
BIG=/tmp/gpt-oss-120b-shape
mkdir -p $BIG && cp "$MODEL"/*token* "$MODEL"/*.jinja $BIG/ 2>/dev/null
$PYTHON -c "import json,sys; c=json.load(open(sys.argv[1]+'/config.json')); c.update(num_hidden_layers=36, num_local_experts=128, num_experts_per_tok=4, experts_per_token=4, layer_types=['sliding_attention','full_attention']*18); json.dump(c, open(sys.argv[2]+'/config.json','w'))" "$MODEL" $BIG

# seconds a step may take: its own cap, or what is left of BUDGET (less 15 s to write results), 0 if under 30 s
seconds_for() {
  local left=$(( ${BUDGET:-1500} - ($(date +%s) - start) - 15 ))
  local cap=$(( $1 < left ? $1 : left ))
  echo $(( cap < 30 ? 0 : cap ))
}

# one benchmark run: NAME MODEL_DIR LABEL STEPS CAP_SECONDS; each run's speed.json is a row of results_LABEL.jsonl
run() {
  local cap=$(seconds_for $5) steps=$4
  [ "$DRY" = 1 ] && steps=3
  if [ "$cap" = 0 ]; then echo "== $1 ($3): skipped, out of time" | tee -a "$OUT/logs.txt"; return; fi
  STEPS=$steps RUN_TIMEOUT=$cap RUNS=$1 bash bench/benchmark.sh "$2" "/tmp/bench_$3" > "/tmp/bench_$3.out" 2>&1
  { echo "== $1 ($3, $steps steps, cap $cap s, done at $(( $(date +%s) - start )) s)"; grep -vE '^\||^GPU|^$|^Ratios|^No baseline' "/tmp/bench_$3.out"
    tr '\r' '\n' < "/tmp/bench_$3/$1.log" | grep -E 'Error|error|Traceback|it/s|s/it|recompile limit' | tail -3; } | tee -a "$OUT/logs.txt"
  cp "/tmp/bench_$3/results.jsonl" "$OUT/results_$3.jsonl"; cp "/tmp/bench_$3/results.md" "$OUT/results_$3.md"
  cp "/tmp/bench_$3/$1.log" "$OUT/$3_$1.log"
}
rm -rf /tmp/bench_20b /tmp/bench_120b

run ours "$MODEL" 20b 8 300              # 8 steps: the first 2 (flex compile, mask and expert warm-up) are not timed
run baseline "$MODEL" 20b 5 150          # the Cookbook recipe at batch 8; may not fit
run baseline_b4 "$MODEL" 20b 5 150       # the same at batch 4 x 4 steps: the ratio's baseline when batch 8 does not fit
run ours_packing "$MODEL" 20b 6 200
run ours_compile "$MODEL" 20b 8 300      # --compile: regional compile of the MoE blocks, its warm-up untimed
run ours_4bit "$MODEL" 20b 5 150
run ours_checkpoint_every2 "$MODEL" 20b 6 150
run ours_4bit_b1_ga2 $BIG 120b 4 200

# packed rows against alone: logits, per-layer router top-k sets and layer 0's attention, bf16 / fp32 / every expert
cap=$(seconds_for 150)
layers=4; [ "$DRY" = 1 ] && layers=2
if [ "$cap" = 0 ]; then echo "== check_attention: skipped, out of time" | tee -a "$OUT/logs.txt"
else timeout $cap $PYTHON bench/check_attention.py "$MODEL" --layers $layers 2>&1 | grep '^{' | tee "$OUT/check_attention.txt"; fi
# the packed BlockMask's build time, ours against transformers' compiled builder, at 16K tokens
cap=$(seconds_for 200)
tokens=16384; [ "$DRY" = 1 ] && tokens=2048
[ "$cap" != 0 ] && timeout $cap $PYTHON bench/mask_bench.py --config "$MODEL" --tokens $tokens 2>&1 | grep '^{' | tee "$OUT/mask_bench.txt"
cap=$(seconds_for 200)
[ "$cap" != 0 ] && timeout $cap $PYTHON bench/dequant_bench.py --config "$MODEL/config.json" 2>&1 | grep '^{' | tee "$OUT/dequant_bench.txt"
cat "$OUT"/results_*.md
echo "done in $(( $(date +%s) - start )) s"
