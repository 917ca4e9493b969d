"""More than one process: DDP, FSDP2 and DeepSpeed ZeRO-3 under torchrun and the deepspeed launcher, on CPU (gloo),
against one process with the same global batch."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import gpt_oss_20b_sft as sft
from conftest import ROOT, SCRIPT, demo_training, resolve

# SGD: the step moves the adapter by the gradient itself, so any gradient difference shows. Adam's first step is
# about lr x sign(gradient): it would hide a gradient off by a factor and blow float noise in near-zero entries up.
ONE_STEP = ["--mode", "train", "--report_to", "none", "--max_steps", "1", "--warmup_ratio", "0", "--optim", "sgd",
            "--learning_rate", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher, out, *extra):
    """Run one optimizer step of the demo; two processes x batch 8 = one process x batch 16 (x 2 accumulation)."""
    port = free_port()  # not the launchers' shared default 29500, which the previous launch may still hold
    step = demo_training(*ONE_STEP)
    commands = {
        "single": [sys.executable, str(SCRIPT), *step, "--batch_size", "16"],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                     str(SCRIPT), *step],
        "deepspeed": [shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed",
                      "--num_gpus=2", f"--master_port={port}", str(SCRIPT), *step],
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                       "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}",
                       str(SCRIPT), *step],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([*commands[launcher], "--output_dir", str(out), *extra], capture_output=True, text=True,
                            env=env, timeout=600)
    # no rank aborted at exit (about one launch in 60 did in the interpreter's teardown before leave())
    assert result.returncode == 0 and "terminate called" not in result.stderr, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    launch("single", out)
    return out


def adapter_logits(demo_model, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model), adapter).eval()
    ids = tokenizer.apply_chat_template(sft.build_chat("What is 7 x 8?", "German"), add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**ids).logits


@pytest.mark.parametrize("launcher, extra, strategy", [
    ("torchrun", [], "ddp"),
    ("torchrun", ["--fsdp"], "fsdp2"),
    ("torchrun", ["--deepspeed", "zero3"], "deepspeed-zero3"),
    ("deepspeed", [], "deepspeed-zero3"),  # the launcher's --local_rank picks ZeRO-3
    ("accelerate", [], "ddp"),
], ids=["ddp", "fsdp2", "zero3", "deepspeed-launcher", "accelerate-launch"])
@pytest.mark.slow
def test_two_processes_match_one(tmp_path, single, demo_model, launcher, extra, strategy):
    out = tmp_path / "run"
    result = launch(launcher, out, *extra)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["distributed"] == {"world_size": 2, "strategy": strategy}
    reference = json.loads((single / "run_summary.json").read_text())
    assert reference["distributed"] == {"world_size": 1, "strategy": "single"}
    # Same 32 rows in the first optimizer step; only the order of the float reductions differs.
    assert summary["train_loss_first"] == pytest.approx(reference["train_loss_first"], rel=1e-6)
    assert result.stdout.count("saved adapter") == 1 and result.stdout.count("trainable params") == 1
    assert not (out / ".final.tmp").exists()
    a, b = load_file(out / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max(b[k].abs().max().item() for k in b) > 1e-2  # the step moved the adapter: the comparison means something
    torch.testing.assert_close(adapter_logits(demo_model, out), adapter_logits(demo_model, single), rtol=0, atol=1e-5)


def test_strategy_choice(monkeypatch, tmp_path):
    assert sft.find_runtime(resolve()).strategy == "single"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert sft.find_runtime(resolve()).strategy == "ddp"
    assert sft.find_runtime(resolve("--fsdp")).strategy == "fsdp2"
    assert sft.find_runtime(resolve("--local_rank=1")).strategy == "deepspeed-zero3"
    assert sft.find_runtime(resolve("--local-rank", "0", "--fsdp")).strategy == "fsdp2"
    own = tmp_path / "ds.json"
    own.write_text(json.dumps(sft.zero3_config()))
    assert sft.find_runtime(resolve("--deepspeed", str(own))).strategy == "deepspeed-file"


def arguments(*argv) -> dict:
    """What the strategy of a command line adds to the Trainer's arguments."""
    cfg = resolve(*argv)
    return sft.parallel_arguments(cfg, sft.find_runtime(cfg).strategy)


def test_trainer_arguments_for_each_strategy(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    ddp = arguments()
    assert ddp == {"ddp_find_unused_parameters": False}
    fsdp = arguments("--fsdp")
    assert fsdp["activation_checkpointing"] is False and fsdp["fsdp_config"]["activation_checkpointing"] is True
    assert fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["GptOssDecoderLayer"]
    zero3 = arguments("--deepspeed", "zero3")["deepspeed"]
    assert zero3["zero_optimization"]["stage"] == 3 and zero3["bf16"] == {"enabled": "auto"}


def test_zero3_preset_is_valid_for_the_pinned_deepspeed():
    from deepspeed.runtime.config import DeepSpeedConfig

    config = sft.zero3_config()
    concrete = {**config, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "train_batch_size": 16,
                "gradient_clipping": 1.0, "bf16": {"enabled": True},
                "zero_optimization": {**config["zero_optimization"], "reduce_bucket_size": 5e8,
                                      "stage3_prefetch_bucket_size": 5e8, "stage3_param_persistence_threshold": 1e5}}
    parsed = DeepSpeedConfig(concrete)
    assert parsed.zero_optimization_stage == 3 and parsed.bfloat16_config.enabled
    assert parsed.zero_config.gather_16bit_weights_on_model_save


@pytest.mark.parametrize("argv, needle", [
    (["--deepspeed", "zero3", "--fsdp"], "--deepspeed and --fsdp are two ways to shard the model: pick one"),
    (["--deepspeed", "missing.json"], "--deepspeed missing.json: not 'zero3' and not a readable DeepSpeed JSON file"),
    (["--use_4bit", "--fsdp"], "--use_4bit with --deepspeed/--fsdp"),
    (["--recompute-every-nth-layer", "2", "--fsdp"], "under --fsdp FSDP checkpoints every layer itself"),
    (["--recompute-every-nth-layer", "2", "--no-gradient-checkpointing"], "--recompute-every-nth-layer chooses which layers"),
    (["--checkpoint-every", "0"], "--recompute_every_nth_layer (--checkpoint_every) must be a positive integer"),
])
def test_bad_parallel_flags(argv, needle):
    with pytest.raises(sft.UsageError, match=None) as e:
        resolve(*argv)
    assert needle in str(e.value)


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_process_leaves_with_its_exit_code_after_the_exit_handlers(tmp_path, world_size):
    """leave(): a rank of a multi-process run skips the interpreter's teardown (where a process group kept alive by
    DDP can abort) but still runs the exit handlers, prints what it buffered and keeps its exit code."""
    marker = tmp_path / "handlers_ran"
    program = (f"import atexit, sys; sys.path.insert(0, {str(ROOT)!r}); import gpt_oss_20b_sft as sft; "
               f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes')); "
               "print('buffered', end=''); sft.leave(3)")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "WORLD_SIZE": world_size})
    assert (result.returncode, result.stdout, marker.read_text()) == (3, "buffered", "yes"), result.stderr[-2000:]


@pytest.mark.slow
def test_grpo_under_torchrun_finishes_and_saves_one_adapter(tmp_path, demo_model):
    """Two processes, two completions each, the 4 of a prompt scored together across them (TRL gathers them); rank 0
    alone writes the adapter and its record."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"user": q}) + "\n" for q in ("What is 7 plus 8?", "Name a red fruit.")))
    out = tmp_path / "grpo"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(SCRIPT), "--mode", "grpo", "--model", str(demo_model), "--dataset", str(prompts),
               "--reasoning-languages", "French,German", "--num_generations", "4", "--batch_size", "2",
               "--gradient_accumulation_steps", "1", "--max_steps", "1", "--max_completion_length", "8",
               "--report_to", "none", "--output_dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 0 and "terminate called" not in result.stderr, result.stderr[-3000:]
    assert result.stdout.count("saved adapter") == 1, result.stdout
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["optimizer_steps"] == 1 and len(summary["per_step"]) == 1
    assert {p.name for p in out.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json", "run_summary.json",
                                                "reward_curve.png", sft.OWNER_FILE}
    assert not (out / ".final.tmp").exists()
    assert sft.read_lora_adapter(str(out))[0]["r"] == 16  # train's LoRA shape, one adapter
