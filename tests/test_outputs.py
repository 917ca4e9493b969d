"""The tool deletes or replaces only what it wrote: every destructive path run against a folder of the user's files."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest

import gpt_oss_20b_sft as sft
from conftest import SCRIPT, assert_usage_error, demo_training, resolve, run_cli, snapshot


@pytest.fixture
def users_folder(tmp_path):
    """A user's working folder: a thesis, some code and the dataset they want to train on."""
    (tmp_path / "thesis.txt").write_text("three years of work")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "code.py").write_text("print('mine')\n")
    shutil.copy(sft.DEMO_DATASET, tmp_path / "mydata.jsonl")
    return tmp_path


@pytest.mark.parametrize("output_dir, needle", [
    (".", "--output_dir . is the folder you are in"),
    ("src", "--output_dir src holds files this tool did not write (code.py)"),
    ("..", "--output_dir .. holds the folder you are in"),
])
def test_overwrite_never_touches_a_users_folder(users_folder, output_dir, needle):
    before = snapshot(users_folder)
    result = run_cli("--demo", "--dataset", "mydata.jsonl", "--max-steps", "1", "--output_dir", output_dir,
                     "--overwrite", cwd=users_folder)
    assert_usage_error(result, needle)
    assert snapshot(users_folder) == before


def test_the_folder_holding_the_dataset_is_refused(users_folder):
    (users_folder / "data").mkdir()
    shutil.move(users_folder / "mydata.jsonl", users_folder / "data" / "mydata.jsonl")
    before = snapshot(users_folder)
    result = run_cli("--demo", "--dataset", "data/mydata.jsonl", "--output_dir", "data", "--overwrite", cwd=users_folder)
    assert_usage_error(result, "--output_dir data holds the dataset")
    assert snapshot(users_folder) == before


def test_merge_into_the_current_folder_is_refused_before_loading(users_folder):
    before = snapshot(users_folder)
    result = run_cli("--mode", "merge", "--demo", "--output", ".", "--overwrite", cwd=users_folder)
    assert_usage_error(result, "--output_dir . is the folder you are in")
    assert snapshot(users_folder) == before


def test_a_foreign_file_in_the_demo_output_survives(tmp_path):
    (tmp_path / "demo_output").mkdir()
    (tmp_path / "demo_output" / "mystuff.txt").write_text("not the tool's")
    result = run_cli("--demo", "--report_to", "none", cwd=tmp_path)
    assert_usage_error(result, "--output_dir demo_output holds files this tool did not write (mystuff.txt)")
    assert [p.name for p in (tmp_path / "demo_output").iterdir()] == ["mystuff.txt"]


@pytest.mark.slow
def test_the_demo_run_again_replaces_its_own_outputs_and_the_table_of_the_adapter_it_replaces(demo_folder, monkeypatch):
    """The demo's training run again in its folder (as a second `--demo` does, no --overwrite needed) replaces the
    adapter, checkpoints and summaries it wrote before, and takes the earlier table (demo_output/eval, which measured
    the adapter replaced) with them at once: a run stopped before its own table leaves none (issue 38)."""
    out = demo_folder / "demo_output"
    report = snapshot(out / "eval")
    assert set(report) >= {"eval_results.json", "eval_summary.md", "eval_summary.png"}
    earlier = {p.name for p in out.glob("checkpoint-*")} - {"checkpoint-1"}  # the earlier run's, in its record
    first_adapter = (out / "adapter_model.safetensors").read_bytes()
    # the demo's training again, without the table the demo command ends with (it writes a new report there)
    monkeypatch.chdir(demo_folder)
    sft.run_train(resolve("--demo", "--report_to", "none", "--max-steps", "1", "--learning_rate", "0.05"))
    assert not (out / "eval").exists()
    assert earlier and {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-1"}
    assert (out / "adapter_model.safetensors").read_bytes() != first_adapter
    assert json.loads((out / sft.OWNER_FILE).read_text())["mode"] == "train"
    assert sft.sort_outputs(out, "train")[1] == []  # every file there is in the record


@pytest.mark.slow
def test_overwrite_refuses_a_run_folder_with_a_users_file_and_deletes_nothing(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / "notes.md").write_text("my notes on this run")
    before = snapshot(tmp_path)
    result = run_cli("--demo", "--report_to", "none", "--max-steps", "1", "--output_dir", str(out), "--overwrite",
                     cwd=tmp_path)
    assert_usage_error(result, f"--output_dir {out} holds files this tool did not write (notes.md)")
    assert snapshot(tmp_path) == before


def test_a_non_demo_run_needs_overwrite_to_replace_its_earlier_outputs(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / sft.OWNER_FILE).write_text(json.dumps({"mode": "train"}))
    (out / "adapter_config.json").write_text("{}")
    result = run_cli("--output_dir", str(out), "--dataset", "nope.jsonl", "--model", str(tmp_path), cwd=tmp_path)
    assert_usage_error(result, f"--output_dir {out} holds an earlier train run's outputs; pass --overwrite to replace "
                           "them or --resume to continue")


# The record: a folder's marker lists what the tool wrote there; anything else, whatever its name, is the user's.

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished run of the demo's training with two checkpoints, made once; each test works on a copy (mtimes kept,
    so the copy's record still matches it)."""
    folder = tmp_path_factory.mktemp("trained")
    result = run_cli(*demo_training("--report_to", "none", "--max-steps", "2", "--save_steps", "1", "--output_dir",
                                    "run"), cwd=folder)
    assert result.returncode == 0, result.stderr[-2000:]
    return folder / "run"


def append(path, text):
    with open(path, "a") as f:
        f.write(text)


USERS_ENTRIES = {  # what a user adds or changes in a run folder, and the name the refusal gives
    "a folder named like a checkpoint": (lambda o: (o / "checkpoint-for-paper").mkdir() or
                                         (o / "checkpoint-for-paper" / "figures.txt").write_text("fig 1"),
                                         "checkpoint-for-paper/"),
    "a folder named like the tool's logs": (lambda o: (o / "runs").mkdir() or
                                            (o / "runs" / "my_tensorboard.log").write_text("log"), "runs/"),
    "an empty folder named as a checkpoint": (lambda o: (o / "checkpoint-99").mkdir(), "checkpoint-99/"),
    "a file inside the tool's checkpoint": (lambda o: (o / "checkpoint-1" / "my_notes.txt").write_text("notes"),
                                            "checkpoint-1/my_notes.txt"),
    "a file named as the tool's": (lambda o: (o / "speed.json").unlink() or (o / "speed.json").write_text("{}"),
                                   "speed.json"),
    "the tool's file, edited": (lambda o: append(o / "README.md", "\nmy notes\n"), "README.md"),
    "the tool's checkpoint file, edited": (lambda o: append(o / "checkpoint-2" / "trainer_state.json", " "),
                                           "checkpoint-2/trainer_state.json"),
}


@pytest.mark.slow
@pytest.mark.parametrize("change", USERS_ENTRIES)
def test_a_users_entry_in_a_run_folder_is_refused_by_record_whatever_its_name(trained, tmp_path, monkeypatch,
                                                                             capsys, change):
    make, name = USERS_ENTRIES[change]
    out = tmp_path / "demo_output"
    shutil.copytree(trained, out)
    make(out)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    for argv in (["--demo"], ["--demo", "--output_dir", "demo_output", "--overwrite"],
                 ["--demo", "--output_dir", "demo_output", "--resume"]):  # the demo's re-run, --overwrite, --resume
        assert sft.main([*argv, "--report_to", "none"]) == 2
        stdout, stderr = capsys.readouterr()
        assert stdout == "" and stderr == (f"error: --output_dir demo_output holds files this tool did not write ({name}"
                                           f"), or changed since it wrote them; it only ever replaces its own outputs, "
                                           "unchanged: move them or pick another folder\n")
        assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_resume_leaves_a_users_file_beside_the_run_as_it_is(trained, tmp_path, monkeypatch, capsys):
    """A resumed run writes and rotates only its own names, so a file of the user's at the top of its folder does not
    stop it and stays; a folder of the user's there (checkpoint rotation deletes folders) still does, as in the
    cases above."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    shutil.rmtree(out / "checkpoint-2")  # a run killed in its second step: it resumes from checkpoint-1
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()
    (out / "notes.md").write_text("my notes on this run")
    (out / "checkpoint-7-notes.txt").write_text("named like a checkpoint, but a file")
    monkeypatch.chdir(tmp_path)
    resume = demo_training("--report_to", "none", "--max-steps", "2", "--save_steps", "1", "--output_dir", "run",
                           "--resume", "--save_total_limit", "1")  # step 2's checkpoint replaces checkpoint-1
    assert sft.main(resume) == 0, capsys.readouterr().err
    assert "resuming from run/checkpoint-1" in capsys.readouterr().out
    own, foreign = sft.sort_outputs(out, "train")
    assert {out / "adapter_config.json", out / "checkpoint-2"} <= set(own) and not (out / "checkpoint-1").exists()
    assert sorted(p.name for p in foreign) == ["checkpoint-7-notes.txt", "notes.md"]
    assert (out / "notes.md").read_text() == "my notes on this run"
    assert (out / "checkpoint-7-notes.txt").read_text() == "named like a checkpoint, but a file"
    (out / "figures").mkdir()
    before = snapshot(tmp_path)
    assert sft.main(resume) == 2
    assert capsys.readouterr().err.startswith("error: --output_dir run holds files this tool did not write (figures/)")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_run_copied_without_its_times_is_refused_with_how_to_copy_it(trained, tmp_path, monkeypatch, capsys):
    """cp -r gives every file a new time, so the record cannot tell the copy from a change: the refusal says so, and
    a copy that kept the times (cp -a, shutil.copy2) passes the folder check for --resume."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained, tmp_path / "demo_output", copy_function=shutil.copy)  # contents, not times
    before = snapshot(tmp_path)
    for flag in ("--resume", "--overwrite"):
        assert sft.main(["--demo", "--output_dir", "demo_output", flag, "--report_to", "none"]) == 2
        stdout, stderr = capsys.readouterr()
        assert stdout == "" and stderr == (
            "error: --output_dir demo_output holds files of the sizes this tool wrote but with other times "
            "(README.md, adapter_config.json, adapter_model.safetensors, ...): a copy that did not keep the times "
            "(cp -r) looks changed; copy a run with cp -a or rsync -a (the tool only ever replaces its own outputs, "
            "unchanged)\n")
        assert snapshot(tmp_path) == before
    shutil.copytree(trained, tmp_path / "kept")  # copy2: the times too
    sft.check_output_dir(resolve("--demo", "--output_dir", "kept", "--resume", "--max-steps", "2", "--save_steps", "1"))
    sft.release_folders()
    append(tmp_path / "kept" / "README.md", "my notes")  # and a real change is still the user's
    with pytest.raises(sft.UsageError, match=r"holds files this tool did not write \(README.md\), or changed since"):
        sft.check_output_dir(resolve("--demo", "--output_dir", "kept", "--resume", "--max-steps", "2"))


def test_a_folder_of_an_older_version_is_foreign_except_the_names_it_is_known_to_hold(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    for path in ("adapter_config.json", "checkpoint-3/trainer_state.json", "checkpoint-3/optimizer.pt",
                 "checkpoint-3/my_notes.txt", "checkpoint-for-paper/figures.txt", "notes.md", "runs/events.log"):
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_text(path)
    (out / sft.OWNER_FILE).write_text(json.dumps({"mode": "train", "tool": "gpt_oss_20b_sft.py"}))  # no record
    own, foreign = sft.sort_outputs(out, "train")
    assert [p.relative_to(out).as_posix() for p in own] == [
        "adapter_config.json", "checkpoint-3", "checkpoint-3/optimizer.pt", "checkpoint-3/trainer_state.json"]
    assert [p.relative_to(out).as_posix() for p in foreign] == [
        "checkpoint-3/my_notes.txt", "checkpoint-for-paper", "notes.md", "runs"]
    assert sft.sort_outputs(out, "merge") == ([], sorted(out.iterdir())[1:])  # another mode's folder: all foreign
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sft, "build_demo_model", lambda: pytest.fail("the demo's base built before the refusal"))
    assert sft.main(["--demo", "--output_dir", "run", "--overwrite"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: --output_dir run holds files this tool did not write (checkpoint-3/my_notes.txt, "
        "checkpoint-for-paper/, notes.md, ...)")
    assert snapshot(tmp_path) == before


def merged_folder(target, files):
    """A merge's output as run_merge writes it: a claimed staging folder swapped in by staged_directory."""
    with sft.staged_directory(target) as staging:
        sft.claim_output_dir(staging, "merge", replace_own=False)
        for name, text in files.items():
            (staging / name).write_text(text)
    sft.release_folders()


def test_merge_refuses_a_folder_holding_a_users_safetensors_before_loading(tmp_path, monkeypatch, capsys):
    merged_folder(tmp_path / "demo_output-merged", {"model.safetensors": "weights", "config.json": "{}"})
    (tmp_path / "demo_output-merged" / "my_fp32_original.safetensors").write_text("the user's fp32 weights")
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert sft.main(["--mode", "merge", "--demo", "--output_dir", "demo_output-merged", "--overwrite"]) == 2
    stdout, stderr = capsys.readouterr()
    assert stdout == "" and stderr.startswith("error: --output_dir demo_output-merged holds files this tool did not "
                                              "write (my_fp32_original.safetensors)") and len(stderr.splitlines()) == 1
    assert snapshot(tmp_path) == before and not (tmp_path / "demo_output").exists()  # nothing trained


def test_replacing_a_merge_keeps_what_appears_in_the_folder_meanwhile(tmp_path):
    target = tmp_path / "merged"
    merged_folder(target, {"model-00001-of-00002.safetensors": "old 1", "model-00002-of-00002.safetensors": "old 2",
                           "config.json": "old"})
    (target / "eval").mkdir()  # another output of the tool inside: stays as it is
    (target / "eval" / sft.OWNER_FILE).write_text(json.dumps({"mode": "eval", "written": {}}))
    (target / "eval" / "eval_summary.md").write_text("report")
    with sft.staged_directory(target) as staging:
        sft.claim_output_dir(staging, "merge", replace_own=False)
        (staging / "model.safetensors").write_text("new")
        (staging / "config.json").write_text("new")
        (target / "my_notes.txt").write_text("written while the merge ran")
    assert snapshot(target) == {"config.json": b"new", "model.safetensors": b"new", "my_notes.txt":
                                b"written while the merge ran", "eval/eval_summary.md": b"report",
                                f"eval/{sft.OWNER_FILE}": snapshot(target)[f"eval/{sft.OWNER_FILE}"],
                                sft.OWNER_FILE: (target / sft.OWNER_FILE).read_bytes()}
    assert sft.sort_outputs(target, "merge") == ([target / "config.json", target / "model.safetensors"],
                                                 [target / "my_notes.txt"])
    # a file the user put where the merge writes, meanwhile: the run fails and leaves it; the new files wait aside
    with pytest.raises(sft.RunFailed, match=f"{target / 'config.json'} appeared during the run and is not this tool's"):
        with sft.staged_directory(target) as staging:
            sft.claim_output_dir(staging, "merge", replace_own=False)
            (staging / "config.json").write_text("newer")
            (target / "config.json").unlink()
            (target / "config.json").write_text("the user's")
    assert (target / "config.json").read_text() == "the user's" and (target / "my_notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    sft.release_folders()


def test_a_second_run_into_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_not(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; sys.path.insert(0, "
                               f"{str(sft.HERE)!r}); import gpt_oss_20b_sft as s; s.claim_output_dir(Path({str(out)!r}),"
                               " 'train', False); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = snapshot(tmp_path)
        result = run_cli("--demo", "--output_dir", str(out), "--overwrite", "--report_to", "none", cwd=tmp_path)
        assert_usage_error(result, f"--output_dir {out} is in use by another run of this tool (pid {holder.pid}); "
                                   "wait for it to end or pick another folder")
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()  # kill -9: no cleanup runs, its lock goes with it
        holder.wait()
    sft.check_output_dir(sft.parse_config(["--demo", "--output_dir", str(out)]))  # not refused
    sft.release_folders()


def session_with_a_turn():
    return sft.ChatSession("German", None, "low").answered("2+2?", "zwei plus zwei", "4")


def test_save_replaces_only_its_own_file_unchanged_and_never_writes_through_a_link(tmp_path):
    session, path = session_with_a_turn(), tmp_path / "talk.jsonl"
    assert sft.handle_command(f"/save {path}", session)[1] == f"saved 1 turn to {path}"
    assert sft.handle_command(f"/save {path}", session)[1] == f"saved 1 turn to {path}"  # its own, unchanged
    append(path, json.dumps({"reasoning_language": "French", "user": "mine", "analysis": "a", "final": "f"}) + "\n")
    (tmp_path / "users.jsonl").write_text("the user's rows\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "users.jsonl")
    before = snapshot(tmp_path)
    for target, needle in [(path, "the file exists and this chat did not write it as it is now (changed since?)"),
                           (tmp_path / "users.jsonl", "the file exists and this chat did not write it"),
                           (tmp_path / "link.jsonl", "is a symbolic link; /save writes only a file of its own")]:
        after, said = sft.handle_command(f"/save {target}", session)
        assert after == session and said.startswith(f"error: /save {target}: ") and needle in said, said
        assert "\n" not in said and snapshot(tmp_path) == before
    assert (tmp_path / "link.jsonl").is_symlink()


@pytest.mark.slow
def test_resume_skips_a_checkpoint_cut_short_and_a_run_killed_while_saving_is_not_finished(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    marker = json.loads((out / sft.OWNER_FILE).read_text())  # a run of 3 steps, not 2 (--resume checks the settings)
    (out / sft.OWNER_FILE).write_text(json.dumps({**marker, "settings": {**marker["settings"], "max_steps": 3}}))
    sft.record(out, out / "checkpoint-3", pending=True)  # as a run killed while saving checkpoint-3 leaves it
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"half")
    argv = demo_training("--report_to", "none", "--max-steps", "3", "--save_steps", "1", "--output_dir", "run",
                         "--resume")
    result = run_cli(*argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("resuming from run/checkpoint-2 (skipping checkpoint-3: cut short while being saved, or missing files)"
            in result.stdout)
    assert (out / "checkpoint-3" / "trainer_state.json").is_file() and (out / "adapter_config.json").is_file()
    assert sft.sort_outputs(out, "train")[1] == []  # everything there is recorded
    (out / "adapter_config.json").unlink()  # as a run killed while publishing its adapter leaves it
    result = run_cli(*argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "run: the run trained all 3 steps and stopped before its adapter was saved; saving it" in result.stdout
    assert (out / "adapter_config.json").is_file() and "nothing to resume" not in result.stdout


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


@pytest.mark.slow
def test_a_demo_rerun_keeps_a_users_file_in_the_old_table_folder(demo_folder):
    """The earlier table goes with the adapter it measured; a file of the user's put in that folder stays, and so
    does the folder holding it."""
    eval_dir = demo_folder / "demo_output" / "eval"
    (eval_dir / "my_notes.txt").write_text("mine")
    sft.run_train(resolve("--demo", "--report_to", "none", "--max_steps", "1", "--output_dir",
                          str(demo_folder / "demo_output")))
    assert sorted(p.name for p in eval_dir.iterdir()) == [sft.OWNER_FILE, "my_notes.txt"]
    assert (eval_dir / "my_notes.txt").read_text() == "mine"


def limited_writes(limit: int):
    """A file size limit for the process (setrlimit): a write past it fails as on a full disk (EFBIG, the signal
    ignored), whichever library writes; no root and no mount needed."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def run_limited(limit, *args, cwd):
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                            preexec_fn=limited_writes(limit), timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("limit, said", [(20_000, "file too large"), (60_000, "no space left: a write came up short")],
                         ids=["safetensors", "torch.save"])
def test_a_full_disk_while_training_is_one_paragraph_whatever_library_was_writing(tmp_path, limit, said):
    """Issue 38: the checkpoint's adapter (safetensors, 30 KB) or its optimizer state (torch.save, 65 KB) cannot be
    written; neither keeps an errno."""
    last = run_limited(limit, "--mode", "train", *demo_training("--report_to", "none", "--max_steps", "2",
                                                                "--save_steps", "1", "--output_dir", "run"),
                       cwd=tmp_path)
    assert last.startswith(f"Writing the outputs into run failed: {said}; ") and "free now on the disk that holds " \
        f"{tmp_path / 'run'}. What was being written was removed; nothing half-written is left." in last, last
    assert last.endswith("Make room and run the same command again, with --resume to continue from the last "
                         "checkpoint."), last
    assert not (tmp_path / "run" / "adapter_config.json").exists() and sft.latest_checkpoint(tmp_path / "run") is None
    assert [p.name for p in (tmp_path / "run").iterdir()] == [sft.OWNER_FILE]  # the cut-short checkpoint removed


@pytest.mark.slow
def test_a_disk_that_fills_up_while_training_leaves_no_partial_file_and_resume_finishes_after_room_is_made(tmp_path):
    """A real full disk (a 300 KB tmpfs, as root): the checkpoint being written when it filled is removed, the complete
    ones stay, and once the disk is bigger --resume finishes the run."""
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], check=True)
    try:
        (disk / "thesis.txt").write_text("mine")
        run = ["--mode", "train", *demo_training("--report_to", "none", "--max_steps", "2", "--save_steps", "1",
                                                 "--output_dir", str(disk / "run"), "--limit", "16")]
        full = run_cli(*run, cwd=tmp_path)
        assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
        assert "no space left on device; " in full.stderr and "nothing half-written is left" in full.stderr
        complete = sft.latest_checkpoint(disk / "run")
        left = [p for p in (disk / "run").rglob("*") if p.is_file()]
        assert all(p.name == sft.OWNER_FILE or complete and complete in p.parents for p in left), left
        assert (disk / "thesis.txt").read_text() == "mine"
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        resumed = run_cli(*run, "--resume", cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert (disk / "run" / "adapter_config.json").is_file() and sft.trained_steps(disk / "run") == 2
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.slow
def test_a_full_disk_while_evaluating_leaves_none_of_the_reports(demo_folder):
    """Eval's plot cannot be written: none of its three reports is left (the table without its plot, or a 0-byte
    plot, was). (A merge's shard is written by safetensors, as the checkpoint's adapter above.)"""
    last = run_limited(12_000, "--mode", "eval", "--demo", "--limit", "1", "--reasoning-languages", "German",
                       "--output_dir", "ev", cwd=demo_folder)
    assert last.startswith("Writing ev/eval_summary.png failed: file too large; "), last
    assert [p.name for p in (demo_folder / "ev").iterdir()] == [sft.OWNER_FILE]
