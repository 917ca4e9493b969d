"""CPU time and peak memory of one layer's MXFP4 expert dequant (--use_4bit): transformers' convert_moe_packed_tensors
(its [experts, rows, cols] result copied transposed) against the script's one-pass dequantize_mxfp4.

    python bench/dequant_bench.py [--config ../shared/gpt-oss-20b/config.json] [--repeats 3] [--threads N]

Random bytes of the config's expert shapes (scales in the weights' range), bf16 out. Each method runs in a fresh
process so its peak resident memory (ru_maxrss) above the inputs is its own; prints one JSON line per method.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(method: str, config: dict, repeats: int, threads: int | None) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    import gpt_oss_20b_sft as sft
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    if threads:
        torch.set_num_threads(threads)
    experts, hidden, inner = config["num_local_experts"], config["hidden_size"], config["intermediate_size"]
    generator = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randint(0, 256, (experts, rows, cols // 32, 16), dtype=torch.uint8, generator=generator),
                      torch.randint(115, 125, (experts, rows, cols // 32), dtype=torch.uint8, generator=generator))
               for name, rows, cols in (("gate_up_proj", 2 * inner, hidden), ("down_proj", hidden, inner))}
    dequant = {"transformers": lambda b, s: convert_moe_packed_tensors(b, s, dtype=torch.bfloat16,
                                                                       rows_per_chunk=sft.MXFP4_ROWS_PER_CHUNK),
               "one_pass": lambda b, s: sft.dequantize_mxfp4(b, s, torch.bfloat16)}[method]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for blocks, scales in tensors.values():
            out = dequant(blocks, scales)
            del out
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    output_gb = sum(b.numel() * 2 * 2 for b, _ in tensors.values()) / 1e9  # two values per byte, two bytes each
    return {"method": method, "layer_seconds_min": round(min(seconds), 3), "layer_seconds_all": [round(x, 3) for x in seconds],
            "peak_rss_above_inputs_gb": round((peak - before) / 1e6, 3), "layer_output_gb": round(output_gb, 3),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT.parent / "shared" / "gpt-oss-20b" / "config.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--method", choices=["transformers", "one_pass"], help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    config = json.loads(Path(args.config).read_text())
    if args.method:
        print(json.dumps(measure(args.method, config, args.repeats, args.threads)))
        return
    for method in ("transformers", "one_pass"):
        child = [sys.executable, __file__, "--config", args.config, "--repeats", str(args.repeats), "--method", method]
        child += ["--threads", str(args.threads)] if args.threads else []
        print(subprocess.run(child, check=True, capture_output=True, text=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
