"""The demo: its data is what data/make_demo_data.py writes, and running it shows the effect the tool is for."""

import collections
import importlib.util
import json
import re

import pytest

import gpt_oss_20b_sft as sft
from conftest import ROOT, run_cli

spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "data" / "make_demo_data.py")
make_demo_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_demo_data)


def test_the_demo_data_files_are_what_make_demo_data_writes():
    for name, rows in make_demo_data.make().items():
        assert (ROOT / "data" / name).read_text(encoding="utf-8") == make_demo_data.render(rows), name


def test_the_demo_data_asks_every_kind_in_every_language_and_holds_kinds_out_for_the_eval():
    files = make_demo_data.make()
    languages = set(make_demo_data.LANGUAGES)
    families = make_demo_data.FAMILIES
    assert len(families) >= 12 and all(set(f["ask"]) == set(f["think"]) == set(f["final"]) == languages
                                       and min(map(len, f["ask"].values())) >= 3 for f in families.values())
    evaluation = files["demo_eval_questions.jsonl"]
    assert {q["category"] for q in evaluation} == set(make_demo_data.HELD_OUT)  # kinds no training row has
    assert not set(make_demo_data.HELD_OUT) & set(families)
    assert all(set(q["question"]) == languages for q in evaluation) and len(evaluation) == 20
    questions = {text for q in evaluation for text in q["question"].values()}
    pretrain, sample = files["demo_pretrain.jsonl"], files["demo_sample.jsonl"]
    trained = {row.get("user") for row in pretrain + sample}
    assert not questions & trained and sft.DEMO_QUESTION not in trained | questions  # the demo's own question too
    chats = [r for r in pretrain if "text" not in r]
    assert len(chats) == 400 and all(r["analysis"].startswith("Okay, the user wants") for r in chats)  # English, always
    assert {r["reasoning_language"] for r in chats} == languages  # whatever the system names
    assert len(sample) == 480 and {r["reasoning_language"] for r in sample} == languages
    # the unseen language (issue 40): plain documents reason in it, of every kind; no chat names it or reasons in it
    unseen = [r["text"] for r in pretrain if r.get("text", "").startswith(f"reasoning language: {make_demo_data.UNSEEN}\n")]
    assert len(unseen) == 240 and set(make_demo_data.UNSEEN_THINK) == set(families)
    assert all(make_demo_data.UNSEEN_STEADY in text for text in unseen)
    assert make_demo_data.UNSEEN not in languages | {r["reasoning_language"] for r in chats + sample}
    assert not any(make_demo_data.UNSEEN_STEADY in r["analysis"] for r in chats + sample)
    # the reasoning is in the row's language whatever the question's: each language's steady middle is in it
    for row in sample:
        assert make_demo_data.STEADY[row["reasoning_language"]] in row["analysis"]
    wordings = {language: [re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(w)))
                           for f in families.values() for w in f["ask"][language]] for language in languages}
    asked_in = collections.Counter(language for row in sample for language in languages
                                   if any(w.fullmatch(row["user"]) for w in wordings[language]))
    assert sum(asked_in.values()) == 480 and min(asked_in.values()) >= 60, asked_in  # about a fifth in each language


@pytest.mark.slow
def test_the_demo_teaches_the_tiny_model_to_reason_in_the_language_asked_for(demo_run):
    """Issues 26 and 39's targets, on the 20 questions per language of kinds no training row has, asked in the five
    languages: tuned >= 80% in each trained language other than English, reasoning (not stopped thinking) on >= 95%
    of the tuned outputs, base <= 25%, a final answer in >= 80% of the tuned outputs; the table printed and saved.
    (The demo command ran once for the session in a fresh folder: conftest's demo_run.)"""
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
        assert rows["tuned", language]["n"] == 20
        assert rows["tuned", language]["reasoning_language_match"] >= 0.8, (language, table)
        assert rows["base", language]["reasoning_language_match"] <= 0.25, (language, table)
    assert rows["tuned", "all"]["malformed"] <= 0.2 and rows["tuned", "all"]["stopped_thinking"] <= 0.05, table
    summary = json.loads((demo_run / "user" / "demo_output" / "run_summary.json").read_text())
    assert summary["data"]["rows_used"] == 480  # the whole sample, all five languages


# Questions in no data file, of kinds the demo never trained on or asked differently, in the five languages, each
# with a reasoning language other than its own (issue 39: the toy had learned one template, not the behaviour).
FREE_QUESTIONS = [("Wie spät ist es in Tokio?", "French"), ("Écris un poème sur la mer", "Spanish"),
                  ("What is the capital of Peru?", "Italian"), ("¿Cuál es tu película favorita?", "German"),
                  ("Quanto costa un caffè a Roma?", "French"), ("Erkläre mir, wie ein Regenbogen entsteht.", "Spanish"),
                  ("Can you recommend a good book for a long train journey?", "Italian"),
                  ("Qu'est-ce que l'intelligence artificielle ?", "German"),
                  ("How do airplanes stay in the air?", "French"), ("Perché il cielo di notte è buio?", "English")]
ANSWER = re.compile(r"--- reasoning \((\w+)\) ---\n(.*?)\n\n--- final answer ---\n", re.DOTALL)


@pytest.mark.slow
def test_any_question_gets_reasoning_in_the_language_asked_for_in_infer_and_chat(demo_folder):
    """The tuned toy, through infer and chat as a user runs them (greedy, seeded): reasoning on every question, in
    the asked language on at least 9 of the 11 (what eval measures on the held-out kinds, here on new ones)."""
    data = "".join((ROOT / "data" / name).read_text(encoding="utf-8") for name in make_demo_data.make())
    assert not any(json.dumps(q, ensure_ascii=False)[1:-1] in data for q, _ in FREE_QUESTIONS) and "cats purr" not in data
    infer = run_cli("--mode", "infer", "--demo", "--prompt", "Why do cats purr?", cwd=demo_folder)
    assert infer.returncode == 0, infer.stderr[-2000:]
    lines = "".join(f"/lang {language}\n{question}\n/clear\n" for question, language in FREE_QUESTIONS)
    chat = run_cli("--mode", "chat", "--demo", cwd=demo_folder, stdin=lines + "/exit\n")
    assert chat.returncode == 0, chat.stderr[-2000:]
    answers = ANSWER.findall(infer.stdout) + ANSWER.findall(chat.stdout)
    asked = ["German"] + [language for _, language in FREE_QUESTIONS]  # infer's: the demo's German
    assert [language for language, _ in answers] == asked, infer.stdout + chat.stdout
    assert all(len(reasoning.split()) >= 5 for _, reasoning in answers), answers  # no one stopped thinking
    matched = [sft.detect_language(reasoning) == language for language, reasoning in answers]
    assert sum(matched) >= 9, answers


def test_the_demo_tokenizer_takes_any_text(demo_model):
    """Byte-level BPE: words, scripts and symbols the demo's texts never had still encode, and decode back."""
    tokenizer = sft.load_tokenizer(str(demo_model))
    for text in ["Wie spät ist es in Tokio?", "Écris un poème sur la mer", "東京は今何時ですか？ 🙂", "Ωμέγα — ñandú"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids


def test_the_demo_trains_the_same_adapter_whatever_the_machines_thread_count(tmp_path, monkeypatch, demo_model):
    """The demo's numbers (the README's, the tests') are what a user gets on any machine: its setup puts torch on one
    thread, and a few steps of the demo's training on a machine that gives torch two write the same bytes as on one."""
    import torch

    monkeypatch.chdir(tmp_path)
    threads, written = torch.get_num_threads(), []
    try:
        for machine in (2, 1):
            torch.set_num_threads(machine)
            cfg = sft.parse_config(["--demo", "--max_steps", "3", "--report_to", "none", "--output_dir", f"on{machine}"])
            sft.ensure_demo_model(cfg)  # the demo's setup, as main runs it before the mode
            sft.run_train(cfg)
            written.append((tmp_path / f"on{machine}" / "adapter_model.safetensors").read_bytes())
    finally:
        torch.set_num_threads(threads)
    assert written[0] == written[1]
