"""Train and infer end to end on the demo's tiny gpt-oss, on CPU, through the same code as the real run."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt_oss_20b_sft as sft
from conftest import SCRIPT, SHARED, SMALL, TRACKIO_DIR, demo_training, resolve, run_cli, snapshot


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_model):
    out = tmp_path_factory.mktemp("run") / "adapter"
    cfg = resolve("--demo", "--model", str(demo_model), "--output_dir", str(out), "--run_name", "test-run", *SMALL)
    trainer = sft.run_train(cfg)
    return out, trainer, cfg


def test_training_writes_the_adapter_and_reports(trained, tmp_path_factory):
    out, trainer, cfg = trained
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "run_summary.json", "loss_curve.png"} <= names
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["config"]["lora_r"] == 16 and summary["config"]["target_modules"] == ["q_proj", "v_proj"]
    assert summary["data"]["rows_used"] == 45 and summary["data"]["rows_truncated"] == 0
    assert summary["optimizer_steps"] == 9  # ceil(45 / (8 x 2)) x 3 epochs
    assert summary["versions"]["trl"].startswith("1.16") and summary["peak_gpu_memory_gib"] is None
    assert summary["tokens_seen"] > 3 * summary["data"]["labelled_tokens_per_epoch"] > 0
    assert summary["train_loss_last"] < summary["train_loss_first"]
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (16, 16)
    assert set(adapter_config["target_modules"]) == {"q_proj", "v_proj"}
    assert any(Path(TRACKIO_DIR).iterdir())  # trackio logged locally


def test_loss_is_on_assistant_tokens_and_aux_loss_is_off(trained):
    _, trainer, _ = trained
    assert trainer.router_aux_loss_coef == 0.0 and not trainer.aux_loss_enabled
    labels = trainer.train_dataset[0]["labels"]
    assert labels[0] == -100 and labels[-1] == trainer.processing_class.convert_tokens_to_ids("<|return|>")


def test_adapter_reloads_to_identical_logits(trained, demo_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, trainer, _ = trained
    ids = torch.tensor([trainer.train_dataset[0]["input_ids"][:64]])
    trained_model = trainer.model.eval()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model, attn_implementation="eager"),
                                         out).eval()
    base = AutoModelForCausalLM.from_pretrained(demo_model, attn_implementation="eager").eval()
    with torch.no_grad():
        a, b, c = trained_model(input_ids=ids).logits, reloaded(input_ids=ids).logits, base(input_ids=ids).logits
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3  # the adapter changed the model


def test_training_lowers_the_loss_on_the_whole_dataset(trained, demo_model):
    from transformers import AutoModelForCausalLM

    _, trainer, _ = trained
    base = AutoModelForCausalLM.from_pretrained(demo_model, attn_implementation="eager").eval()

    def mean_loss(model):
        total = count = 0
        with torch.no_grad():
            for example in trainer.train_dataset:
                ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
                n = int((labels[:, 1:] != -100).sum())
                total += model(input_ids=ids, labels=labels).loss.item() * n
                count += n
        return total / count

    before, after = mean_loss(base), mean_loss(trainer.model.eval())
    assert after < before - 0.2, (before, after)


@pytest.mark.slow
def test_infer_json_with_the_adapter(trained):
    out, _, _ = trained
    result = run_cli("--mode", "infer", "--adapter", str(out), "--prompt", "What is 15% of 240?",
                     "--reasoning-language", "Italian", "--temperature", "0", "--max_new_tokens", "40", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(payload) == {"reasoning_language", "analysis", "final", "complete", "tokens"}
    assert payload["reasoning_language"] == "Italian" and 0 < payload["tokens"] <= 40
    again = run_cli("--mode", "infer", "--adapter", str(out), "--prompt", "What is 15% of 240?",
                    "--reasoning-language", "Italian", "--temperature", "0", "--max_new_tokens", "40", "--json")
    assert again.stdout == result.stdout  # greedy decoding is reproducible


def test_infer_reads_the_prompt_from_stdin_and_raw_shows_the_transcript(trained):
    out, _, _ = trained
    result = run_cli("--mode", "infer", "--adapter", str(out), "--max_new_tokens", "8", "--raw",
                     "--reasoning-language", "French", stdin="Quelle heure est-il ?\n")
    assert result.returncode == 0, result.stderr
    assert ("<|start|>developer<|message|># Instructions\n\nreasoning language: French\n\n<|end|>"
            "<|start|>user<|message|>Quelle heure est-il ?<|end|><|start|>assistant") in result.stdout
    assert "warning" not in result.stderr  # asked with the effort it trained with


def test_infer_warns_when_asked_with_an_effort_the_adapter_never_saw(trained):
    out, trainer, _ = trained
    assert "Reasoning: medium" in trainer.processing_class.decode(trainer.train_dataset[0]["input_ids"])
    result = run_cli("--mode", "infer", "--adapter", str(out), "--max_new_tokens", "4", "--raw",
                     "--reasoning_effort", "high", "--prompt", "2+2?")
    assert result.returncode == 0 and "Reasoning: high" in result.stdout
    assert [line for line in result.stderr.splitlines() if "warning" in line] == [
        "warning: the adapter trained with 'Reasoning: medium'; --reasoning_effort high sends a system prompt it never saw"]


def test_expert_lora_through_target_parameters(tmp_path, demo_model):
    cfg = resolve("--demo", "--model", str(demo_model), "--output_dir", str(tmp_path / "out"), "--report_to", "none",
                  "--target_parameters", "mlp.experts.gate_up_proj,mlp.experts.down_proj", "--max_samples", "16",
                  "--num_train_epochs", "1")
    trainer = sft.run_train(cfg)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "out" / "adapter_model.safetensors")).keys()
    assert any("experts" in k and "lora_A" in k for k in keys)
    assert trainer.state.global_step == 1


def test_adapter_dir_that_is_not_lora(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = run_cli("--mode", "infer", "--adapter", str(tmp_path), "--prompt", "hi")
    assert result.returncode == 2
    assert result.stderr == (f"error: --adapter {tmp_path} is not a LoRA adapter directory (no adapter_config.json); "
                             "pass the --output_dir of a train run\n")


def test_missing_prompt_in_non_interactive_infer(trained):
    out, _, _ = trained
    result = run_cli("--mode", "infer", "--adapter", str(out), stdin="")
    assert result.returncode == 2
    assert result.stderr == "error: no prompt: pass --prompt \"...\" or pipe the question on stdin\n"


def test_a_model_that_is_not_gpt_oss(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16).save_pretrained(tmp_path)
    result = run_cli("--model", str(tmp_path), "--dataset", str(sft.DEMO_DATASET),
                     "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {tmp_path} is a 'llama' model, not gpt-oss;")
    assert not (tmp_path / "out").exists()


def test_full_model_without_a_gpu(tmp_path):
    if not (SHARED / "config.json").exists():
        pytest.skip("needs ../shared/gpt-oss-20b/config.json")
    shutil.copy(SHARED / "config.json", tmp_path / "config.json")
    result = run_cli("--model", str(tmp_path), "--dataset", str(sft.DEMO_DATASET), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr == (f"error: {tmp_path} has 20.9B parameters and there is no CUDA GPU here; training it needs "
                             "one with >= 80 GB (H100/H200). The demo (--demo) and tiny local models run on CPU\n")
    grpo = run_cli("--mode", "grpo", "--model", str(SHARED), "--random-init", "--synthetic-data", "4", "--output_dir",
                   str(tmp_path / "grpo"), "--report_to", "none", cwd=tmp_path)  # a preflight, refused before it builds
    assert grpo.returncode == 2 and not (tmp_path / "grpo").exists()
    assert grpo.stderr == result.stderr.replace(str(tmp_path), str(SHARED))


def test_hub_offline_is_one_line(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 set by the user; test_bad_inputs.py covers it unset with the Hub unreachable."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    result = run_cli("--mode", "infer", "--model", "openai/gpt-oss-20b", "--prompt", "hi", cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr == (
        "error: 'openai/gpt-oss-20b' is not a local directory and not in the Hugging Face cache, and the Hub is "
        "offline; connect to the Hub once or pass a local directory\n")


def test_eval_split_holds_out_rows_and_logs_an_evaluation_loss_each_epoch(tmp_path, demo_model):
    cfg = resolve("--demo", "--model", str(demo_model), "--output_dir", str(tmp_path / "out"), "--report_to", "none",
                  "--eval_split", "0.2", "--limit", "45", "--num_train_epochs", "2")
    sft.run_train(cfg)
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert (summary["data"]["rows_held_out"], summary["data"]["rows_used"]) == (9, 36)  # 45 rows in the sample
    assert len(summary["eval_loss"]) == 2 and all(loss > 0 for loss in summary["eval_loss"])
    assert resolve().eval_split is None  # the seed recipe holds out nothing


def test_the_demo_base_is_the_same_tensors_every_build(tmp_path, monkeypatch):
    """Built twice, the second time on another day, with another thread count and the other core busy, the tiny base
    is bit for bit the same, so every test and every user's demo starts from the same model. Its first 10
    pre-training steps: a sum that the thread count or the load could reorder shows in the first step."""
    import datetime

    from safetensors.torch import load_file
    from transformers.utils import chat_template_utils

    class NewYear(datetime.datetime):  # the chat template stamps today's date into every chat
        @classmethod
        def now(cls, tz=None):
            return cls(2031, 1, 1)

    monkeypatch.setattr(sft, "pretrain_demo_model", functools.partial(sft.pretrain_demo_model, steps=10))
    once = sft.build_demo_model(tmp_path / "once")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    threads = torch.get_num_threads()
    monkeypatch.setattr(chat_template_utils, "datetime", NewYear)
    try:
        torch.set_num_threads(2)
        again = sft.build_demo_model(tmp_path / "again")
    finally:
        torch.set_num_threads(threads)
        busy.kill()
    ours, theirs = load_file(str(once / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert ours.keys() == theirs.keys() and len(ours) > 30
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_demo_infer_answers_the_question_piped_to_it(demo_folder):
    tmp_path = demo_folder
    piped = run_cli("--mode", "infer", "--demo", "--raw", "--max_new_tokens", "4", cwd=tmp_path,
                    stdin="Wie spät ist es?\n")
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert "<|start|>user<|message|>Wie spät ist es?<|end|>" in piped.stdout
    nothing = run_cli("--mode", "infer", "--demo", "--raw", "--max_new_tokens", "4", cwd=tmp_path, stdin="")
    assert nothing.returncode == 0, nothing.stderr[-2000:]  # nothing piped: the demo's own question
    assert "<|start|>user<|message|>What is 7 plus 8?<|end|>" in nothing.stdout


@pytest.mark.slow
def test_nan_loss_stops_at_once_and_keeps_the_good_checkpoints(tmp_path):
    out = tmp_path / "run"
    result = run_cli("--mode", "train", "--demo", "--report_to", "none", "--learning_rate", "1e30",
                     "--save_steps", "1", "--output_dir", str(out))
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("The training loss became nan at step 3, so the run stopped there and saved no adapter.")
    assert f"the last good one runs with --adapter {out / 'checkpoint-2'}" in message
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert "Traceback" not in result.stderr


HUB_SUMMARY = {
    "config": {**sft.asdict(resolve()), "target_modules": ["q_proj", "v_proj"], "target_parameters": [],
               "hub_model_id": "you/gpt-oss-20b-multilingual-reasoner"},
    "versions": {"python": "3.11.7", "torch": "2.11.0", "trl": "1.16.0"},
    "device": "NVIDIA H100 80GB HBM3", "model_parameters": 20_914_757_184,
    "reasoning_languages": ["English", "French", "German", "Italian", "Spanish"],
    "data": {"rows_used": 1000, "rows_truncated": 119, "tokens_per_epoch": 1_114_254,
             "labelled_tokens_per_epoch": 900_000},
    "train_loss_first": 1.8123, "train_loss_last": 0.9876, "optimizer_steps": 189, "runtime_seconds": 1800.0,
    "peak_gpu_memory_gib": 46.7,
}


def test_model_card_renders_offline():
    card = sft.render_model_card(HUB_SUMMARY)
    front = card.split("---")[1]
    assert "base_model: openai/gpt-oss-20b" in front and "- HuggingFaceH4/Multilingual-Thinking" in front
    assert "language:\n- en\n- fr\n- de\n- it\n- es" in front and "library_name: peft" in front
    for line in ("| LoRA | r=16, alpha=16, dropout=0.0, modules q_proj, v_proj |",
                 "| batch | 8 per device x 2 accumulation |",
                 "| optimizer | adamw_torch_fused, lr 2e-05 cosine, warmup 0.1, weight decay 0.01 |",
                 "| training loss, first / last logged | 1.8123 / 0.9876 |", "| runtime | 30.0 min |",
                 "| peak GPU memory (allocated) | 46.7 GiB |", "| device | NVIDIA H100 80GB HBM3 |",
                 "--mode infer --adapter you/gpt-oss-20b-multilingual-reasoner --reasoning-language German"):
        assert line in card, line


@pytest.mark.slow
def test_training_writes_the_model_card_and_never_the_hub_token(tmp_path):
    secret = "hf_NotARealTokenButSecret0123456789"
    env = {**os.environ, "HF_TOKEN": secret, "HUGGING_FACE_HUB_TOKEN": secret}
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(SCRIPT), "--mode", "train", *demo_training(), "--max_steps", "2",
                             "--output_dir", str(out), "--run_name", "token-check"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    card = (out / "README.md").read_text()
    assert card.startswith("---\n# base model: local directory") and "reasoning languages in the training data" in card
    assert secret not in result.stdout + result.stderr
    for root in (out, sft.Path(TRACKIO_DIR)):
        for path in root.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    args = sft.build_sft_config(resolve("--demo"), sft.find_runtime(resolve("--demo")))
    assert args.push_to_hub is False and args.trackio_space_id is None  # nothing leaves the machine unasked
