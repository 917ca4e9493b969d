"""--resume: from the last complete checkpoint, after kill -9, past a checkpoint cut short; refused without one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import gpt_oss_20b_sft as sft
from conftest import SCRIPT, SMALL, demo_training, resolve, snapshot


def test_resume_continues_from_the_last_checkpoint(tmp_path, demo_model):
    out = tmp_path / "out"
    first = resolve("--demo", "--model", str(demo_model), "--output_dir", str(out), "--report_to", "none",
                    "--save_steps", "3", "--max_steps", "3", *SMALL)
    assert sft.run_train(first).state.global_step == 3
    assert (out / "checkpoint-3").is_dir()
    resumed = resolve("--demo", "--model", str(demo_model), "--output_dir", str(out), "--report_to", "none",
                      "--save_steps", "3", "--resume", *SMALL)
    trainer = sft.run_train(resumed)
    assert trainer.state.global_step == 9
    before = snapshot(out)
    assert sft.run_train(resumed) is None  # finished: said so, nothing retrained or rewritten
    assert snapshot(out) == before
    assert [e["step"] for e in trainer.state.log_history if "loss" in e][:1] == [1]  # history carried over


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


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(sft.UsageError, match="holds no complete checkpoint"):
        sft.check_output_dir(resolve("--output_dir", str(tmp_path / "empty"), "--resume"))
