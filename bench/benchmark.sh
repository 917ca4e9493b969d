#!/usr/bin/env bash
# Speed and memory of the seed recipe: the Cookbook way (eager attention, randomly batched padded rows, full-logits loss) against
# our defaults, same hyper-parameters, random weights at the model's full size, synthetic rows with the length
# profile of Multilingual-Thinking; and a GRPO step (rollouts by transformers' generate, then the update). One command:
#
#   bench/benchmark.sh [MODEL] [OUT_DIR]      # MODEL: hub id or local dir with config.json + tokenizer
#
# Each run is its own process (clean GPU memory) and writes speed.json into its output folder; the table goes to
# OUT_DIR/results.md. STEPS (default 6) optimizer steps per run, the first 2 are warm-up and not timed;
# RUN_TIMEOUT (seconds, default 600) bounds each run; RUNS picks runs by name (flags_for below); EXTRA_FLAGS go to
# every train run, GRPO_EXTRA_FLAGS every grpo run (after its own); LABEL (e.g. 120b) prefixes the runs' names in the table (no ratio: another model); LOG_DIR (default
# OUT_DIR) gets each run's log. With TORCH_LOGS=recompiles set, each run's torch.compile recompiles are counted.
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-openai/gpt-oss-20b}
OUT=${2:-bench_output}
STEPS=${STEPS:-6}
RUNS=${RUNS:-"baseline baseline_b4 ours_random ours"}
LOG_DIR=${LOG_DIR:-$OUT}
mkdir -p "$OUT" "$LOG_DIR"

flags_for() {
  case $1 in
    ours) echo "" ;;
    ours_random) echo "--sampler random" ;;  # ours with the seed's micro-batches: what batch_rebalance saves
    ours_grouped) echo "--sampler group_by_length" ;;
    ours_packing) echo "--packing" ;;
    ours_compile) echo "--compile" ;;
    ours_checkpoint_every2) echo "--recompute-every-nth-layer 2" ;;
    ours_no_checkpointing) echo "--no-gradient-checkpointing" ;;
    baseline) echo "--attn-implementation eager --no-packing --no-chunked-loss --sampler random" ;;
    baseline_b4) echo "--attn-implementation eager --no-packing --no-chunked-loss --sampler random --batch_size 4 --gradient_accumulation_steps 4" ;;
    ours_4bit) echo "--use_4bit" ;;
    ours_4bit_b1) echo "--use_4bit --batch_size 1 --gradient_accumulation_steps 16" ;;
    ours_4bit_b2) echo "--use_4bit --batch_size 2 --gradient_accumulation_steps 8" ;;
    ours_4bit_b1_ga2) echo "--use_4bit --batch_size 1 --gradient_accumulation_steps 2" ;;  # memory as b1, quicker steps
    # 8 completions of 256 tokens a step: the step of the defaults (32 of 1,024) takes minutes; random weights earn no
    # reward, and the language reward needs lingua, which GPU images lack: the format reward alone
    grpo) echo "--num_generations 8 --batch_size 8 --gradient_accumulation_steps 1 --max_completion_length 256 \
--language_reward 0 --answer_language_reward 0" ;;
    grpo_eager) echo "$(flags_for grpo) --attn-implementation eager" ;;
  esac
}
mode_for() { case $1 in grpo*) echo grpo ;; *) echo train ;; esac; }

for name in $RUNS; do
  echo "== $name: $(flags_for "$name")"
  rm -f "${RUN_DIR:-$OUT/runs}/$name/speed.json"  # a failed run must not report the last one's numbers
  mode=$(mode_for "$name")
  extra=${EXTRA_FLAGS:-} && [ "$mode" = grpo ] && extra=
  timeout "${RUN_TIMEOUT:-600}" ${PYTHON:-python} gpt_oss_20b_sft.py --mode "$mode" --model "$MODEL" --random-init --synthetic-data 1000 --max-steps "$STEPS" \
    --report_to none --overwrite --output_dir "${RUN_DIR:-$OUT/runs}/$name" $extra $(flags_for "$name") \
    $([ "$mode" = grpo ] && echo "${GRPO_EXTRA_FLAGS:-}") > "$LOG_DIR/$name.log" 2>&1
  code=$?
  echo "exit code $code"
  recompiles=$(grep -c 'Recompiling function' "$LOG_DIR/$name.log")  # counted when TORCH_LOGS=recompiles is set
  line=$(tr -d '\n' < "${RUN_DIR:-$OUT/runs}/$name/speed.json" 2>/dev/null)
  [ -n "$line" ] || line='{"error": "no speed.json, see the log"}'
  echo "$line"
  printf '{"run": "%s", "flags": "%s", "exit": %s, "recompiles": %s, "summary": %s}\n' "${LABEL:+$LABEL:}$name" \
    "$(flags_for "$name")" "$code" "$recompiles" "$line" >> "$OUT/results.jsonl"
done

${PYTHON:-python} - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/results.jsonl")]
everything = {r["run"]: r for r in rows}  # a rerun replaces its earlier row
latest = {n: r for n, r in everything.items() if "grpo" not in n}
grpo = {n: r for n, r in everything.items() if "grpo" in n}
# The ratio's baseline: the Cookbook recipe as it stands (batch 8) if it fit, else the same at batch 4 x 4 steps.
def unfinished(r, empty):  # a run without numbers: why, then its empty cells
    ended = "timed out" if r.get("exit") == 124 else f"failed (exit {r.get('exit')})"
    return f"| {r['run']} | `{r['flags']}` | {ended} |" + " |" * empty + f" {r.get('recompiles', '')} |"


base = next((n for n in ("baseline", "baseline_b4") if "tokens_per_second" in latest.get(n, {}).get("summary", {})), None)
lines = [f"| run | flags | real tokens/s | x {base or 'baseline'} | padded tokens/s | step s | peak alloc GiB | "
         "peak reserved GiB | projected 3-epoch min | recompiles |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
for r in latest.values():
    s, n = r["summary"], r.get("recompiles", "")
    if s.get("oom"):
        lines.append(f"| {r['run']} | `{r['flags']}` | OOM | | | | >{s['peak_memory_gib']['allocated']} | | | {n} |")
    elif "tokens_per_second" in s:
        m = s["peak_memory_gib"]
        ratio = (f"{s['tokens_per_second'] / latest[base]['summary']['tokens_per_second']:.2f}"
                 if base and ":" not in r["run"] else "")  # a labelled run is another model
        lines.append(f"| {r['run']} | `{r['flags']}` | {s['tokens_per_second']:,.0f} | {ratio} | "
                     f"{s['padded_tokens_per_second']:,.0f} | {s['step_seconds']} | {m['allocated']} | {m['reserved']} | "
                     f"{s['projected_run_minutes']} | {n} |")
    else:
        lines.append(unfinished(r, 6))
gpu = next((r["summary"].get("gpu") for r in rows if r["summary"].get("gpu")), "?")
note = (f"Ratios against {base}" + (" (baseline, batch 8, did not fit or failed)" if base == "baseline_b4" else "")
        if base else "No baseline run finished: no ratios")
text = f"GPU: {gpu}\n\n{note}.\n\n" + "\n".join(lines) + "\n"
if grpo:  # its own columns: a GRPO step is rollouts, then an update on them
    lines = ["| run | flags | rollout tokens/s | rollout s | completion tokens/step | step s | peak alloc GiB | "
             "peak reserved GiB | recompiles |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in grpo.values():
        s, n = r["summary"], r.get("recompiles", "")
        if "rollout_tokens_per_second" in s:
            m = s["peak_memory_gib"]
            lines.append(f"| {r['run']} | `{r['flags']}` | {s['rollout_tokens_per_second']:,.0f} | {s['rollout_seconds']} | "
                         f"{s['completion_tokens_per_step']:,.0f} | {s['step_seconds']} | {m['allocated']} | "
                         f"{m['reserved']} | {n} |")
        else:
            lines.append(unfinished(r, 5))
    text += "\nGRPO (the first step, with its warm-up, untimed):\n\n" + "\n".join(lines) + "\n"
open(f"{out}/results.md", "w").write(text)
print(text)
PY
