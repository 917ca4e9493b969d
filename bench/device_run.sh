# The whole GPU check in one call of the device tool (our workplace's lent H100/H200), from the repo root.
# Prepare here first (both folders are git-ignored through .git/info/exclude):
#   .whl/          wheels the GPU image lacks: trl 1.16.0, datasets 5.2.0, transformers 5.23.0, peft 0.21.2, dill,
#                  multiprocess (pip download --no-deps --only-binary=:all: --python-version 3.12 ...)
#   .gpu_assets/gpt-oss-20b/   config.json + tokenizer files copied from ../shared/gpt-oss-20b (no weights)
# then run it with carry [".whl", ".gpu_assets"]; results land in $OUT (few files: the device tool returns 8 at most).
# BUDGET (seconds, default 540) bounds the whole script: each run gets at most its own cap and what is left.
# The call as planned (15 device minutes a session, a machine start included):
#   run(command="mkdir -p $OUT && BUDGET=500 bash bench/device_run.sh 2>&1 | tail -c 11000",
#       carry=[".whl", ".gpu_assets"], kind="nvidia-h100-x1" or "nvidia-h200", timeout_s=560)
set -u
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHON=python3 RUN_DIR=/tmp/runs
{ nvidia-smi --query-gpu=name,memory.total --format=csv
  python3 -c "import torch,transformers,trl,peft,datasets,accelerate;print({m.__name__:m.__version__ for m in (torch,transformers,trl,peft,datasets,accelerate)})" 2>&1 | tail -1
} | tee $OUT/machine.txt

# gpt-oss-120b's shape: 36 layers, 128 experts, 4 per token; the rest as 20b.
mkdir -p .gpu_assets/gpt-oss-120b && cp .gpu_assets/gpt-oss-20b/*token* .gpu_assets/gpt-oss-20b/*.jinja .gpu_assets/gpt-oss-120b/
python3 -c "import json; c=json.load(open('.gpu_assets/gpt-oss-20b/config.json')); c.update(num_hidden_layers=36, num_local_experts=128, num_experts_per_tok=4, experts_per_token=4, layer_types=['sliding_attention','full_attention']*18); json.dump(c, open('.gpu_assets/gpt-oss-120b/config.json','w'))"

# seconds a step may take: its own cap, or what is left of BUDGET (less 15 s to copy results), 0 if under 30 s
seconds_for() {
  local left=$(( ${BUDGET:-540} - ($(date +%s) - start) - 15 ))
  local cap=$(( $1 < left ? $1 : left ))
  echo $(( cap < 30 ? 0 : cap ))
}

# one benchmark run: NAME MODEL STEPS CAP_SECONDS; logs in /tmp, the table rows in $OUT/results_<model>.jsonl
run() {
  local cap=$(seconds_for $4)
  if [ "$cap" = 0 ]; then echo "== $1 ($2): skipped, out of time" | tee -a $OUT/logs.txt; return; fi
  STEPS=$3 RUN_TIMEOUT=$cap RUNS=$1 bash bench/benchmark.sh .gpu_assets/$2 /tmp/bench_$2 > /tmp/bench_$2.out 2>&1
  { echo "== $1 ($2, $3 steps, cap $cap s, done at $(( $(date +%s) - start )) s)"; grep -vE '^\||^GPU|^$' /tmp/bench_$2.out
    tr '\r' '\n' < /tmp/bench_$2/$1.log | grep -E 'Error|error|Traceback|it/s|s/it' | tail -3; } | tee -a $OUT/logs.txt
  cp /tmp/bench_$2/results.jsonl $OUT/results_$2.jsonl; cp /tmp/bench_$2/results.md $OUT/results_$2.md
}

run ours gpt-oss-20b 5 150
run baseline gpt-oss-20b 5 120
run ours_4bit gpt-oss-20b 4 110
run ours_4bit_b1 gpt-oss-20b 4 90
run ours_4bit_b1_ga2 gpt-oss-120b 4 150
# flex vs eager on the same inputs, packed rows vs alone in bf16 and fp32, packed step times (prints as it goes)
cap=$(seconds_for 120)
if [ "$cap" = 0 ]; then echo "== check_attention: skipped, out of time" | tee -a $OUT/logs.txt
else timeout $cap python3 bench/check_attention.py .gpu_assets/gpt-oss-20b --layers 4 2>&1 | grep '^{' | tee $OUT/check_attention.txt; fi
# ours with the seed's random micro-batches: how much of the gain is batch_rebalance's less padding
run ours_random gpt-oss-20b 5 100
cat $OUT/results_*.md
