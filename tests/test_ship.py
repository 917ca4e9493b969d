"""Ship and survive: merge, resume after kill -9, NaN stop, atomic outputs, model card, no token leaks, OOM message."""

import json
import re
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import gpt_oss_20b_sft as sft
from conftest import SCRIPT, SMALL, TRACKIO_DIR, demo_training, resolve, run_cli, snapshot


def merged_in_memory(demo_model, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32, attn_implementation="eager")
    return PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()


@pytest.mark.slow  # trains, merges and generates: half a minute each
@pytest.mark.parametrize("targets", [["--target_modules", "q_proj,v_proj"],
                                     ["--target_modules", "q_proj", "--target_parameters",
                                      "mlp.experts.gate_up_proj,mlp.experts.down_proj"]], ids=["attention", "experts"])
def test_merge_writes_a_standard_checkpoint_that_matches_base_plus_adapter(tmp_path, demo_model, targets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "adapter"
    sft.run_train(resolve("--demo", "--model", str(demo_model), "--output_dir", str(adapter), "--report_to", "none",
                          "--max_steps", "3", *targets))
    check = sft.run_merge(resolve("--mode", "merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")))
    assert check["passed"] and check["logits_check"]["adapter_kept"] > 0.5

    merged = tmp_path / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["GptOssForCausalLM"]
    assert config["dtype"] == "float32"  # a base without MXFP4 keeps its own dtypes (this one's is fp32)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    stops = set(tokenizer.convert_tokens_to_ids(["<|return|>", "<|call|>"]))
    assert stops <= set(json.loads((merged / "generation_config.json").read_text())["eos_token_id"])
    weights = load_file(merged / "model.safetensors")
    assert not any("lora" in name for name in weights)
    assert json.loads((merged / "merge_check.json").read_text())["passed"] is True

    reloaded = AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager").eval()
    expected = merged_in_memory(demo_model, adapter)
    ids = tokenizer.apply_chat_template(sft.build_chat("What is 7 x 8?", "German"), add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.equal(reloaded(**ids).logits, expected(**ids).logits)
    base = load_file(demo_model / "model.safetensors")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert torch.equal(weights[name], base[name]) == ("--target_parameters" not in targets)


def test_merge_check_fails_when_the_adapter_is_lost():
    torch.manual_seed(0)
    base = torch.randn(50, 1024)
    tuned = base + 0.5 * torch.randn(50, 1024)
    assert sft.merge_agreement(tuned, base, tuned + 0.001 * torch.randn(50, 1024))["passed"]
    lost = sft.merge_agreement(tuned, base, base)  # what an MXFP4 base does to expert LoRA
    assert not lost["passed"] and lost["relative_error"] > 0.3 and lost["adapter_kept"] == 0.0


@pytest.mark.slow
def test_merge_demo_command(demo_folder):
    tmp_path = demo_folder
    result = run_cli("--mode", "merge", "--demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "verified: merged logits equal base+adapter within bf16 tolerance on 3 prompts" in result.stdout
    assert (tmp_path / "demo_output-merged" / "model.safetensors").exists()
    assert not re.search(r"Warning|deprecated|WARNING", result.stdout + result.stderr), result.stderr[-2000:]
    adapter_config = json.loads((tmp_path / "demo_output" / "adapter_config.json").read_text())
    assert (sft.Path(adapter_config["base_model_name_or_path"]) / "config.json").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--mode", "merge"], "--mode merge needs --adapter"),
    (["--mode", "merge", "--adapter", "."], "--adapter . is not a LoRA adapter directory"),
])
def test_merge_bad_inputs(tmp_path, argv, needle):
    result = run_cli(*argv, cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr
    assert list(tmp_path.iterdir()) == []


def demo_train(out, *extra, **popen):
    argv = [sys.executable, str(SCRIPT), "--mode", "train", *demo_training(), "--report_to", "none", "--save_steps",
            "2", "--output_dir", str(out), *SMALL, *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference = demo_train(tmp_path / "reference")
    victim = demo_train(tmp_path / "victim", start_new_session=True)
    deadline = time.time() + 240
    while not (tmp_path / "victim" / "checkpoint-2" / "trainer_state.json").exists():
        assert victim.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "victim" / "adapter_config.json").exists()  # no half-finished final adapter

    resumed = demo_train(tmp_path / "victim", "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "resuming from" in out and "checkpoint-" in out
    assert reference.wait(timeout=300) == 0
    a = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    b = load_file(tmp_path / "victim" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:  # same data order, schedule and RNG: identical on CPU
        assert torch.equal(a[name], b[name]), name
    ref_log = json.loads((tmp_path / "reference" / "checkpoint-9" / "trainer_state.json").read_text())["log_history"]
    new_log = json.loads((tmp_path / "victim" / "checkpoint-9" / "trainer_state.json").read_text())["log_history"]
    assert [e.get("loss") for e in ref_log] == [e.get("loss") for e in new_log]


def test_resume_skips_a_checkpoint_cut_short(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10.tmp").mkdir()
    assert sft.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert sft.latest_checkpoint(tmp_path / "checkpoint-6") is None


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


def test_move_staged_into_place_moves_adapter_config_last(tmp_path, monkeypatch):
    staging, out = tmp_path / ".final.tmp1", tmp_path / "out"
    staging.mkdir()
    out.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"):
        (staging / name).write_text(name)
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(sft.os, "replace", lambda a, b: (moved.append(sft.Path(b).name), real_replace(a, b)))
    sft.move_staged_into_place(staging, out)
    assert moved[-1] == "adapter_config.json" and len(moved) == 4
    assert not staging.exists() and (out / "tokenizer.json").read_text() == "tokenizer.json"


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


def test_staged_directory_writes_whole_or_not_at_all_and_keeps_what_it_did_not_write(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with sft.staged_directory(target) as staging:
            (staging / "half.safetensors").write_text("half")
            raise RuntimeError("crash while writing")
    assert [p.name for p in tmp_path.iterdir()] == ["merged"] and [p.name for p in target.iterdir()] == ["old.txt"]
    with sft.staged_directory(target) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    assert snapshot(target) == {"new.txt": b"new", "old.txt": b"old"}  # old.txt is in no record of the tool: it stays


# The README: a user guide, short, with one link to the lab notes and no hand-kept copy of --help.
README = SCRIPT.parent / "README.md"
# Flags the README shows for other tools (launchers, servers), not for the script.
OTHER_TOOLS_FLAGS = {"nproc_per_node", "num_gpus", "multi_gpu", "num_processes", "nnodes", "hostfile",
                     "num_machines", "jinja", "enable_lora", "max_lora_rank", "lora_modules", "project", "dist",
                     "no_loadscope_reorder"}


def test_readme_is_a_user_guide_of_at_most_300_lines_that_links_the_notes_once():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    assert text.count("](NOTES.md)") == 1 and (SCRIPT.parent / "NOTES.md").is_file()
    assert not [line for line in text.splitlines() if line.startswith("| `--")]  # no flags table: --help has them


def test_readme_installs_what_ci_installs_and_runs_its_tests():
    """.ci/run installs what the README tells a CPU-only user to install, and runs the README's full test command."""
    readme, ci = README.read_text(encoding="utf-8"), (SCRIPT.parent / ".ci" / "run").read_text()
    installs = re.findall(r"^(.*?)python -m pip install -q -r (\S+)", ci, re.M)
    assert [file for _, file in installs] == ["requirements-cpu.txt", "requirements-serve.txt"]
    for prefix, file in installs:  # the same command, but for CI's own pip settings (PIP_RETRIES: no network)
        prefix = re.sub(r"PIP_\w+=\S+ ", "", prefix)
        assert f"{prefix}pip install -r {file}" in readme, (prefix, file)
    command = "python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests"
    assert command in readme and re.search(rf"^{re.escape(command)}\b", ci, re.M)


@pytest.mark.slow
def test_readme_flags_are_flags_the_parser_accepts():
    """Every --flag the README writes is one that `--mode M --help` prints for some mode (either spelling)."""
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), "--mode", mode, "--help"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for mode in ("train", "infer", "chat", "eval", "merge")]
    accepted = set()
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        for line in out.splitlines():  # "  --batch_size N   help": the flags are in the part before the help
            if re.match(r"\s+-", line):
                accepted |= set(re.findall(r"--([\w-]+)", re.split(r"\s{2,}", line.strip())[0]))
    accepted = {flag.replace("-", "_") for flag in accepted}
    assert {"batch_size", "no_stream", "merge_format", "print_config"} <= accepted  # the help was read
    written = {flag.replace("-", "_") for flag in
               re.findall(r"(?<![\w-])--([a-z][\w-]*[a-z0-9])", README.read_text(encoding="utf-8"))}
    assert written - OTHER_TOOLS_FLAGS - accepted == set()
