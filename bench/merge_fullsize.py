#!/usr/bin/env python
"""--mode merge at gpt-oss-20b's real size, without a GPU: wall time, peak RSS and output size for both formats.

    python bench/merge_fullsize.py [--dir /tmp/merge_bench] [--bf16-layers 4] [--config ../shared/gpt-oss-20b]

Builds (once) a fake gpt-oss-20b checkpoint of the real shape: the real config.json, generation_config.json and
tokenizer from --config, tensor names and shapes from transformers' GptOss modules with the experts as MXFP4
blocks/scales (the layout the hub checkpoint has and the script's --use_4bit loader reads), random values, bf16
everything else, in shards of at most 5 GB cut in state-dict order (transformers' save_pretrained way; the hub
release's exact file split is not reproduced: the merge does not depend on it). Then an adapter of the seed shape
(r 16, alpha 16, q_proj and v_proj on all 24 layers) and the merge, each run its own process with
--no-merge-logits-check (the numbers are the merge's own: the logits check needs the model in bf16, 47 GiB), peak
RSS from the kernel (ru_maxrss of the child: resident anonymous and file-mapped pages). Outputs are deleted after
measuring.
The bf16 merge runs on a checkpoint cut to --bf16-layers layers (0: all 24; about 42 GB more on disk) and its time
and size are scaled to 24 layers by the bytes written, labelled as such.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

import gpt_oss_20b_sft as sft  # noqa: E402

SHARD_BYTES = 5 * 10**9


def layout(config) -> dict:
    """{name: (shape, dtype)} of the hub's MXFP4 checkpoint, from transformers' modules (no weights made)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(sft.unquantized_config(config), dtype=torch.bfloat16)
        for layer in model.model.layers:
            layer.mlp.experts = sft.mxfp4_experts_class()(model.config)
    return {name: (tuple(t.shape), torch.uint8 if t.dtype == torch.uint8 else torch.bfloat16)
            for name, t in model.state_dict().items()}


def random_tensor(name, shape, dtype, generator):
    import torch

    if name.endswith("_blocks"):
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    if name.endswith("_scales"):  # 2**-9 .. 2**-3: weights of the usual size
        return torch.randint(118, 125, shape, dtype=torch.uint8, generator=generator)
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def build_base(config_dir: Path, target: Path, layers: int | None = None) -> Path:
    """The fake checkpoint, written shard by shard (at most one shard in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    if (target / "config.json").exists():
        return target
    config = AutoConfig.from_pretrained(config_dir)
    raw = json.loads((config_dir / "config.json").read_text())
    if layers:
        config.num_hidden_layers = raw["num_hidden_layers"] = layers
        config.layer_types = raw["layer_types"] = raw["layer_types"][:layers]
    tensors = layout(config)
    shards, size = [[]], 0
    for name, (shape, dtype) in tensors.items():
        nbytes = math.prod(shape) * (1 if dtype == torch.uint8 else 2)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: random_tensor(n, *tensors[n], generator) for n in names}, str(staging / file),
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        print(f"  wrote {file} ({len(names)} tensors)", flush=True)
    total = sum(math.prod(s) * (1 if d == torch.uint8 else 2) for s, d in tensors.values())
    (staging / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}, indent=2))
    (staging / "config.json").write_text(json.dumps(raw, indent=2))
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "chat_template.jinja"):
        if (config_dir / extra).exists():
            shutil.copy(config_dir / extra, staging / extra)
    os.replace(staging, target)
    return target


def build_adapter(base: Path, target: Path, rank: int = 16, alpha: int = 16) -> Path:
    """An adapter of the seed recipe's shape, as PEFT saves it (random B, so the merge changes every weight)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    hidden, heads, kv, head_dim = (config["hidden_size"], config["num_attention_heads"],
                                   config["num_key_value_heads"], config["head_dim"])
    generator = torch.Generator().manual_seed(1)
    state = {}
    for layer in range(config["num_hidden_layers"]):
        for proj, out in (("q_proj", heads * head_dim), ("v_proj", kv * head_dim)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * 0.05
            state[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=generator) * 0.05
    target.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target / "adapter_model.safetensors"))
    LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
               base_model_name_or_path=str(base)).save_pretrained(target)
    return target


def measure(base: Path, adapter: Path, out: Path, *flags) -> dict:
    """One merge in its own process: wall seconds, peak RSS (GiB) and output size."""
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, str(HERE / "gpt_oss_20b_sft.py"), "--mode", "merge", "--model", str(base), "--adapter",
            str(adapter), "--output_dir", str(out), "--no-merge-logits-check", *flags]  # the merge alone
    log = out.with_name(out.name + ".log")
    start = time.perf_counter()
    with open(log, "w") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak, in KiB on Linux
    seconds = time.perf_counter() - start
    output = log.read_text()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"merge failed ({os.waitstatus_to_exitcode(status)}):\n{output[-3000:]}")
    print("  " + "\n  ".join(line for line in output.splitlines() if not line.startswith("Loading")))
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"seconds": seconds, "size": size, "rss": usage.ru_maxrss * 1024, "output": output}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/merge_bench", type=Path)
    parser.add_argument("--config", default=HERE.parent / "shared" / "gpt-oss-20b", type=Path)
    parser.add_argument("--bf16-layers", default=4, type=int, help="layers of the bf16 run (0: all)")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"

    full_layers = json.loads((args.config / "config.json").read_text())["num_hidden_layers"]
    rows = []
    started, reused = time.perf_counter(), (args.dir / "base" / "config.json").exists()
    base = build_base(args.config, args.dir / "base")
    base_size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(f"fake gpt-oss-20b: {base_size / 2**30:.2f} GiB in {len(list(base.glob('*.safetensors')))} shards "
          + ("(built earlier)" if reused else f"({time.perf_counter() - started:.0f} s to build)"), flush=True)
    adapter = build_adapter(base, args.dir / "adapter")
    run = measure(base, adapter, args.dir / "merged-mxfp4")
    rows.append(("mxfp4", full_layers, run, base_size, 1.0))
    shutil.rmtree(args.dir / "merged-mxfp4")

    layers = args.bf16_layers or full_layers
    subset = base if layers == full_layers else build_base(args.config, args.dir / f"base-{layers}layers", layers)
    subset_adapter = adapter if subset is base else build_adapter(subset, args.dir / f"adapter-{layers}layers")
    run = measure(subset, subset_adapter, args.dir / "merged-bf16", "--merge-format", "bf16")
    # bytes written at 24 layers over bytes written here: the scale for time and size
    per_layer = 2 * sum(math.prod(s) * (2 if n.endswith("_blocks") else 0 if n.endswith("_scales") else 1)
                        for n, (s, _) in layout(sft.load_model_config(str(base))).items() if ".layers.0." in n)
    scale = (run["size"] + (full_layers - layers) * per_layer) / run["size"]
    rows.append(("bf16", layers, run, sum(p.stat().st_size for p in subset.glob("*.safetensors")), scale))
    shutil.rmtree(args.dir / "merged-bf16")

    print("\n| format | layers merged | wall time | peak RSS | output | output / its base |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, n, run, size, scale in rows:
        measured = (f"| {name} | {n} of {full_layers} | {run['seconds']:.0f} s | {run['rss'] / 2**30:.2f} GiB | "
                    f"{run['size'] / 2**30:.2f} GiB | {run['size'] / size:.4f} |")
        print(measured)
        if scale != 1.0:
            print(f"| {name}, scaled to {full_layers} layers (estimate, not measured) | {full_layers} of {full_layers} "
                  "| "
                  f"~{run['seconds'] * scale:.0f} s | same (streamed) | ~{run['size'] * scale / 2**30:.1f} GiB | "
                  f"~{run['size'] * scale / base_size:.2f} |")


if __name__ == "__main__":
    main()
