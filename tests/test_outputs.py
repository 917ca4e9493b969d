"""The tool deletes or replaces only what it wrote: every destructive path run against a folder of the user's files."""

import json
import shutil

import pytest

import gpt_oss_20b_sft as sft
from conftest import assert_usage_error, run_cli, snapshot


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
def test_overwrite_replaces_only_the_runs_own_outputs_and_keeps_the_eval_report(tmp_path):
    """An eval report inside the adapter folder is another output of the tool: a later demo run leaves it alone,
    replacing only the adapter, checkpoints and summaries it wrote before."""
    result = run_cli("--mode", "eval", "--demo", "--limit", "1", "--report_to", "none", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "demo_output"
    report = snapshot(out / "eval")
    assert set(report) >= {"eval_results.json", "eval_summary.md", "eval_summary.png"}
    (out / "checkpoint-99").mkdir()  # an earlier run's checkpoint: this mode's own, so replaced
    (out / "checkpoint-99" / "trainer_state.json").write_text("{}")
    first_adapter = (out / "adapter_model.safetensors").read_bytes()
    result = run_cli("--demo", "--report_to", "none", "--max-steps", "1", "--learning_rate", "0.05", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert snapshot(out / "eval") == report
    assert not (out / "checkpoint-99").exists() and (out / "adapter_model.safetensors").read_bytes() != first_adapter
    assert json.loads((out / sft.OWNER_FILE).read_text())["mode"] == "train"


@pytest.mark.slow
def test_overwrite_refuses_a_run_folder_with_a_users_file_and_deletes_nothing(tmp_path):
    out = tmp_path / "run"
    result = run_cli("--demo", "--report_to", "none", "--max-steps", "1", "--output_dir", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (out / "notes.md").write_text("my notes on this run")
    before = snapshot(tmp_path)
    result = run_cli("--demo", "--report_to", "none", "--max-steps", "1", "--output_dir", str(out), "--overwrite",
                     cwd=tmp_path)
    assert_usage_error(result, f"--output_dir {out} holds files this tool did not write (notes.md)")
    assert snapshot(tmp_path) == before
    result = run_cli("--mode", "train", "--demo", "--output_dir", str(tmp_path / "other"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]  # a fresh folder beside it is fine
    result = run_cli("--mode", "train", "--demo", "--output_dir", str(tmp_path / "other"), "--max-steps", "1",
                     "--dataset", str(sft.DEMO_DATASET), cwd=tmp_path)
    assert result.returncode == 0  # the demo replaces its own earlier outputs without --overwrite


def test_a_non_demo_run_needs_overwrite_to_replace_its_earlier_outputs(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / sft.OWNER_FILE).write_text(json.dumps({"mode": "train"}))
    (out / "adapter_config.json").write_text("{}")
    result = run_cli("--output_dir", str(out), "--dataset", "nope.jsonl", "--model", str(tmp_path), cwd=tmp_path)
    assert_usage_error(result, f"--output_dir {out} holds an earlier train run's outputs; pass --overwrite to replace "
                           "them or --resume to continue")
