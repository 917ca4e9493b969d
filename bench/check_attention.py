"""GPU check: flex_attention (with gpt-oss's sinks) gives eager's loss and gradients, and packed rows under the
flex BlockMask give the logits each row gets alone: per layer, the router's top-k sets and layer 0's attention
output packed against alone, in bf16 and fp32, and with every expert for every token (no routing left to flip).

    python bench/check_attention.py MODEL_DIR [--layers 4]

Random bf16 weights at the model's full width (fewer layers, to be quick); prints one JSON line.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpt_oss_20b_sft as sft  # noqa: E402


def build(config, attn, device, dtype):
    import copy

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # a copy: from_config records the attention choice on the config it is given
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype, attn_implementation=attn)


def packed_vs_alone(model, rows, lengths, device):
    """Logit differences of packed rows against each row alone, with and without the per-row masks."""
    ids = torch.cat(rows)[None].to(device)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    with torch.no_grad():
        alone = [model(input_ids=r[None].to(device)).logits[0].float() for r in rows]
        leaky = model(input_ids=ids, position_ids=positions).logits[0].float()
        hook = sft.attach_document_masks(model)
        packed = model(input_ids=ids, position_ids=positions).logits[0].float()
        hook.remove()
    found, start = {"masked": [], "unmasked": []}, 0
    for logits in alone:
        n = len(logits)
        for name, run in (("masked", packed), ("unmasked", leaky)):
            diff = (run[start:start + n] - logits).abs()
            same_top1 = (run[start:start + n].argmax(-1) == logits.argmax(-1)).float().mean()
            found[name].append({"max": round(diff.max().item(), 4), "mean": round(diff.mean().item(), 5),
                                "top1_agree": round(same_top1.item(), 4)})
        start += n
    found["logit_scale_max_abs"] = round(max(l.abs().max().item() for l in alone), 3)
    return found


def routing_vs_alone(model, rows, lengths, device):
    """Per layer, the share of tokens whose router top-k set is the same packed as alone, and the largest difference
    of layer 0's attention output (before any routing): a mask leak shows in layer 0's attention, a rounding flip
    only in the routing of later layers."""
    seen = []
    hooks = [layer.mlp.router.register_forward_hook(lambda m, i, o: seen.append(("router", o[2].sort(-1).values)))
             for layer in model.model.layers]
    hooks.append(model.model.layers[0].self_attn.register_forward_hook(lambda m, i, o: seen.append(("attn", o[0][0]))))
    ids = torch.cat(rows)[None].to(device)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    with torch.no_grad():
        alone = []
        for r in rows:
            seen.clear()
            model(input_ids=r[None].to(device))
            alone.append(list(seen))
        seen.clear()
        hook = sft.attach_document_masks(model)
        model(input_ids=ids, position_ids=positions)
        hook.remove()
        packed = list(seen)
    for h in hooks:
        h.remove()
    layers = len(model.model.layers)
    same_sets, attn_diff, start = [[] for _ in range(layers)], 0.0, 0
    for row, n in zip(alone, lengths):
        routers = [t for kind, t in row if kind == "router"]
        packed_routers = [t for kind, t in packed if kind == "router"]
        for i in range(layers):
            same_sets[i].append((packed_routers[i][start:start + n] == routers[i]).all(-1).float())
        attn_alone = next(t for kind, t in row if kind == "attn").float()
        attn_packed = next(t for kind, t in packed if kind == "attn")[start:start + n].float()
        attn_diff = max(attn_diff, (attn_packed - attn_alone).abs().max().item())
        start += n
    return {"router_same_set_share_per_layer": [round(torch.cat(s).mean().item(), 4) for s in same_sets],
            "layer0_attention_max_abs_diff": round(attn_diff, 6)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lengths", default="300,900,700")  # the packed rows
    p.add_argument("--timed-lengths", default="1000,1000,1100,1200")  # one forward and backward each
    args = p.parse_args()
    on_cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_cuda else ("cpu", torch.float32)
    attn = "flex_attention" if on_cuda else "eager"
    config = sft.load_model_config(args.model)
    config = sft.unquantized_config(config, num_hidden_layers=args.layers, layer_types=config.layer_types[:args.layers])
    lengths = [int(n) for n in args.lengths.split(",")]
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, min(config.vocab_size, 199_998), (n,), generator=g) for n in lengths]
    batch = rows[1][None].to(device)  # one row longer than the 128-token sliding window

    eager = build(config, "eager", device, dtype).train()
    flex = build(config, attn, device, dtype).train()
    flex.load_state_dict(eager.state_dict())
    result = {"device": torch.cuda.get_device_name() if on_cuda else "cpu", "attn": attn, "layers": args.layers}
    losses, grads = {}, {}
    for name, model in (("eager", eager), (attn, flex)):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        losses[name] = loss.item()
        grads[name] = {n: p.grad.float().clone() for n, p in model.named_parameters()
                       if p.grad is not None and any(k in n for k in ("q_proj.weight", "v_proj.weight", "sinks"))}
        model.zero_grad(set_to_none=True)
    result["loss"] = losses
    result["loss_rel_diff"] = abs(losses["eager"] - losses[attn]) / abs(losses["eager"])
    rel = {n: ((grads["eager"][n] - grads[attn][n]).norm() / grads["eager"][n].norm()).item() for n in grads["eager"]}
    cos = {n: torch.nn.functional.cosine_similarity(grads["eager"][n].flatten(), grads[attn][n].flatten(), dim=0).item()
           for n in grads["eager"]}
    result["grad_rel_err_max"] = max(rel.values())
    result["grad_cosine_min"] = min(cos.values())

    # bf16, then fp32: a mask that lets rows see each other differs in both; bf16 rounding that differs between
    # the packed and the alone kernel tilings can flip MoE router choices, which fp32 all but removes.
    for precision, model in (("bf16", flex), ("fp32", build(config, attn, device, torch.float32))):
        model.load_state_dict(flex.state_dict())
        result[f"packed_vs_alone_{precision}"] = packed_vs_alone(model.eval(), rows, lengths, device)
        result[f"routing_packed_vs_alone_{precision}"] = routing_vs_alone(model, rows, lengths, device)
    # Every expert for every token: no top-k choice left to flip, so what differs packed is the kernels' rounding.
    every = sft.unquantized_config(config, num_experts_per_tok=config.num_local_experts,
                                   experts_per_token=config.num_local_experts)
    for precision, dtype_ in (("bf16", dtype), ("fp32", torch.float32)):
        model = build(every, attn, device, dtype_).eval()
        model.load_state_dict(flex.state_dict())
        result[f"all_experts_packed_vs_alone_{precision}"] = {**packed_vs_alone(model, rows, lengths, device),
                                                              **routing_vs_alone(model, rows, lengths, device)}
        del model
    result["attn_used"] = [eager.config._attn_implementation, flex.config._attn_implementation]
    import time

    flex.train()
    seconds = []
    for n in map(int, args.timed_lengths.split(",")):  # a new length may recompile the flex kernel
        x = torch.randint(0, min(config.vocab_size, 1000), (1, n), device=device)
        t = time.perf_counter()
        flex(input_ids=x, labels=x).loss.backward()
        torch.cuda.synchronize() if on_cuda else None
        seconds.append(round(time.perf_counter() - t, 2))
    result[f"flex_fwd_bwd_seconds_by_length_{args.timed_lengths.replace(',', '_')}"] = seconds
    print(json.dumps(result), flush=True)

    if not on_cuda:  # eager attention over 9,000 tokens needs more memory than a CPU machine has
        return
    # Packed batches as training sees them: 8 rows in one sequence, a new total length each time.
    sft.attach_document_masks(flex)
    seconds = []
    for total in (9000, 9000, 9500, 10000):
        lengths = [total // 8] * 7 + [total - 7 * (total // 8)]
        x = torch.randint(0, min(config.vocab_size, 1000), (1, total), device=device)
        positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
        t = time.perf_counter()
        flex(input_ids=x, position_ids=positions, labels=x).loss.backward()
        torch.cuda.synchronize()
        seconds.append(round(time.perf_counter() - t, 2))
        print(json.dumps({"packed_fwd_bwd_seconds_so_far_9000_9000_9500_10000": seconds}), flush=True)


if __name__ == "__main__":
    main()
