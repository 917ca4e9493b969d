"""--merge-format gguf: one GGUF that llama.cpp loads (through llama-cpp-python, requirements-serve.txt), checked
against transformers on a tiny random gpt-oss with the real 201,088-token tokenizer and MXFP4 experts."""

import json

import numpy as np
import pytest
import torch

EXTRAS = "the serving extras are not installed (requirements-serve.txt; README, 'Serve it')"
gguf = pytest.importorskip("gguf", reason=EXTRAS)
llama_cpp = pytest.importorskip("llama_cpp", reason=EXTRAS)
from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: E402

import gpt_oss_20b_sft as sft  # noqa: E402
from conftest import SHARED, assert_usage_error, resolve, run_cli, snapshot  # noqa: E402
from test_merge import ATTENTION, EXPERTS, make_adapter  # noqa: E402

pytestmark = [pytest.mark.real_tokenizer, pytest.mark.slow]  # slow: a real-vocabulary model, built and merged (a minute)

PROMPTS = [("What is 7 x 8?", "German"), ("Quelle est la capitale de l'Australie ?", "French")]
NEAR_TIE = 0.02  # a router margin under which llama.cpp's rounding may pick the other expert
TEXTS = ["Hello world! 12345 apples", "Ünïcödé — 日本語のテキスト, emojis 🦙🚀 and\n\n  spaces\ttabs",
         "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>analysis<|message|>"]


@pytest.fixture(scope="module")
def base(real_tokenizer, tmp_path_factory):
    """A tiny random gpt-oss of the real config's kind (YaRN, alternating sliding and full attention, sinks, biases)
    on the real tokenizer, written as the hub ships it: experts in MXFP4. head_dim 32, the smallest llama.cpp's CPU
    kernels and vLLM's take; weights larger than the default init so the logits vary by whole units."""
    from transformers import GptOssConfig, GptOssForCausalLM

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
    folder = tmp_path_factory.mktemp("gguf_base")
    model.save_pretrained(folder / "fp32")
    real_tokenizer.save_pretrained(folder / "fp32")
    return sft.write_mxfp4_checkpoint(folder / "fp32", folder / "mxfp4")


@pytest.fixture(scope="module")
def merges(base, tmp_path_factory):
    """kind -> (adapter, merged folder, merge record): attention LoRA (MXFP4 experts kept) and expert LoRA (bf16)."""
    folder = tmp_path_factory.mktemp("gguf_merges")
    out = {}
    for kind, targets in (("attention", ATTENTION), ("experts", EXPERTS)):
        adapter = make_adapter(base, folder / f"adapter_{kind}", **targets)
        record = sft.run_merge(resolve("--mode", "merge", "--merge-format", "gguf", "--adapter", str(adapter),
                                       "--model", str(base), "--output", str(folder / kind)))
        out[kind] = adapter, folder / kind, record
    return out


@pytest.fixture(scope="module")
def demo_merge(demo_model, tmp_path_factory):
    """The demo's model in MXFP4 (its own 1k BPE), an attention adapter and their GGUF merge: (base, adapter, folder).
    Its small vocabulary reads back in a second where the real one takes twenty."""
    folder = tmp_path_factory.mktemp("gguf_demo")
    base = sft.write_mxfp4_checkpoint(demo_model, folder / "tiny-gpt-oss-mxfp4")
    adapter = make_adapter(base, folder / "adapter", **ATTENTION)
    record = sft.run_merge(resolve("--mode", "merge", "--merge-format", "gguf", "--adapter", str(adapter), "--model",
                                   str(base), "--output", str(folder / "merged")))
    assert record["passed"] and record["checks_run"] == ["tensors"]
    return base, adapter, folder / "merged"


def llama(path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, n_threads=2, verbose=False)


def llama_logits(model, ids):
    model.reset()
    model.eval(ids)
    return torch.from_numpy(np.array(model.scores[:len(ids)], dtype=np.float32))


def transformers_logits(base, adapter, prompts, truncate=True):
    """The exact reference: base (experts dequantized) + adapter unmerged, in fp32, and the base alone; and per position
    the smallest router margin over layers (the k-th expert's router logit minus the next one's). YaRN with
    truncate=True, as llama.cpp computes it: it always rounds the correction range, which gpt-oss's truncate=False
    leaves unrounded."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, Mxfp4Config

    config = AutoConfig.from_pretrained(base)
    config.rope_parameters = {**config.rope_parameters, "truncate": truncate}
    model = AutoModelForCausalLM.from_pretrained(base, config=config, dtype=torch.float32,
                                                 quantization_config=Mxfp4Config(dequantize=True),
                                                 attn_implementation="eager")
    model = PeftModel.from_pretrained(model, adapter).eval()
    k = config.num_experts_per_tok
    with torch.no_grad():
        outputs = [model(torch.tensor([ids]), output_router_logits=True) for ids in prompts]
        tuned = [out.logits[0].float() for out in outputs]
        tops = [[r.topk(k + 1).values for r in out.router_logits] for out in outputs]  # per prompt, per layer
        margins = [torch.stack([top[:, k - 1] - top[:, k] for top in layers]).min(dim=0).values for layers in tops]
        with model.disable_adapter():
            plain = [model(torch.tensor([ids])).logits[0].float() for ids in prompts]
    return tuned, plain, margins


def prompt_ids(tokenizer):
    return [tokenizer.apply_chat_template(sft.build_chat(p, lang), add_generation_prompt=True, tokenize=True,
                                          return_dict=False) for p, lang in PROMPTS]


def test_gguf_has_llama_cpps_gpt_oss_metadata(merges):
    """The real 201,088-token vocabulary's GGUF, as llama.cpp reads it (gguf's own reader takes about 17 s over those
    tokens; the tensors are checked with it on the demo's GGUF below)."""
    _, out, record = merges["attention"]
    assert record["passed"] and record["format"] == "gguf (mxfp4 experts)" and record["checks_run"] == ["tensors"]
    assert sorted(p.name for p in out.iterdir()) == [".gpt_oss_sft.json", "merge_check.json", "model.gguf"]
    assert sft.sort_outputs(out, "merge") == ([out / "merge_check.json", out / "model.gguf"], [])  # --overwrite may
    model = llama(out / "model.gguf")
    field = model.metadata.get
    assert field("general.architecture") == "gpt-oss" and field("tokenizer.ggml.pre") == "gpt-4o"
    assert field("tokenizer.ggml.model") == "gpt2" and model.n_vocab() == 201088
    assert field("tokenizer.chat_template") == (SHARED / "chat_template.jinja").read_text()
    assert field("gpt-oss.rope.scaling.type") == "yarn" and float(field("gpt-oss.rope.scaling.factor")) == 32
    assert field("gpt-oss.rope.scaling.original_context_length") == "4096"
    assert field("gpt-oss.context_length") == "131072"
    assert field("gpt-oss.attention.sliding_window") == "16" and field("gpt-oss.expert_count") == "4"
    assert field("gpt-oss.expert_used_count") == "2" and field("gpt-oss.expert_feed_forward_length") == "64"
    assert field("general.file_type") == str(gguf.LlamaFileType.MOSTLY_MXFP4_MOE.value)


def test_llama_cpp_tokenizes_as_transformers(merges, real_tokenizer):
    model = llama(merges["attention"][1] / "model.gguf")
    for text in TEXTS + [real_tokenizer.apply_chat_template(sft.build_chat(p, lang), add_generation_prompt=True,
                                                            tokenize=False) for p, lang in PROMPTS]:
        want = real_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert model.tokenize(text.encode(), add_bos=False, special=True) == want, text
        assert model.detokenize(want, special=True).decode() == text


@pytest.mark.parametrize("kind", ["attention", "experts"])
def test_llama_cpp_logits_match_transformers(kind, merges, base, real_tokenizer, pinned_date):
    """llama.cpp's logits against transformers' fp32 forward of base + adapter, unmerged. What separates them is
    rounding: the merged weights stored in bf16 (2^-9 relative), and llama.cpp's CPU kernels rounding activations to
    bf16 before bf16 matmuls and to 8-bit blocks (Q8_0) before MXFP4 ones, a few 0.1% per layer. Bound: 3% relative
    L2 error at every position, 1.5% in the median. Only a router's near-tie flipped by that rounding moves a position
    more (a different expert: 0.1 to 0.3 seen at margins of 0.004 and less), so positions whose router margin is under
    NEAR_TIE are left out of the 3% bound: 18 and 12 of the 178 here, a fifth at most. The adapter moves the logits
    several times the bound (asserted), so an export that dropped it, or mixed up gate and up, fails."""
    adapter, out, _ = merges[kind]
    model = llama(out / "model.gguf")
    errors, effects, agree, margins = [], [], [], []
    prompts = prompt_ids(real_tokenizer)
    for ids, want, without, margin in zip(prompts, *transformers_logits(base, adapter, prompts)):
        got = llama_logits(model, ids)
        errors += ((got - want).norm(dim=-1) / want.norm(dim=-1)).tolist()
        effects += ((without - want).norm(dim=-1) / want.norm(dim=-1)).tolist()
        top_two = want.topk(2).values.diff(dim=-1).abs().squeeze(-1)
        agree += ((got.argmax(-1) == want.argmax(-1)) | (top_two < 0.2) | (margin < NEAR_TIE)).tolist()
        margins += margin.tolist()
    errors, effects, tie = torch.tensor(errors), torch.tensor(effects), torch.tensor(margins) < NEAR_TIE
    print(f"{kind}: relative error median {errors.median():.4f} max {errors[~tie].max():.4f} ({errors.max():.4f} with "
          f"the {tie.sum()} router near-ties); adapter effect median {effects.median():.3f}; positions {len(errors)}")
    assert errors[~tie].max() <= 0.03 and errors.median() <= 0.015 and tie.sum() <= len(errors) // 5
    assert effects.min() >= 2 * 0.03
    assert all(agree)  # the top token is the same wherever transformers' top two are not within 0.2


def test_llama_cpp_jinja_template_renders_the_training_prompt(merges, real_tokenizer, pinned_date, monkeypatch):
    """The GGUF's template, rendered by llama-cpp-python's Jinja formatter, gives the harmony text train mode tokenizes
    (a training row whole, and an inference prompt)."""
    import llama_cpp.llama_chat_format as chat_format
    import transformers.utils.chat_template_utils as ctu

    model = llama(merges["attention"][1] / "model.gguf")
    template = model.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(template, eos_token="<|return|>", bos_token="<|startoftext|>",
                                    add_generation_prompt=False)
    row = sft.read_rows(str(sft.DEMO_DATASET))[0]
    messages = sft.row_to_messages(row)
    monkeypatch.setattr(chat_format, "datetime", ctu.datetime)  # the date pinned_date gives transformers
    want = real_tokenizer.apply_chat_template(messages, tokenize=False)
    assert formatter(messages=messages).prompt == want
    prompt = sft.build_chat(*PROMPTS[0])
    generation = Jinja2ChatFormatter(template, eos_token="<|return|>", bos_token="<|startoftext|>",
                                     add_generation_prompt=True)
    assert generation(messages=prompt).prompt == real_tokenizer.apply_chat_template(prompt, tokenize=False,
                                                                                   add_generation_prompt=True)


def test_a_tokenizer_llama_cpp_cannot_split_is_one_line_exit_2_nothing_written(merges, base, tmp_path):
    adapter = tmp_path / "adapter"
    import shutil

    shutil.copytree(merges["attention"][0], adapter)
    tokenizer = json.loads((adapter / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Whitespace"}
    (adapter / "tokenizer.json").write_text(json.dumps(tokenizer))
    before = snapshot(tmp_path)
    result = run_cli("--mode", "merge", "--merge-format", "gguf", "--adapter", str(adapter), "--model", str(base),
                     "--output", str(tmp_path / "merged"))
    assert_usage_error(result, "pre-tokenizer is not one llama.cpp knows")
    assert snapshot(tmp_path) == before


def test_without_the_gguf_package_it_is_one_line_exit_2_nothing_written(merges, base, tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    code = sft.main(["--mode", "merge", "--merge-format", "gguf", "--adapter", str(merges["attention"][0]), "--model",
                     str(base), "--output", str(tmp_path / "merged")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --merge-format gguf needs the gguf package: pip install -r "
                                 "requirements-serve.txt"]
    assert list(tmp_path.iterdir()) == []


def test_gguf_tensors_have_llama_cpps_layout_and_the_experts_decode_to_the_base(demo_merge):
    """The tensors, on the demo model's GGUF (the same writer; gguf's reader parses its 1k vocabulary in a second)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    from safetensors.torch import load_file

    base, _, merged = demo_merge
    reader = gguf.GGUFReader(merged / "model.gguf")
    assert reader.fields["gpt-oss.block_count"].contents() == 2
    tensors = {t.name: t for t in reader.tensors}
    types = {name: t.tensor_type.name for name, t in tensors.items()}
    assert types["blk.0.ffn_gate_exps.weight"] == types["blk.1.ffn_down_exps.weight"] == "MXFP4"
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == types["output.weight"] == "BF16"
    assert {types[n] for n in ("blk.0.ffn_gate_inp.weight", "blk.0.attn_sinks.weight", "blk.0.attn_norm.weight",
                               "blk.0.ffn_up_exps.bias", "blk.0.attn_q.bias")} == {"F32"}
    assert len(tensors) == 3 + 2 * 19  # embeddings, output, its norm; per layer 19, as the converter writes them

    # The experts decode (with gguf's own MXFP4 decoder, llama.cpp's reference) to exactly the values transformers
    # dequantizes from the base: even rows of gate_up are gate, odd rows up.
    state = load_file(base / "model.safetensors")
    for layer in (0, 1):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up = convert_moe_packed_tensors(state[prefix + "gate_up_proj_blocks"],
                                             state[prefix + "gate_up_proj_scales"],
                                             dtype=torch.float32).transpose(1, 2)  # [E, 2 * inner, hidden]
        down = convert_moe_packed_tensors(state[prefix + "down_proj_blocks"], state[prefix + "down_proj_scales"],
                                          dtype=torch.float32).transpose(1, 2)
        decoded = {n: torch.from_numpy(gguf.quants.dequantize(tensors[f"blk.{layer}.{n}.weight"].data,
                                                              gguf.GGMLQuantizationType.MXFP4))
                   for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}
        assert torch.equal(decoded["ffn_gate_exps"], gate_up[:, 0::2])
        assert torch.equal(decoded["ffn_up_exps"], gate_up[:, 1::2])
        assert torch.equal(decoded["ffn_down_exps"], down)
        bias = state[prefix + "gate_up_proj_bias"].float()
        assert torch.equal(torch.from_numpy(tensors[f"blk.{layer}.ffn_gate_exps.bias"].data.copy()), bias[:, 0::2])
        assert torch.equal(torch.from_numpy(tensors[f"blk.{layer}.ffn_up_exps.bias"].data.copy()), bias[:, 1::2])


def test_the_demo_model_exports_too_with_its_byte_level_tokenizer(demo_merge):
    """The demo's own 1k BPE (plain byte-level, llama.cpp's gpt-2 pre-tokenizer): the GGUF loads and llama.cpp
    splits the demo's training rows into the same ids as transformers."""
    from transformers import AutoTokenizer

    base, _, merged = demo_merge
    model = llama(merged / "model.gguf")
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert model.metadata["tokenizer.ggml.pre"] == "gpt-2"
    for row in sft.read_rows(str(sft.DEMO_DATASET))[:10]:
        text = tokenizer.apply_chat_template(sft.row_to_messages(row), tokenize=False)
        assert model.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(
            text, add_special_tokens=False)["input_ids"]


def test_tensor_check_reads_the_gguf_back_and_catches_a_wrong_or_missing_tensor(demo_merge, tmp_path):
    base, adapter, merged = demo_merge
    config, pairs = sft.read_lora_adapter(str(adapter))
    layout = sft.checkpoint_layout([base / "model.safetensors"])
    updates = sft.plan_updates(layout, config, pairs, str(adapter), str(base))
    # (on the file as written it passed: demo_merge.) A copy with one merged weight's bytes changed and layer 0's
    # router renamed in the header (llama.cpp would lack it)
    data = bytearray((merged / "model.gguf").read_bytes())
    v = next(t for t in gguf.GGUFReader(merged / "model.gguf").tensors if t.name == "blk.1.attn_v.weight")
    data[v.data_offset:v.data_offset + 64] = bytes(b ^ 0x40 for b in data[v.data_offset:v.data_offset + 64])
    assert data.count(b"blk.0.ffn_gate_inp.weight") == 1
    (tmp_path / "model.gguf").write_bytes(data.replace(b"blk.0.ffn_gate_inp.weight", b"blk.0.ffn_gate_inX.weight"))
    read, weight_map = sft.gguf_reader(tmp_path / "model.gguf", layout, False, 2)
    check = sft.check_merged_tensors(tmp_path, weight_map, layout, updates, False, read)
    assert not check["passed"] and check["worst_error_over_bound"] > 1
    assert check["missing"] == ["model.layers.0.mlp.router.weight"]
