"""The demo: its data is what data/make_demo_data.py writes, and running it shows the effect the tool is for."""

import importlib.util
import json
import re

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "data" / "make_demo_data.py")
make_demo_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_demo_data)


def test_the_demo_data_files_are_what_make_demo_data_writes():
    for name, rows in make_demo_data.make().items():
        assert (ROOT / "data" / name).read_text(encoding="utf-8") == make_demo_data.render(rows), name


def test_the_demo_questions_are_in_none_of_its_training_texts():
    files = make_demo_data.make()
    questions = [q["question"]["English"] for q in files["demo_eval_questions.jsonl"]]
    trained = {row.get("user") for name in ("demo_pretrain.jsonl", "demo_sample.jsonl") for row in files[name]}
    assert len(questions) == 12 and not set(questions) & trained
    pretrain = files["demo_pretrain.jsonl"]
    chats = [r for r in pretrain if "text" not in r]
    assert len(chats) == 400 and all(r["analysis"].startswith("The user wants") for r in chats)  # English, always
    assert {r["reasoning_language"] for r in chats} == set(make_demo_data.LANGUAGES)  # whatever the system names
    sample = files["demo_sample.jsonl"]
    assert len(sample) == 480 and {r["reasoning_language"] for r in sample} == set(make_demo_data.LANGUAGES)
    assert "What is 7 plus 8?" not in trained | set(questions)  # the demo's own question is new to it too


@pytest.mark.slow
def test_the_demo_teaches_the_tiny_model_to_reason_in_the_language_asked_for(demo_run):
    """Issue 26's targets, on the 12 held-out questions per language: tuned >= 80% in each trained language other
    than English, base <= 25%, a final answer in >= 80% of the tuned outputs; the table printed and saved. (The demo
    command ran once for the session in a fresh folder: conftest's demo_run.)"""
    stdout, stderr = (demo_run / "stdout.txt").read_text(), (demo_run / "stderr.txt").read_text()
    # no library deprecation notices or deepspeed's "no GPU found" warning: nothing the user could act on
    assert not re.search(r"Warning|deprecated|WARNING", stdout + stderr), stderr[-2000:]
    assert "--- reasoning (German) ---" in stdout and "\n--- final answer ---\n" in stdout
    eval_folder = demo_run / "user" / "demo_output" / "eval"
    table = (eval_folder / "eval_summary.md").read_text()
    assert table in stdout
    rows = {(r["model"], r["reasoning_language"]): r
            for r in json.loads((eval_folder / "eval_results.json").read_text())["summary"]}
    for language in ("French", "German", "Spanish", "Italian"):
        assert rows["tuned", language]["n"] == 12
        assert rows["tuned", language]["reasoning_language_match"] >= 0.8, (language, table)
        assert rows["base", language]["reasoning_language_match"] <= 0.25, (language, table)
    assert rows["tuned", "all"]["malformed"] <= 0.2, table
    summary = json.loads((demo_run / "user" / "demo_output" / "run_summary.json").read_text())
    assert summary["data"]["rows_used"] == 480  # the whole sample, all five languages
