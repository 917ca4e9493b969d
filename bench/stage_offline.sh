#!/usr/bin/env bash
# Stage what an offline GPU node lacks into one ignored folder that travels with the working tree:
#
#   bash bench/stage_offline.sh [PYTHON_VERSION] [DIR]    # defaults: 3.12 (the node's Python), .offline
#
# DIR/wheels: the exact versions requirements.txt resolves to, for CPython PYTHON_VERSION on manylinux x86_64, without
# their dependencies (the node's image has torch, accelerate, huggingface_hub, tokenizers, safetensors, pyarrow,
# pandas, pyyaml, psutil, matplotlib); DIR/gpt-oss-20b: the model's config, chat template and gzipped tokenizer from
# ../shared (no weights: the benchmark trains random ones). bench/device_run.sh installs and reads them on the node.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-3.12}
DIR=${2:-.offline}
SHARED=${SHARED:-../shared/gpt-oss-20b}
WHEELS="transformers==5.23.0 trl==1.16.0 peft==0.21.2 datasets==5.2.0 multiprocess==0.70.19 dill==0.4.1 xxhash==4.1.0"

rm -rf "$DIR"
mkdir -p "$DIR/wheels" "$DIR/gpt-oss-20b"
python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$PY" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --dest "$DIR/wheels" $WHEELS
cp "$SHARED"/{config.json,generation_config.json,tokenizer_config.json,special_tokens_map.json,chat_template.jinja} \
  "$DIR/gpt-oss-20b/"
gzip -9c "$SHARED/tokenizer.json" > "$DIR/gpt-oss-20b/tokenizer.json.gz"

ls -1 "$DIR/wheels"
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
staged=$(du -sb "$DIR" | cut -f1)
echo "staged $DIR: $((staged / 1024)) KiB; with the working tree $(( (staged + tree) / 1024 / 1024 )) MiB of the 64 MiB that may travel"
[ $((staged + tree)) -lt $((64 * 1024 * 1024)) ] || { echo "too big to travel" >&2; exit 1; }
