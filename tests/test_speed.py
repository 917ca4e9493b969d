"""Speed features that must not change the maths: padding-free packing with per-row masks, the chunked loss,
and the preflight benchmark path (random init, synthetic data, the JSON summary line)."""

import json

import pytest
import torch

import gpt_oss_20b_sft as sft
from test_config import resolve, run_cli


@pytest.fixture(scope="module")
def tiny(demo_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model, attn_implementation="eager").eval()
    chats = sft.prepare_chats(sft.read_rows(str(sft.DEMO_DATASET)))[:3]
    examples, _ = sft.tokenize_chats(tokenizer, chats, max_length=512)
    return model, tokenizer, examples


def packed_inputs(examples):
    ids = torch.tensor([sum((e["input_ids"] for e in examples), [])])
    positions = torch.cat([torch.arange(len(e["input_ids"])) for e in examples])[None]
    return ids, positions


def assert_packed_rows_see_only_themselves(model, examples):
    """Packed with the hook's per-row masks, each row's logits equal the row run alone; without them the rows after
    the first attend to the rows before them (the leak the hook closes)."""
    ids, positions = packed_inputs(examples)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples]
        leaky = model(input_ids=ids, position_ids=positions).logits[0]
        hook = sft.attach_document_masks(model)
        try:
            packed = model(input_ids=ids, position_ids=positions).logits[0]
        finally:
            hook.remove()
    start = 0
    for i, logits in enumerate(alone):
        n = len(logits)
        torch.testing.assert_close(packed[start:start + n], logits, atol=1e-5, rtol=1e-5)
        if i > 0:
            assert (leaky[start:start + n] - logits).abs().max() > 1e-2
        start += n


def test_packed_rows_see_only_themselves(tiny):
    model, _, examples = tiny
    assert sorted({len(e["input_ids"]) for e in examples}) == sorted(len(e["input_ids"]) for e in examples)
    assert max(len(e["input_ids"]) for e in examples) > 128  # longer than the sliding window: both mask kinds used
    assert_packed_rows_see_only_themselves(model, examples)


def test_packed_rows_see_only_themselves_under_the_flex_block_mask(tiny, demo_model):
    """The mask the GPU default uses: the hook hands flex_attention a BlockMask. On CPU torch compiles flex for
    inference only and transformers refuses gpt-oss's sinks there, so this attention leaves the sinks out; they
    rescale each query's output by its own log-sum-exp, which no mask changes."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flex_attention_mask

    masks_seen = set()

    def flex_without_sinks(module, query, key, value, attention_mask, s_aux=None, **kwargs):
        masks_seen.add(type(attention_mask).__name__)
        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("flex_without_sinks", flex_without_sinks)
    ALL_MASK_ATTENTION_FUNCTIONS.register("flex_without_sinks", flex_attention_mask)
    model = AutoModelForCausalLM.from_pretrained(demo_model, attn_implementation="flex_without_sinks").eval()
    assert_packed_rows_see_only_themselves(model, tiny[2])
    assert masks_seen == {"BlockMask"}


def batch_loss(trainer, examples):
    batch = trainer._prepare_inputs(trainer.data_collator(examples))
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(labelled))
    return float(loss), labelled


@pytest.mark.parametrize("all_tokens", [False, True])
def test_same_loss_and_label_count_packed_padded_chunked_or_not(tiny, demo_model, tmp_path, all_tokens):
    from datasets import Dataset

    _, tokenizer, _ = tiny
    chats = sft.prepare_chats(sft.read_rows(str(sft.DEMO_DATASET)))[:4]
    examples, _ = sft.tokenize_chats(tokenizer, chats, max_length=512, train_on_all_tokens=all_tokens)
    results = {}
    for packing in (True, False):
        for chunked in (True, False):
            argv = ["--demo", "--model", str(demo_model), "--output_dir", str(tmp_path), "--report_to", "none",
                    "--packing" if packing else "--no-packing", "--chunked-loss" if chunked else "--no-chunked-loss"]
            cfg = resolve(*argv)
            model = sft.load_model(cfg, sft.load_model_config(cfg.model), on_cuda=False, training=True)
            if packing:
                sft.attach_document_masks(model)
            args = sft.build_sft_config(cfg, on_cuda=False)
            trainer = sft.make_trainer(cfg, model, tokenizer, Dataset.from_list(examples), args)
            trainer.model.eval()
            results[packing, chunked] = batch_loss(trainer, examples)
    expected_labels = sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    assert {labels for _, labels in results.values()} == {expected_labels}
    losses = [loss for loss, _ in results.values()]
    assert max(losses) - min(losses) < 1e-5, results


def test_chunked_loss_never_calls_the_full_lm_head(tiny, demo_model, tmp_path):
    from datasets import Dataset

    _, tokenizer, examples = tiny
    calls = {}
    for chunked in (True, False):
        cfg = resolve("--demo", "--model", str(demo_model), "--output_dir", str(tmp_path), "--report_to", "none",
                      "--chunked-loss" if chunked else "--no-chunked-loss")
        model = sft.load_model(cfg, sft.load_model_config(cfg.model), on_cuda=False, training=True)
        shapes = []
        model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
        trainer = sft.make_trainer(cfg, model, tokenizer, Dataset.from_list(examples), sft.build_sft_config(cfg, False))
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this step skips
        trainer.training_step(trainer.model, trainer._prepare_inputs(trainer.data_collator(examples[:2])))
        calls[chunked] = shapes
    vocab = tiny[0].config.vocab_size
    assert calls[True] == []  # the fused head projects only labelled positions, in tiles, from the weight itself
    assert len(calls[False]) == 1 and calls[False][0][-1] == vocab  # the baseline builds [batch, seq, vocab]


def test_synthetic_rows_follow_the_profile(real_tokenizer):
    rows = sft.synthetic_rows(200, seed=1)
    assert [r["reasoning_language"] for r in rows[:5]] == ["English", "French", "German", "Spanish", "Italian"]
    chats = sft.prepare_chats(rows)
    _, stats = sft.tokenize_chats(real_tokenizer, chats, max_length=100_000)
    mean = stats["tokens_per_epoch"] / stats["rows_used"]
    assert 1000 < mean < 1400, mean  # the profile's mean is 1,200 tokens
    _, capped = sft.tokenize_chats(real_tokenizer, chats, max_length=1024)
    assert 780 < capped["tokens_per_epoch"] / capped["rows_used"] < 920  # measured on the real data: 852


def test_preflight_prints_the_json_summary_line(tmp_path):
    out = run_cli("--demo", "--random-init", "--max-steps", "2", "--synthetic-data", "16", "--report_to", "none",
                  "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("{") and "tokens_per_second" in l)
    summary = json.loads(line)
    for key in ("tokens_per_second", "padded_tokens_per_second", "step_seconds", "projected_run_minutes", "gpu",
                "peak_memory_gib"):
        assert key in summary
    assert summary["gpu"] == "cpu" and set(summary["peak_memory_gib"]) == {"allocated", "reserved"}
    assert summary["optimizer_steps_per_run"] == 3  # ceil(16 / 16) x 3 epochs: projected for the configured run
    assert summary["tokens_per_second"] > 0 and summary["padded_tokens_per_second"] >= summary["tokens_per_second"]
    assert summary["rows"] == 16 and summary["packing"] is False


def test_speed_summary_before_any_step_is_valid_json(tiny):
    summary = sft.make_speed_meter(tiny[0]).summary(optimizer_steps_per_run=189)  # what an OOM in step 1 reports
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary
    assert summary["steps_measured"] == 0 and summary["optimizer_steps_per_run"] == 189
    assert summary["tokens_per_second"] is None and summary["projected_run_minutes"] is None


def test_baseline_flags_combine(tmp_path):
    cfg = json.loads(run_cli("--print-config", "--attn-implementation", "eager", "--no-packing",
                             "--no-chunked-loss").stdout)
    assert (cfg["attn_implementation"], cfg["packing"], cfg["chunked_loss"]) == ("eager", False, False)
    assert cfg["runtime"]["packing"] is False
    assert json.loads(run_cli("--print-config").stdout)["runtime"]["packing"] is False  # off by default
    out = run_cli("--demo", "--attn-implementation", "flex_attention", "--output_dir", str(tmp_path / "o"))
    assert out.returncode == 2 and "flex_attention applies gpt-oss's attention sinks on CUDA only" in out.stderr
