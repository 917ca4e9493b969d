"""Build time of a packed row's flex BlockMasks (causal and sliding window): the script's document_block_mask,
from the row boundaries, against transformers' create_causal_mask / create_sliding_window_causal_mask, which
run torch.compile(create_block_mask) over the dense mask (--transformers compiled, the default) or the same
builder uncompiled (--transformers eager).

    python bench/mask_bench.py [--tokens 16384] [--device cpu|cuda] [--transformers compiled|eager|none]

Rows of 200-1500 tokens (Multilingual-Thinking's range) packed to --tokens; the config's sliding window.
Prints one JSON line: seconds per build (first call, then the best of 3) and whether the tables are equal.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import gpt_oss_20b_sft as sft  # noqa: E402


def timed(build, device):
    seconds = []
    for _ in range(4):
        start = time.perf_counter()
        masks = build()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return masks, {"first_s": round(seconds[0], 4), "best_of_3_s": round(min(seconds[1:]), 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--transformers", choices=["compiled", "eager", "none"], default="compiled")
    parser.add_argument("--config", default=str(ROOT.parent / "shared" / "gpt-oss-20b"))
    args = parser.parse_args()
    from transformers import AutoConfig
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = AutoConfig.from_pretrained(args.config, attn_implementation="flex_attention")
    generator = torch.Generator().manual_seed(0)
    lengths = []
    while sum(lengths) < args.tokens:
        lengths.append(min(int(torch.randint(200, 1500, (), generator=generator)), args.tokens - sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(args.device)
    ours, ours_time = timed(lambda: (sft.document_block_mask(positions),
                                     sft.document_block_mask(positions, config.sliding_window)), args.device)
    result = {"tokens": args.tokens, "rows": len(lengths), "kv_blocks": -(-args.tokens // 128), "device": args.device,
              "torch": torch.__version__, "ours": ours_time}
    if args.transformers != "none":
        kwargs = dict(config=config, inputs_embeds=torch.zeros(1, args.tokens, 1, device=args.device),
                      attention_mask=None, past_key_values=None, position_ids=positions)
        if args.transformers == "eager":  # the same builder without torch.compile
            import transformers.masking_utils as masking

            compiled = masking.create_block_mask
            masking.create_block_mask = lambda *a, _compile=False, **k: compiled(*a, **k)
        theirs, result["transformers_" + args.transformers] = timed(
            lambda: (create_causal_mask(**kwargs), create_sliding_window_causal_mask(**kwargs)), args.device)
        result["tables_equal"] = all(
            torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            for mine, reference in zip(ours, theirs) for a, b in zip(mine.as_tuple()[:-1], reference.as_tuple()[:-1]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
