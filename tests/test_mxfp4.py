"""--use_4bit: experts kept in MXFP4 and dequantized per layer give exactly the dequantized-bf16 model's numbers."""

import json

import pytest
import torch

import gpt_oss_20b_sft as sft
from conftest import SHARED, SMALL, load_to_train, resolve, run_cli


@pytest.fixture(scope="module")
def mxfp4_model(demo_model, tmp_path_factory):
    return sft.write_mxfp4_checkpoint(demo_model, tmp_path_factory.mktemp("mxfp4") / "tiny-gpt-oss-mxfp4")


def test_quantizer_round_trips_values_on_the_mxfp4_grid():
    from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors

    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 8, 64), generator=generator)  # [experts, out, in]
    exponents = torch.randint(-8, 3, (3, 8, 2, 1), generator=generator).float()
    rows = (torch.tensor(FP4_VALUES)[codes].reshape(3, 8, 2, 32) * torch.exp2(exponents)).reshape(3, 8, 64)
    rows[..., 0::32] = torch.where(rows[..., 0::32] == 0, 6.0 * torch.exp2(exponents[..., 0]), rows[..., 0::32])
    weight = rows.transpose(1, 2)  # [experts, in, out] as GptOssExperts holds it
    blocks, scales = sft.quantize_to_mxfp4(weight)
    assert blocks.shape == (3, 8, 2, 16) and scales.shape == (3, 8, 2) and blocks.dtype == scales.dtype == torch.uint8
    assert torch.equal(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32), weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows_per_chunk", [sft.MXFP4_ROWS_PER_CHUNK, 200])  # 200: one expert (of 5) per step
def test_one_pass_dequant_is_bit_identical_to_transformers(dtype, rows_per_chunk):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (5, 96, 3, 16), dtype=torch.uint8, generator=generator)
    for scales in (torch.randint(100, 140, (5, 96, 3), dtype=torch.uint8, generator=generator),  # the weights' range
                   torch.randint(0, 256, (5, 96, 3), dtype=torch.uint8, generator=generator)):  # every exponent
        ours = sft.dequantize_mxfp4(blocks, scales, dtype, rows_per_chunk)
        theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        assert ours.shape == theirs.shape == (5, 96, 96) and ours.is_contiguous() and ours.dtype == dtype
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32  # bit for bit, infinities included
        assert torch.equal(ours.view(bits), theirs.view(bits))
        assert torch.equal(ours, theirs) or not torch.isfinite(theirs).all()  # NaN-free: equal as values too


def test_mxfp4_checkpoint_has_the_hub_layout(mxfp4_model):
    from safetensors import safe_open

    config = json.loads((mxfp4_model / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    with safe_open(str(mxfp4_model / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.experts.gate_up_proj_blocks").shape == (4, 128, 2, 16)
        assert f.get_tensor("model.layers.0.mlp.experts.down_proj_scales").shape == (4, 64, 2)
    assert "model.layers.0.mlp.experts.gate_up_proj" not in keys and "model.layers.1.mlp.experts.down_proj_bias" in keys


def reference_and_4bit(mxfp4_model):
    from transformers import AutoConfig, AutoModelForCausalLM, Mxfp4Config

    reference = AutoModelForCausalLM.from_pretrained(mxfp4_model, quantization_config=Mxfp4Config(dequantize=True),
                                                     dtype=torch.float32, attn_implementation="eager")
    cfg = resolve("--use_4bit", "--model", str(mxfp4_model))
    four_bit = load_to_train(cfg, AutoConfig.from_pretrained(mxfp4_model))
    return reference, four_bit


@pytest.mark.parametrize("rows_per_chunk", [sft.MXFP4_ROWS_PER_CHUNK, 100])  # 100: several chunks, a ragged last one
def test_logits_loss_and_lora_gradients_equal_the_dequantized_path(mxfp4_model, monkeypatch, rows_per_chunk):
    from peft import get_peft_model

    monkeypatch.setattr(sft, "MXFP4_ROWS_PER_CHUNK", rows_per_chunk)
    reference, four_bit = reference_and_4bit(mxfp4_model)
    experts = four_bit.model.layers[0].mlp.experts
    assert experts.gate_up_proj_blocks.dtype == torch.uint8 and "gate_up_proj" not in dict(experts.named_parameters())
    ids = torch.randint(0, reference.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (reference, four_bit):
        torch.manual_seed(0)
        peft_model = get_peft_model(model, sft.build_lora_config(resolve()))
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.enable_input_require_grads()
        peft_model.train()
        for module in peft_model.modules():
            if hasattr(module, "lora_B"):
                for b in module.lora_B.values():
                    torch.nn.init.normal_(b.weight, std=0.02)  # so that lora_A gets gradients too
        out = peft_model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), out.loss.detach(), grads))
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = results
    assert torch.equal(logits_a, logits_b) and torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 8  # q and v, A and B, 2 layers
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.slow
def test_training_through_the_4bit_path_lowers_the_loss(mxfp4_model, tmp_path):
    out = tmp_path / "adapter"
    trainer = sft.run_train(resolve("--demo", "--use_4bit", "--model", str(mxfp4_model), "--output_dir", str(out),
                                    "--report_to", "none", *SMALL))
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["train_loss_last"] < summary["train_loss_first"] and summary["optimizer_steps"] == 9
    experts = trainer.model.base_model.model.model.layers[1].mlp.experts
    assert experts.down_proj_blocks.dtype == torch.uint8  # trained without ever holding bf16 experts as weights
    result = run_cli("--mode", "infer", "--use_4bit", "--adapter", str(out), "--prompt", "What is 7 x 8?", "--json",
                     "--max_new_tokens", "16", "--temperature", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert 0 < answer["tokens"] <= 16 and answer["reasoning_language"] == "English"  # a stop token may end it sooner


def test_random_init_builds_mxfp4_experts_from_the_config(demo_model):
    from transformers import AutoConfig

    cfg = resolve("--use_4bit", "--random-init", "--model", str(demo_model))
    model = load_to_train(cfg, AutoConfig.from_pretrained(demo_model))
    assert model.model.layers[0].mlp.experts.gate_up_proj_scales.unique().tolist() == [122]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()


GPT_OSS_120B = dict(num_hidden_layers=36, num_local_experts=128, layer_types=["sliding_attention", "full_attention"] * 18)


@pytest.mark.parametrize("overrides, bf16_gb, four_bit_gb", [({}, (41.5, 42.0), (13.5, 14.0)),
                                                             (GPT_OSS_120B, (233, 234), (65, 66))], ids=["20b", "120b"])
def test_weights_of_the_real_shapes_in_4bit(real_tokenizer, overrides, bf16_gb, four_bit_gb):
    """Computed on the meta device from the real config (120b: its 36 layers and 128 experts), not measured."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = sft.unquantized_config(AutoConfig.from_pretrained(SHARED), **overrides)
    size = lambda m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()]) / 1e9
    with torch.device("meta"):
        bf16 = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        four_bit = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        for layer in four_bit.model.layers:
            layer.mlp.experts = sft.mxfp4_experts_class()(four_bit.config)
    assert bf16_gb[0] < size(bf16) < bf16_gb[1] and four_bit_gb[0] < size(four_bit) < four_bit_gb[1]


@pytest.mark.parametrize("argv, needle", [
    (["--mode", "train", "--use_4bit", "--target_parameters", "mlp.experts.down_proj"],
     "--use_4bit keeps the expert weights in MXFP4, so LoRA cannot train them"),
    (["--mode", "merge", "--adapter", "x", "--use_4bit"], "--use_4bit is a train, infer, chat, eval and grpo setting; "
                                                          "--mode merge does not read it"),  # merge keeps MXFP4 itself
])
def test_4bit_flag_combinations_that_cannot_work(tmp_path, argv, needle):
    result = run_cli(*argv, cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_4bit_on_a_checkpoint_without_mxfp4_experts(tmp_path, demo_model):
    result = run_cli("--mode", "infer", "--use_4bit", "--model", str(demo_model), "--prompt", "hi", cwd=tmp_path)
    assert result.returncode == 2 and list(tmp_path.iterdir()) == []
    assert result.stderr.strip() == (f"error: --use_4bit keeps the experts in MXFP4 as gpt-oss ships them, but "
                                     f"{demo_model}'s experts are not MXFP4 (no mxfp4 quantization_config); drop "
                                     "--use_4bit")
