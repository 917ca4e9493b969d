"""Flags, defaults and the one-line errors for bad configuration."""

import json
import subprocess
import sys

import pytest

import gpt_oss_20b_sft as sft
from conftest import ROOT, SCRIPT


def run_cli(*args, cwd=ROOT, stdin=None, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          input=stdin, timeout=timeout)


def resolve(*argv):
    return sft.resolve_config(sft.build_parser().parse_args(list(argv)))


def test_print_config_shows_the_seed_recipe():
    out = run_cli("--mode", "train", "--print-config")
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)
    expected = dict(mode="train", model="openai/gpt-oss-20b", dataset="HuggingFaceH4/Multilingual-Thinking",
                    lora_r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"], target_parameters=[],
                    batch_size=8, gradient_accumulation_steps=2, learning_rate=2e-5, lr_scheduler_type="cosine",
                    warmup_ratio=0.1, num_train_epochs=3.0, max_seq_length=2048, optim="adamw_torch_fused",
                    weight_decay=0.01, gradient_checkpointing=True, train_on_all_tokens=False,
                    router_aux_loss_coef=0.0, report_to="trackio", push_to_hub=False)
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["runtime"] == {"device": "cpu", "dtype": "float32", "attn_implementation": "eager", "experts": "bf16",
                              "packing": False, "sampler": "batch_rebalance", "world_size": 1, "strategy": "single", "effective_batch_size": 16}


def test_print_config_writes_nothing(tmp_path):
    out = run_cli("--print-config", "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert out.returncode == 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spelling", ["underscore", "hyphen"])
def test_seed_flags_in_both_spellings(spelling):
    flags = {"batch_size": "4", "max_seq_length": "1536", "learning_rate": "1e-4", "num_train_epochs": "1",
             "output_dir": "x", "lora_r": "8", "reasoning_language": "Chinese"}
    argv = []
    for name, value in flags.items():
        argv += [f"--{name if spelling == 'underscore' else name.replace('_', '-')}", value]
    cfg = resolve(*argv, "--gradient_checkpointing" if spelling == "underscore" else "--no-gradient-checkpointing")
    assert (cfg.batch_size, cfg.max_seq_length, cfg.learning_rate, cfg.num_train_epochs) == (4, 1536, 1e-4, 1.0)
    assert (cfg.output_dir, cfg.lora_r, cfg.reasoning_language) == ("x", 8, "Chinese")
    assert cfg.gradient_checkpointing is (spelling == "underscore")


def test_lists_and_expert_targets():
    cfg = resolve("--target_parameters", "mlp.experts.gate_up_proj, mlp.experts.down_proj",
                  "--reasoning-languages", "French,German")
    assert cfg.target_parameters == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert cfg.reasoning_languages == ["French", "German"]


def test_demo_defaults_yield_to_flags():
    cfg = resolve("--demo")
    assert cfg.dataset.endswith("data/demo_sample.jsonl") and cfg.output_dir == "demo_output"
    assert resolve("--demo", "--learning_rate", "0.01").learning_rate == 0.01


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "0"], "--batch_size must be a positive integer, got 0"),
    (["--max-seq-length", "-5"], "--max_seq_length must be a positive integer, got -5"),
    (["--lora_r", "0"], "--lora_r must be a positive integer, got 0"),
    (["--learning_rate", "0"], "--learning_rate must be greater than 0, got 0.0"),
    (["--num_train_epochs", "-1"], "--num_train_epochs must be greater than 0, got -1.0"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1), got 1.5"),
    (["--temperature", "-1"], "cannot be negative"),
    (["--max_samples", "0"], "--max_samples must be a positive integer, got 0"),
    (["--reasoning-language", " "], "--reasoning-language is empty"),
    (["--attn-implementation", "sdpa"], "gpt-oss does not support sdpa"),
    (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
    (["--target_modules", ""], "nothing to train"),
])
def test_bad_values_are_refused(argv, message):
    with pytest.raises(sft.UsageError, match=None) as e:
        resolve(*argv)
    assert message in str(e.value)


@pytest.mark.parametrize("argv, needle", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--mode", "fly"], "invalid choice: 'fly'"),
    (["--batch-size", "-1"], "--batch_size must be a positive integer"),
    (["--mode", "infer", "--reasoning-language", ""], "--reasoning-language is empty"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, argv, needle):
    out = run_cli(*argv, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_folder_with_the_users_files_is_refused(tmp_path):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    out = run_cli("--output_dir", str(out_dir), "--dataset", "nope.jsonl", "--overwrite", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"error: --output_dir {out_dir} holds files this tool did not write (keep.txt); it "
                                  "only ever replaces its own outputs: move them or pick another folder")
    assert [p.name for p in out_dir.iterdir()] == ["keep.txt"]


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(sft.UsageError, match="holds no complete checkpoint"):
        sft.check_output_dir(resolve("--output_dir", str(tmp_path / "empty"), "--resume"))
