"""Speed features that must not change the maths: padding-free packing with per-row masks, the chunked loss,
and the preflight benchmark path (random init, synthetic data, the JSON summary line)."""

import json
import subprocess
import sys

import pytest
import torch

import gpt_oss_20b_sft as sft
from conftest import SCRIPT, SMALL, assert_usage_error, load_to_train, resolve, run_cli, write_jsonl


@pytest.fixture(scope="module")
def tiny(demo_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model, attn_implementation="eager").eval()
    chats = sft.prepare_chats(sft.read_rows(str(sft.DEMO_DATASET)))[:3]
    examples, _ = sft.tokenize_chats(tokenizer, chats, max_length=512)
    return model, tokenizer, examples


@pytest.fixture
def static_flex_compile():
    """Each length compiles static: torch 2.13's CPU flex template emits C++ that does not build for dynamic shapes
    with a packed mask_mod (transformers' own too); the GPU's Triton path is another template."""
    import torch._dynamo

    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        yield


def packed_inputs(examples):
    ids = torch.tensor([sum((e["input_ids"] for e in examples), [])])
    positions = torch.cat([torch.arange(len(e["input_ids"])) for e in examples])[None]
    return ids, positions


def assert_packed_rows_see_only_themselves(model, examples, show_the_leak=True, alone_by=None):
    """Packed with the hook's per-row masks, each row's logits equal the row run alone (by alone_by, default the same
    model); without them the rows after the first attend to the rows before them (the leak the hook closes)."""
    ids, positions = packed_inputs(examples)
    with torch.no_grad():
        alone = [(alone_by or model)(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples]
        leaky = model(input_ids=ids, position_ids=positions).logits[0] if show_the_leak else None
        hook = sft.attach_document_masks(model)
        try:
            packed = model(input_ids=ids, position_ids=positions).logits[0]
        finally:
            hook.remove()
    start = 0
    for i, logits in enumerate(alone):
        n = len(logits)
        # float32 sums in another order (flex against eager) differ by a few ulps of the largest logits; a leak, by
        # more than 1e-2
        torch.testing.assert_close(packed[start:start + n], logits, atol=5e-5, rtol=1e-5)
        if i > 0 and show_the_leak:
            assert (leaky[start:start + n] - logits).abs().max() > 1e-2
        start += n


def test_packed_rows_see_only_themselves(tiny):
    model, _, examples = tiny
    assert sorted({len(e["input_ids"]) for e in examples}) == sorted(len(e["input_ids"]) for e in examples)
    assert max(len(e["input_ids"]) for e in examples) > 128  # longer than the sliding window: both mask kinds used
    assert_packed_rows_see_only_themselves(model, examples)


@pytest.fixture(scope="module")
def without_sinks(demo_model):
    """The demo model under flex attention, as the GPU default runs it but without gpt-oss's sinks (on CPU torch
    compiles flex for inference only, and transformers refuses the sinks there), and its eager twin with the sinks at
    -inf (each adds exp(-inf) = 0 to its softmax): the same maths, the reference. Each flex call's mask is kept."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flex_attention_mask

    masks_seen = []

    def flex_without_sinks(module, query, key, value, attention_mask, s_aux=None, **kwargs):
        masks_seen.append(attention_mask)
        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("flex_without_sinks", flex_without_sinks)
    ALL_MASK_ATTENTION_FUNCTIONS.register("flex_without_sinks", flex_attention_mask)
    flex = AutoModelForCausalLM.from_pretrained(demo_model, attn_implementation="flex_without_sinks").eval()
    eager = AutoModelForCausalLM.from_pretrained(demo_model, attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in eager.model.layers:
            layer.self_attn.sinks.fill_(float("-inf"))
    return flex, eager, masks_seen


@pytest.mark.slow
def test_packed_rows_see_only_themselves_under_the_flex_block_mask(tiny, without_sinks, static_flex_compile):
    """The mask the GPU default uses: the hook hands flex_attention a BlockMask, and each packed row's logits equal
    the row's alone (eager, the reference): flex compiles for the packed row's two masks only, as each new length or
    mask is a compile on CPU. The leak without the hook: the eager test above, on the same rows."""
    flex, eager, masks_seen = without_sinks
    masks_seen.clear()
    assert_packed_rows_see_only_themselves(flex, tiny[2], show_the_leak=False, alone_by=eager)
    assert masks_seen and {type(mask).__name__ for mask in masks_seen} == {"BlockMask"}


def test_document_block_mask_equals_transformers_builder(demo_model):
    """Built from the boundaries, the packed row's BlockMasks (causal and sliding) hold the tables transformers'
    compiled builder makes from the dense mask, and their mask_mod is the same dense mask."""
    from torch.nn.attention.flex_attention import create_mask
    from transformers import AutoConfig
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = AutoConfig.from_pretrained(demo_model, attn_implementation="flex_attention")
    # ragged ends, rows on block edges, one row; 700 tokens each, as transformers' builder compiles per length
    for lengths in ([300, 57, 330, 13], [1, 128, 256, 5, 310], [700]):
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        kwargs = dict(config=config, inputs_embeds=torch.zeros(1, positions.shape[1], 4), attention_mask=None,
                      past_key_values=None, position_ids=positions)
        for window, theirs in ((None, create_causal_mask(**kwargs)),
                               (config.sliding_window, create_sliding_window_causal_mask(**kwargs))):
            ours = sft.document_block_mask(positions, window)
            assert type(ours) is type(theirs) and ours.BLOCK_SIZE == theirs.BLOCK_SIZE
            assert ours.seq_lengths == theirs.seq_lengths
            for mine, reference in zip(ours.as_tuple()[:-1], theirs.as_tuple()[:-1]):  # every table but mask_mod
                assert torch.equal(mine, reference) if isinstance(mine, torch.Tensor) else mine == reference
            n = positions.shape[1]
            # on the CPU: torch's default device is the build's accelerator, cuda on a CUDA build without a GPU
            assert torch.equal(create_mask(ours.mask_mod, 1, 1, n, n, device="cpu"),
                               create_mask(theirs.mask_mod, 1, 1, n, n, device="cpu"))


@pytest.mark.slow
def test_right_padded_flex_batches_need_no_padding_mask(tiny, without_sinks, static_flex_compile):
    """A right-padded batch under the hook's cached causal BlockMask (no padding term, one per length, shared by the
    rows) gives the real tokens the logits and the loss transformers' padded mask gives them (eager, the reference)."""
    flex, eager, masks_seen = without_sinks
    rows = [e["input_ids"] for e in tiny[2]]
    length = -(-max(map(len, rows)) // sft.FLEX_BLOCK) * sft.FLEX_BLOCK  # a bucket, as the collator pads on the GPU
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    padding = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    labels = torch.where(padding.bool(), ids, -100)
    with torch.no_grad():
        reference = eager(input_ids=ids, attention_mask=padding, labels=labels)
        masks_seen.clear()
        hook = sft.attach_document_masks(flex)
        try:
            ours = flex(input_ids=ids, attention_mask=padding, labels=labels)
            again = flex(input_ids=ids.flip(0), attention_mask=padding.flip(0))
        finally:
            hook.remove()
    assert len(masks_seen) == 4  # two layers, two batches
    assert masks_seen[-1] is masks_seen[-3] and masks_seen[-1].shape[0] == 1  # cached by length, broadcast over rows
    real = padding.bool()
    torch.testing.assert_close(ours.logits[real], reference.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.loss, reference.loss, atol=1e-6, rtol=1e-6)
    assert again.logits.shape == ours.logits.shape


def test_hitting_the_recompile_limit_is_said_in_one_line(capsys):
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False):
        sft.watch_recompiles(limit=1)
        double = torch.compile(lambda x: x * 2)
        for n in (3, 4, 5):  # a new static shape each call: the second is past the limit
            assert torch.equal(double(torch.ones(n)), torch.full((n,), 2.0))
    notes = [l for l in capsys.readouterr().err.splitlines() if l.startswith("note: torch.compile hit")]
    assert notes and notes[0].startswith("note: torch.compile hit its recompile limit (1)")


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
            model = load_to_train(cfg)
            if packing:
                sft.attach_document_masks(model)
            args = sft.build_sft_config(cfg, sft.find_runtime(cfg))
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
        model = load_to_train(cfg)
        shapes = []
        model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
        args = sft.build_sft_config(cfg, sft.find_runtime(cfg))
        trainer = sft.make_trainer(cfg, model, tokenizer, Dataset.from_list(examples), args)
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
    fitted = sft.prepare_chats(sft.synthetic_rows(200, seed=1, max_tokens=1024))  # what a run at 1,024 tokens makes
    _, made = sft.tokenize_chats(real_tokenizer, fitted, max_length=100_000)
    assert 780 < made["tokens_per_epoch"] / made["rows_used"] < 920 and made["longest_row_tokens"] <= 1024 * 1.1


@pytest.mark.slow
def test_preflight_prints_the_json_summary_line(tmp_path):
    out = run_cli("--demo", "--random-init", "--max-steps", "2", "--synthetic-data", "16", "--report_to", "none",
                  "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("{") and "tokens_per_second" in l)
    summary = json.loads(line)
    assert json.loads((tmp_path / "out" / "speed.json").read_text()) == summary  # what bench/benchmark.sh reads
    assert line == out.stdout.strip().splitlines()[-1] and not (tmp_path / "out" / "eval").exists()  # no demo answer
    for key in ("tokens_per_second", "padded_tokens_per_second", "step_seconds", "projected_run_minutes", "gpu",
                "peak_memory_gib"):
        assert key in summary
    assert summary["gpu"] == "cpu" and set(summary["peak_memory_gib"]) == {"allocated", "reserved"}
    assert summary["optimizer_steps_per_run"] == 10  # ceil(16 / 16) x the demo's 10 epochs: the configured run
    assert summary["tokens_per_second"] > 0 and summary["padded_tokens_per_second"] >= summary["tokens_per_second"]
    assert summary["rows"] == 16 and summary["packing"] is False and summary["sampler"] == "batch_rebalance"
    assert summary["compile"] is False and summary["recompute_every_nth_layer"] == 1
    assert summary["experts_implementation"] == "grouped_mm"  # transformers' default; it falls back to eager silently


def one_step_gradients(cfg, tokenizer, examples, checkpointed: list | None = None, callbacks=()):
    """LoRA gradients of one optimizer step over all the examples, and the tokens the model computed on (and, into
    checkpointed, which decoder layers recomputed their activations)."""
    from datasets import Dataset
    from transformers import TrainerCallback

    class KeepGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    runtime = sft.find_runtime(cfg)
    model = sft.training_model(cfg, sft.load_model_config(cfg.model), runtime)
    meter, keep = sft.make_speed_meter(model, runtime), KeepGradients()
    trainer = sft.make_trainer(cfg, model, tokenizer, Dataset.from_list(examples), sft.build_sft_config(cfg, runtime),
                               callbacks=[meter, keep, *callbacks])
    trainer.train()
    if checkpointed is not None:
        checkpointed += [layer.gradient_checkpointing for layer in model.model.layers]
    (_, real, padded), = meter.steps
    return keep.grads, real, padded


@pytest.mark.parametrize("sampler", ["batch_rebalance", "group_by_length"])
def test_samplers_split_a_step_differently_but_give_its_gradient(tiny, demo_model, tmp_path, sampler):
    """One optimizer step (16 rows, 2 micro-batches of 8 under random): the loss is normalised over the whole step,
    so however the rows are split into micro-batches, the LoRA gradients are the same; the split pads less."""
    _, tokenizer, _ = tiny
    chats = sft.prepare_chats(sft.read_rows(str(sft.DEMO_DATASET)))[:16]
    examples, _ = sft.tokenize_chats(tokenizer, chats, max_length=512)
    found = {}
    for name in ("random", sampler):
        cfg = resolve("--demo", "--model", str(demo_model), "--output_dir", str(tmp_path / name), "--report_to", "none",
                      "--max-steps", "1", "--sampler", name)
        found[name] = one_step_gradients(cfg, tokenizer, examples)
    (reference, real, padded), (grads, real_split, padded_split) = found["random"], found[sampler]
    assert real_split == real == sum(len(e["input_ids"]) for e in examples)
    assert padded_split < padded
    layers = tiny[0].config.num_hidden_layers
    assert reference.keys() == grads.keys() and len(grads) == 4 * layers  # q_proj and v_proj, lora_A and lora_B
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-4, atol=1e-7)


def test_recompute_every_nth_layer_keeps_the_gradients(tiny, demo_model, tmp_path):
    _, tokenizer, examples = tiny
    found = {}
    for every in ("1", "2"):
        cfg = resolve("--demo", "--model", str(demo_model), "--output_dir", str(tmp_path / every), "--report_to", "none",
                      "--max-steps", "1", "--gradient-checkpointing", "--recompute-every-nth-layer", every)  # off in the demo
        layers = []
        found[every] = one_step_gradients(cfg, tokenizer, examples, layers)[0], layers
    assert found["1"][1] == [True, True] and found["2"][1] == [True, False]  # the demo's two layers
    reference, grads = found["1"][0], found["2"][0]
    assert reference.keys() == grads.keys() and len(grads) == 8
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_compiled_moe_blocks_give_eager_loss_and_lora_gradients(tiny, demo_model, tmp_path):
    """--compile (fp32 on CPU): one optimizer step's loss and LoRA gradients equal eager's to 1e-5, experts and
    router included (LoRA on the attention and on the experts' down_proj)."""
    from torch._dynamo.utils import counters
    from transformers import TrainerCallback

    _, tokenizer, examples = tiny
    found = {}
    counters.clear()
    for flag in ("--no-compile", "--compile"):
        cfg = resolve("--demo", "--model", str(demo_model), "--output_dir", str(tmp_path / flag), "--report_to", "none",
                      "--max-steps", "1", "--target_parameters", "mlp.experts.down_proj", flag)
        losses = []

        class KeepLoss(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                losses.append(logs.get("loss"))

        found[flag] = one_step_gradients(cfg, tokenizer, examples, callbacks=[KeepLoss()])[0], losses[0]
    (reference, loss), (grads, compiled_loss) = found["--no-compile"], found["--compile"]
    assert counters["stats"]["unique_graphs"] >= 1  # the MoE blocks ran compiled
    assert abs(compiled_loss - loss) < 1e-5
    assert reference.keys() == grads.keys() and len(grads) == 12  # q, v and experts' down_proj: A and B, 2 layers
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_batch_rebalance_trains_on_the_same_rows_per_step_as_random(demo_model, tmp_path):
    """The default sampler keeps the seed's maths: for any --seed, each optimizer step gets the rows the random
    sampler gives it (so the same per-step losses, over 3 epochs), split into micro-batches with less padding."""
    losses, real_share = {}, {}
    for sampler in ("random", "batch_rebalance"):
        out = tmp_path / sampler
        cfg = resolve("--demo", "--model", str(demo_model), "--seed", "7", "--sampler", sampler, "--report_to", "none",
                      "--output_dir", str(out), *SMALL)
        trainer = sft.run_train(cfg)
        losses[sampler] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        real_share[sampler] = json.loads((out / "run_summary.json").read_text())["speed"]["real_token_share"]
    assert len(losses["random"]) == 9  # 45 rows: 3 steps of 16, 16 and 13 rows, 3 epochs
    assert losses["batch_rebalance"] == pytest.approx(losses["random"], rel=1e-4)
    assert real_share["batch_rebalance"] > real_share["random"]


def test_batch_rebalance_steps_aside_where_it_would_repeat_rows():
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    # What it would do: 17 rows, steps of 16 in 2 micro-batches; the last step's one row cannot fill two.
    batches = list(BatchRebalanceSampler(lengths=list(range(1, 18)), effective_batch_size=16, dp_size=1, grad_accum=2,
                                         drop_last=False))
    assert sum(len(b) for b in batches) == 18 and len({i for b in batches for i in b}) == 17
    cfg = resolve()  # batch 8 x accumulation 2
    assert [sft.sampler_for(cfg, rows) for rows in (16, 17, 18, 31, 1000)] == [
        "batch_rebalance", "random", "batch_rebalance", "batch_rebalance", "batch_rebalance"]
    # 4 processes: 64 rows a step in 8 micro-batches, so a last step of 1-7 rows would repeat rows
    assert [sft.sampler_for(cfg, rows, processes=4) for rows in (33, 65, 71, 72)] == [
        "batch_rebalance", "random", "random", "batch_rebalance"]
    assert sft.sampler_for(resolve("--sampler", "group_by_length"), 17) == "group_by_length"


def test_speed_summary_before_any_step_is_valid_json(tiny):
    meter = sft.make_speed_meter(tiny[0], sft.find_runtime(resolve()))
    summary = meter.summary(optimizer_steps_per_run=189)  # what an OOM in step 1 reports
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary
    assert summary["steps_measured"] == 0 and summary["optimizer_steps_per_run"] == 189
    assert summary["tokens_per_second"] is None and summary["projected_run_minutes"] is None


def test_baseline_flags_combine(tmp_path):
    cfg = json.loads(run_cli("--print-config", "--json", "--attn-implementation", "eager", "--no-packing",
                             "--no-chunked-loss").stdout)
    assert (cfg["attn_implementation"], cfg["packing"], cfg["chunked_loss"]) == ("eager", False, False)
    assert cfg["runtime"]["packing"] is False
    assert json.loads(run_cli("--print-config", "--json").stdout)["runtime"]["packing"] is False  # off by default
    assert resolve("--sampler", "random").sampler == "random"
    out = run_cli("--print-config", "--sampler", "sorted")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--sampler: invalid choice: 'sorted'" in out.stderr
    out = run_cli("--demo", "--attn-implementation", "flex_attention", "--output_dir", str(tmp_path / "o"))
    assert out.returncode == 2 and "flex_attention applies gpt-oss's attention sinks on CUDA only" in out.stderr


NOT_ON_THE_GPU_NODE = ("lingua", "langcodes", "language_data", "trackio", "openai_harmony", "deepspeed")


def run_without(packages, *args, cwd, stdin=None):
    """The script in a new process where these packages cannot be imported (find_spec answers None), as on an offline
    GPU node whose image lacks them."""
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({packages!r})); sys.argv[0] = {str(SCRIPT)!r}; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, input=stdin,
                          timeout=600)


@pytest.mark.slow
def test_train_infer_chat_and_merge_need_nothing_that_only_eval_needs(tmp_path):
    train = run_without(NOT_ON_THE_GPU_NODE, "--demo", "--report_to", "none", "--output_dir", "out",
                        "--reasoning-languages", "deutsch,en,fr,it,es", "--max-steps", "1", cwd=tmp_path)
    assert train.returncode == 0 and "Error" not in train.stderr, train.stderr[-3000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "run_summary.json").read_text())["config"]["reasoning_languages"] == [
        "German", "English", "French", "Italian", "Spanish"]  # names from the table, without langcodes
    assert "language:\n- en\n- fr\n- de\n- it\n- es\n" in (tmp_path / "out" / "README.md").read_text()  # codes from the table
    chat = run_without(NOT_ON_THE_GPU_NODE, "--mode", "chat", "--demo", "--adapter", "out", "--max_new_tokens", "8",
                       cwd=tmp_path, stdin="What is 7 x 8?\n/lang fr\n/exit\n")
    merge = run_without(NOT_ON_THE_GPU_NODE, "--mode", "merge", "--demo", "--adapter", "out", cwd=tmp_path)
    assert chat.returncode == 0 and "reasoning language: French" in chat.stdout, chat.stdout + chat.stderr[-2000:]
    assert merge.returncode == 0 and (tmp_path / "out-merged" / "merge_check.json").is_file(), merge.stderr


@pytest.mark.slow
def test_a_grpo_preflight_runs_without_lingua_and_writes_its_speed(tmp_path, demo_model):
    """bench/device_run.sh's GRPO row, as a GPU node without lingua runs it: random weights, generated prompts, the
    format reward alone; speed.json counts the rollouts' tokens (random weights never stop: every completion is full)."""
    flags = ["--mode", "grpo", "--model", str(demo_model), "--random-init", "--synthetic-data", "4", "--num_generations",
             "4", "--batch_size", "4", "--gradient_accumulation_steps", "1", "--max_completion_length", "16",
             "--max_steps", "3", "--report_to", "none", "--output_dir", "out"]
    refused = run_without(("lingua",), *flags, cwd=tmp_path)
    assert_usage_error(refused, "--mode grpo rewards the reasoning's language with lingua: pip install "
                                "lingua-language-detector (or --language_reward 0 --answer_language_reward 0)")
    result = run_without(NOT_ON_THE_GPU_NODE, *flags, "--language_reward", "0", "--answer_language_reward", "0",
                         cwd=tmp_path)
    assert result.returncode == 0 and "Error" not in result.stderr, result.stderr[-3000:]
    speed = json.loads((tmp_path / "out" / "speed.json").read_text())
    assert json.loads(result.stdout.strip().splitlines()[-1]) == speed
    assert (speed["steps_measured"], speed["completion_tokens_per_step"], speed["optimizer_steps_per_run"]) == (2, 64, 4)
    assert speed["rollout_tokens_per_second"] > 0 and speed["step_seconds"] > 0 and speed["gpu"] == "cpu"
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["speed"] == speed and summary["prompts"] == 4 and summary["reasoning_languages"] == [
        "English", "French", "German", "Spanish"]  # the generated rows' own languages
    logged = set(summary["per_step"][0])  # the rewards that ran: those with a weight
    assert {"rewards/format/mean", "rewards/correctness/mean"} <= logged and not any("language" in k for k in logged)


def test_eval_without_lingua_is_one_line(tmp_path):
    scores = write_jsonl(tmp_path / "outs.jsonl", [{"reasoning_language": "German", "analysis": "Ich denke.", "final": "4"}])
    result = run_without(("lingua",), "--mode", "eval", "--score-file", scores, cwd=tmp_path)
    assert_usage_error(result, "--mode eval detects the languages with lingua: pip install lingua-language-detector")


def test_out_of_memory_advice_names_the_flags_for_each_mode():
    train = sft.out_of_memory_advice(resolve(), 79.1, 79.2, "NVIDIA H100 80GB HBM3")
    assert train.startswith("CUDA ran out of memory during training (peak 79.1 GiB allocated of 79.2 GiB on NVIDIA H100")
    assert "--batch_size 4 --gradient_accumulation_steps 4 (same effective batch), --max_seq_length 1024" in train
    evaluation = sft.out_of_memory_advice(resolve("--mode", "eval"), 70.0, 79.2, "H100")
    assert "--max_new_tokens 512, --eval_batch_size 16, --use_4bit (the weights take 14 GB instead of 42 GB" in evaluation
    assert "--use_4bit" not in sft.out_of_memory_advice(resolve("--mode", "eval", "--use_4bit"), 1, 2, "x")
    assert "whole model in bf16 (about 42 GB for gpt-oss-20b)" in sft.out_of_memory_advice(resolve("--mode", "merge", "--demo"),
                                                            70.0, 79.2, "H100")


def test_out_of_memory_becomes_one_paragraph_exit_1(monkeypatch, capsys):
    def run_out_of_memory(cfg, runtime):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.07 GiB")

    monkeypatch.setattr(sft.MODES["infer"], "run", run_out_of_memory)  # stands in for the GPU
    monkeypatch.setattr(sft, "gpu_memory_state", lambda: (77.5, 79.2, "NVIDIA H100 80GB HBM3"))
    assert sft.main(["--mode", "infer", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("CUDA ran out of memory during inference (peak 77.5 GiB")
    assert "--max_new_tokens 256, --use_4bit" in err and len(err.splitlines()) == 1
