# The whole GPU check in one call of the device tool (our workplace's lent H100/H200), from the repo root.
# Prepare here first (both folders are git-ignored through .git/info/exclude):
#   .whl/          wheels the GPU image lacks: trl 1.16.0, datasets 5.2.0, transformers 5.23.0, peft 0.21.2, dill,
#                  multiprocess (pip download --no-deps --only-binary=:all: --python-version 3.12 ...)
#   .gpu_assets/gpt-oss-20b/   config.json + tokenizer files copied from ../shared/gpt-oss-20b (no weights)
# then run it with carry [".whl", ".gpu_assets"]; results land in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHON=python3 RUN_DIR=/tmp/runs
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpu.txt
python3 -c "import torch,transformers,trl,peft,datasets,accelerate,pyarrow;print({m.__name__:m.__version__ for m in (torch,transformers,trl,peft,datasets,accelerate,pyarrow)})" 2>&1 | tail -3 | tee $OUT/versions.txt
timeout 150 python3 bench/check_attention.py .gpu_assets/gpt-oss-20b --layers 4 2>&1 | tail -3 | tee $OUT/check_attention.txt
RUN_TIMEOUT=120 STEPS=6 RUNS="${RUNS:-ours_padded baseline baseline_b4 ours ours_4bit ours_4bit_b1}" bash bench/benchmark.sh .gpu_assets/gpt-oss-20b $OUT/bench
# gpt-oss-120b's shape (36 layers, 128 experts, 4 per token; the rest as 20b) for --use_4bit on an H200: RUNS_120B=...
if [ -n "${RUNS_120B:-}" ]; then
  mkdir -p .gpu_assets/gpt-oss-120b && cp .gpu_assets/gpt-oss-20b/*token* .gpu_assets/gpt-oss-20b/*.jinja .gpu_assets/gpt-oss-120b/ 2>/dev/null
  python3 -c "import json; c=json.load(open('.gpu_assets/gpt-oss-20b/config.json')); c.update(num_hidden_layers=36, num_local_experts=128, num_experts_per_tok=4, experts_per_token=4, layer_types=['sliding_attention','full_attention']*18); json.dump(c, open('.gpu_assets/gpt-oss-120b/config.json','w'))"
  RUN_TIMEOUT=240 STEPS=4 RUNS="$RUNS_120B" bash bench/benchmark.sh .gpu_assets/gpt-oss-120b $OUT/bench_120b
fi
