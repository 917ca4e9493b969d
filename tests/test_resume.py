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


def test_resume_checks_the_settings_before_it_loads_and_a_finished_run_stays_as_it_is(tmp_path, demo_model):
    """The record keeps the settings a run started with; --resume with one that changes the maths (LoRA shape,
    learning rate, schedule, ...) is one line naming each change and its two values; when and where it saves and
    reports may change. (Resuming continues exactly: the kill -9 test below.)"""
    out = tmp_path / "out"
    run = ["--demo", "--model", str(demo_model), "--output_dir", str(out), "--report_to", "none", "--save_steps", "3",
           "--max_steps", "3", *SMALL]
    assert sft.run_train(resolve(*run)).state.global_step == 3
    assert (out / "checkpoint-3").is_dir()
    recorded = json.loads((out / sft.OWNER_FILE).read_text())["settings"]
    assert (recorded["lora_r"], recorded["learning_rate"], recorded["max_steps"]) == (16, 3e-2, 3)
    assert "save_steps" not in recorded and "report_to" not in recorded
    before = snapshot(out)
    with pytest.raises(sft.UsageError) as refused:
        sft.check_output_dir(resolve(*run, "--resume", "--lora_r", "4", "--learning_rate", "1e-3"))
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"--resume: {out} was started with other settings")
    assert "--learning_rate 0.001 (the run's: 0.03); --lora_r 4 (the run's: 16)." in message, message
    with pytest.raises(sft.UsageError, match=r"--max_steps unset \(the run's: 3\)"):
        sft.check_output_dir(resolve(*run[:-len(SMALL) - 2], *SMALL, "--resume"))  # without --max_steps 3
    allowed = resolve(*run, "--resume", "--save_steps", "5", "--logging_steps", "2", "--save_total_limit", "1")
    assert sft.run_train(allowed) is None  # finished: said so, nothing retrained or rewritten
    assert snapshot(out) == before and json.loads((out / sft.OWNER_FILE).read_text())["settings"] == recorded


def demo_train(out, *extra, **popen):
    argv = [sys.executable, str(SCRIPT), "--mode", "train", *demo_training(), "--report_to", "none", "--save_steps",
            "2", "--output_dir", str(out), *SMALL, *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def stop_after_a_checkpoint(victim, out, how):
    deadline = time.time() + 240
    while not (out / "checkpoint-2" / "trainer_state.json").exists():
        assert victim.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    if how == signal.SIGKILL:
        os.killpg(victim.pid, signal.SIGKILL)
    else:
        victim.send_signal(how)
    _, err = victim.communicate(timeout=300)
    return err


@pytest.mark.slow
def test_kill_9_or_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path):
    """kill -9 loses the steps since the last checkpoint; SIGTERM (what SLURM and Kubernetes send before a kill) lets
    the step under way end, saves a checkpoint there and says how to go on, exit 143. Resumed, both end where a run
    that never stopped ends."""
    reference = demo_train(tmp_path / "reference")
    killed = demo_train(tmp_path / "killed", start_new_session=True)
    terminated = demo_train(tmp_path / "terminated")
    stop_after_a_checkpoint(killed, tmp_path / "killed", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    err = stop_after_a_checkpoint(terminated, tmp_path / "terminated", signal.SIGTERM)
    assert terminated.returncode == 143, err[-2000:]
    line = err.strip().splitlines()[-1]
    step = int(line.split(" at step ")[1].split(";")[0])
    assert step >= 2 and line == (f"terminated (SIGTERM) at step {step}; the last checkpoint is {tmp_path}/"
                                  f"terminated/checkpoint-{step}: run the same command with --resume to continue from "
                                  "it"), line
    assert (tmp_path / "terminated" / f"checkpoint-{step}" / "trainer_state.json").exists()
    for stopped in ("killed", "terminated"):
        assert not (tmp_path / stopped / "adapter_config.json").exists()  # no final adapter from a stopped run

    resumed = [demo_train(tmp_path / stopped, "--resume") for stopped in ("killed", "terminated")]
    assert reference.wait(timeout=300) == 0
    a = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    ref_log = json.loads((tmp_path / "reference" / "checkpoint-9" / "trainer_state.json").read_text())["log_history"]
    for stopped, run in zip(("killed", "terminated"), resumed):
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-2000:]
        assert "resuming from" in out and "checkpoint-" in out
        if stopped == "terminated":
            assert f"resuming from {tmp_path / 'terminated'}/checkpoint-{step}" in out
        b = load_file(tmp_path / stopped / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for name in a:  # same data order, schedule and RNG: identical on CPU
            assert torch.equal(a[name], b[name]), (stopped, name)
        new_log = json.loads((tmp_path / stopped / "checkpoint-9" / "trainer_state.json").read_text())["log_history"]
        assert [e.get("loss") for e in ref_log] == [e.get("loss") for e in new_log], stopped


def test_sigterm_outside_training_is_one_line_exit_143_and_removes_what_was_staged(tmp_path, monkeypatch, capsys):
    """Any mode but training's loop stops at once, as on Ctrl-C, with its own exit code."""
    def terminated_while_writing(cfg, runtime):
        with sft.staged_directory(tmp_path / "out") as staging:
            (staging / "half.json").write_text("{")
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(sft.MODES["eval"], "run", terminated_while_writing)
    try:
        code = sft.main(["--mode", "eval", "--score-file", str(sft.DEMO_QUESTIONS), "--output_dir", str(tmp_path / "e")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143
    assert capsys.readouterr().err.strip() == "terminated (SIGTERM); nothing half-written was left behind"
    assert list(tmp_path.iterdir()) == []


def test_resume_skips_a_checkpoint_cut_short(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10.tmp").mkdir()
    assert sft.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert sft.latest_checkpoint(tmp_path / "checkpoint-6") is None


def test_resume_skips_a_checkpoint_missing_a_file_it_was_saved_with(tmp_path):
    """Its optimizer.pt deleted, a checkpoint would restart the optimizer and the schedule: the one before is used."""
    out = tmp_path / "run"
    sft.claim_output_dir(out, "train", replace_own=True)
    for step in (2, 4):
        (out / f"checkpoint-{step}").mkdir()
        for name in ("trainer_state.json", "optimizer.pt", "adapter_model.safetensors"):
            (out / f"checkpoint-{step}" / name).write_text("{}")
        sft.record(out, out / f"checkpoint-{step}")
    assert sft.latest_checkpoint(out) == out / "checkpoint-4"
    (out / "checkpoint-4" / "optimizer.pt").unlink()
    assert sft.latest_checkpoint(out) == out / "checkpoint-2"
    sft.release_folders()


def a_started_run(tmp_path, *flags):
    """A run's folder as train leaves it after its first checkpoint: the record with the settings, checkpoint-2."""
    data = tmp_path / "rows.jsonl"
    data.write_bytes(sft.DEMO_DATASET.read_bytes())
    run = ["--dataset", str(data), "--output_dir", str(tmp_path / "out"), *flags]
    sft.claim_output_dir(tmp_path / "out", "train", replace_own=True, settings=sft.run_settings(resolve(*run)))
    (tmp_path / "out" / "checkpoint-2").mkdir()
    (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "out" / "checkpoint-2" / "adapter_config.json").write_text(json.dumps(
        {"r": 16, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"]}))
    sft.record(tmp_path / "out", tmp_path / "out" / "checkpoint-2")
    sft.release_folders()
    return run + ["--resume"]


def test_resume_compares_the_same_file_and_targets_as_the_same_and_edited_rows_as_a_change(tmp_path, monkeypatch):
    run = a_started_run(tmp_path, "--target_modules", "q_proj,v_proj")
    monkeypatch.chdir(tmp_path)
    sft.check_output_dir(resolve(*run, "--dataset", "./rows.jsonl", "--target_modules", "v_proj", "q_proj"))
    sft.release_folders()
    with (tmp_path / "rows.jsonl").open("a") as rows:  # one row more, same path
        rows.write((tmp_path / "rows.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(sft.UsageError) as refused:
        sft.check_output_dir(resolve(*run))
    assert f"these change the run's maths: the rows of --dataset {tmp_path / 'rows.jsonl'} (edited since the run " \
           "started)." in str(refused.value)


def test_a_record_without_settings_is_still_held_to_its_checkpoints_lora_shape(tmp_path):
    run = a_started_run(tmp_path)
    record = json.loads((tmp_path / "out" / sft.OWNER_FILE).read_text())
    del record["settings"]  # as an older version of the tool wrote it
    (tmp_path / "out" / sft.OWNER_FILE).write_text(json.dumps(record))
    with pytest.raises(sft.UsageError, match=r"maths: --lora_r 4 \(the run's: 16\)\. Resume with"):
        sft.check_output_dir(resolve(*run, "--lora_r", "4"))
    sft.release_folders()
    sft.check_output_dir(resolve(*run, "--learning_rate", "1e-3"))  # what the checkpoint does not say is not checked
    sft.release_folders()


@pytest.mark.parametrize("damage", [{"written": None}, {"written": [1]}, {"settings": "oops"}, {"settings": [1]},
                                    {"mode": None}, {"written": {"checkpoint-2": "mine"}}])
def test_a_damaged_record_is_one_line_and_nothing_is_touched(tmp_path, damage):
    run = a_started_run(tmp_path)
    record = json.loads((tmp_path / "out" / sft.OWNER_FILE).read_text())
    (tmp_path / "out" / sft.OWNER_FILE).write_text(json.dumps({**record, **damage}))
    before = snapshot(tmp_path / "out")
    for flags in (["--resume"], ["--overwrite"]):
        with pytest.raises(sft.UsageError) as refused:
            sft.check_output_dir(resolve(*run[:-1], *flags))
        sft.release_folders()
        assert str(refused.value) == (f"--output_dir {tmp_path / 'out'}: its record of what this tool wrote there "
                                      "(.gpt_oss_sft.json) is damaged, so its files cannot be told from yours: move out "
                                      "what you want to keep and delete the folder, or pick another folder")
    assert snapshot(tmp_path / "out") == before


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(sft.UsageError, match="holds no complete checkpoint"):
        sft.check_output_dir(resolve("--output_dir", str(tmp_path / "empty"), "--resume"))
