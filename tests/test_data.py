"""Reading rows, validating the schema, building the chat, filtering."""

import json
import math
import subprocess
import sys

import pytest

import gpt_oss_20b_sft as sft
from conftest import ROOT, assert_usage_error, run_cli, write_jsonl

FLAT = {"reasoning_language": "French", "developer": "You are terse.", "user": "2+2?", "analysis": "Deux plus deux.",
        "final": "4"}
HUB_STYLE = {"messages": [
    {"role": "system", "content": "reasoning language: German\n\nYou are terse.", "thinking": None},
    {"role": "user", "content": "3+3?", "thinking": None},
    {"role": "assistant", "content": "6", "thinking": "Drei plus drei."}]}


def test_flat_columns_become_the_datasets_messages():
    assert sft.row_to_messages(FLAT) == [
        {"role": "system", "content": "reasoning language: French\n\nYou are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "thinking": "Deux plus deux."}]


def test_messages_column_is_used_and_cleaned():
    assert sft.row_to_messages(HUB_STYLE) == [
        {"role": "system", "content": "reasoning language: German\n\nYou are terse."},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "thinking": "Drei plus drei."}]


def test_filter_by_language_reads_column_or_system_message():
    rows = [FLAT, HUB_STYLE, {**FLAT, "reasoning_language": "Italian"}]
    assert len(sft.prepare_chats(rows)) == 3
    assert [c[0]["content"] for c in sft.prepare_chats(rows, ["german", "Italian"])] == [
        "reasoning language: German\n\nYou are terse.", "reasoning language: Italian\n\nYou are terse."]
    assert len(sft.prepare_chats(rows, None, max_samples=2)) == 2
    with pytest.raises(sft.UsageError, match="no rows with reasoning language Chinese; the data has French, German"):
        sft.prepare_chats(rows, ["Chinese"])


@pytest.mark.parametrize("row, message", [
    ({"user": "x", "final": "y"}, "row 1: missing column(s) reasoning_language, analysis"),
    ({**FLAT, "final": 3}, "row 1: column 'final' must be a string, got int"),
    ({**FLAT, "analysis": ""}, "row 1: the assistant turn has no 'thinking'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "row 1: the assistant turn has no 'thinking'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "row 1: the last message must be the assistant's answer"),
    ({"messages": "hello"}, "row 1: 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": 5}]}, "row 1: messages[0] needs a string 'role' and a string 'content'"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "row 1: messages[0] has unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "thinking": 42}]},
     "row 1: the assistant turn's 'thinking' must be a string, got int"),
    ({**FLAT, "final": " "}, "row 1: the assistant turn's final answer is empty (nothing to learn to answer)"),
])
def test_schema_errors_name_the_row_and_field(row, message):
    with pytest.raises(sft.UsageError) as e:
        sft.prepare_chats([row])
    assert message in str(e.value)


def test_a_row_that_gives_a_key_twice_is_refused_not_read_as_its_last_value(tmp_path):
    twice = '{"reasoning_language": "German", "user": "q", "analysis": "a", "final": "f", "final": "g"}'
    (tmp_path / "a.jsonl").write_text(json.dumps(FLAT) + "\n" + twice + "\n")
    with pytest.raises(sft.UsageError, match=f"^dataset file {tmp_path / 'a.jsonl'} line 2: the key 'final' is given "
                                             "twice; which value is meant\\?$"):
        sft.read_rows(str(tmp_path / "a.jsonl"))
    (tmp_path / "b.json").write_text(f"[{twice}]")
    with pytest.raises(sft.UsageError, match=f"^dataset file {tmp_path / 'b.json'}: the key 'final' is given twice"):
        sft.read_rows(str(tmp_path / "b.json"))


def test_local_files(tmp_path):
    assert sft.read_rows(write_jsonl(tmp_path / "a.jsonl", [FLAT, HUB_STYLE])) == [FLAT, HUB_STYLE]
    (tmp_path / "b.json").write_text(json.dumps([FLAT]))
    assert sft.read_rows(str(tmp_path / "b.json")) == [FLAT]
    import datasets

    datasets.Dataset.from_list([FLAT, FLAT]).to_parquet(str(tmp_path / "c.parquet"))
    assert sft.read_rows(str(tmp_path / "c.parquet")) == [FLAT, FLAT]
    datasets.Dataset.from_list([FLAT, FLAT]).to_csv(str(tmp_path / "d.csv"), index=False)
    assert sft.read_rows(str(tmp_path / "d.csv")) == [FLAT, FLAT]
    bom = tmp_path / "bom.jsonl"  # what many Windows editors write: UTF-8 with a byte-order mark
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(FLAT, ensure_ascii=False).encode() + b"\n")
    assert sft.read_rows(str(bom)) == [FLAT]


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("", "is empty"),
    ('{"a": 1}\nnot json\n', "line 2 is not valid JSON"),
    ("\n\n", "has no rows"),
])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(sft.UsageError, match=message):
        sft.read_rows(str(path))


def test_unreadable_files_are_one_line_naming_file_and_line(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(FLAT).encode() + b"\n" + '{"user": "caf\u00e9"}'.encode("latin-1") + b"\n")
    with pytest.raises(sft.UsageError) as e:
        sft.read_rows(str(latin))
    assert str(e.value) == (f"dataset file {latin} line 2 is not UTF-8 (byte 0xe9); save it as UTF-8, "
                            "e.g. iconv -f latin1 -t utf-8")
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(sft.UsageError, match=r"is a \.txt file; datasets are read from \.jsonl, \.json, \.parquet, \.csv"):
        sft.read_rows(str(tmp_path / "notes.txt"))
    with pytest.raises(sft.UsageError, match="dataset file gone.csv does not exist"):
        sft.read_rows("gone.csv")  # a missing local file, not a failed Hub download


def test_bundled_sample_is_valid_and_balanced():
    rows = sft.read_rows(str(sft.DEMO_DATASET))
    chats = sft.prepare_chats(rows)
    assert len(chats) >= 40
    counts = {lang: sum(r["reasoning_language"] == lang for r in rows)
              for lang in ("English", "French", "German", "Spanish", "Italian")}
    assert sum(counts.values()) == len(rows) and min(counts.values()) >= 8, counts


@pytest.mark.parametrize("rows, needle", [
    ([{"user": "x"}], "row 1: missing column(s) reasoning_language, analysis, final"),
    ([FLAT, {**FLAT, "analysis": None}], "row 2: the assistant turn has no 'thinking'"),
])
def test_cli_schema_errors(tmp_path, rows, needle):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = run_cli("--dataset", data, "--model", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                  cwd=tmp_path)
    assert_usage_error(out, needle)
    assert not (tmp_path / "out").exists()


def test_cli_missing_and_empty_dataset(tmp_path):
    out = run_cli("--dataset", "missing/data.jsonl", "--model", str(tmp_path), "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert_usage_error(out, "dataset file missing/data.jsonl does not exist")
    (tmp_path / "empty.jsonl").write_text("")
    out = run_cli("--dataset", "empty.jsonl", "--model", str(tmp_path), "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert_usage_error(out, "is empty")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["demo", "real"])
def test_long_texts_are_cut_before_tokenizing_to_what_tokenizing_the_whole_row_keeps(which, request, pinned_date):
    """Every text is cut before it is tokenized, yet the rows come out as TRL makes them: the whole row tokenized,
    then its first max_length tokens kept, ids and labels alike; each is counted as cut."""
    tokenizer = (sft.load_tokenizer(str(request.getfixturevalue("demo_model"))) if which == "demo"
                 else request.getfixturevalue("real_tokenizer"))
    sentence = "Zuerst rechne ich 17 x 23 = 391, dann prüfe ich das Ergebnis noch einmal. "
    rows = [{**FLAT, "analysis": sentence * 400}, {**FLAT, "user": "Warum? " * 3000, "final": "Weil. " * 900},
            {**FLAT, "final": "Darum " * 5000}, FLAT]
    chats = sft.prepare_chats(rows)
    whole = [sft.tokenize_chat(tokenizer, chat) for chat in chats]
    for max_length in (300, 512):  # past the template's system preamble (about 80 tokens in either tokenizer)
        examples, stats = sft.tokenize_chats(tokenizer, chats, max_length)
        kept = [{k: v[:max_length] for k, v in ex.items()} for ex in whole
                if any(label != -100 for label in ex["labels"][1:max_length])]
        assert examples == kept
        assert stats["rows_truncated"] == 3 and stats["rows_dropped_no_labels_left"] == 1  # the long question's
        assert all(len(whole[i]["input_ids"]) > 10 * max_length for i in range(2))  # ten times what a row keeps


def test_training_cuts_rows_ten_times_too_long_counts_them_and_trains_on_them(tmp_path, demo_model):
    """--max_seq_length 64 on rows ten times longer: a run, not a refusal; the rows are cut, counted in the data
    line, the run summary and the end-of-run line, and trained on. The loss is on every token: 64 tokens do not reach
    past the template's system preamble to the assistant's turn."""
    long = {**FLAT, "analysis": "Deux plus deux font quatre, je le vérifie encore une fois. " * 60}
    data = write_jsonl(tmp_path / "rows.jsonl", [long] * 8)
    out = run_cli("--model", str(demo_model), "--dataset", data, "--max_seq_length", "64", "--train_on_all_tokens",
                  "--max-steps", "2", "--batch_size", "2", "--report_to", "none", "--output_dir", str(tmp_path / "out"),
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "data: 8 rows, 8 cut at 64 tokens" in out.stdout and "8 of 8 rows cut at 64 tokens)" in out.stdout
    tokenizer = sft.load_tokenizer(str(demo_model))
    assert len(sft.tokenize_chat(tokenizer, sft.prepare_chats([long])[0])["input_ids"]) > 10 * 64
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert {k: summary["data"][k] for k in ("rows_used", "rows_truncated", "longest_row_tokens",
                                            "labelled_tokens_per_epoch")} == {
        "rows_used": 8, "rows_truncated": 8, "longest_row_tokens": 64, "labelled_tokens_per_epoch": 8 * 63}
    assert math.isfinite(summary["train_loss_last"])
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_a_50_mb_row_at_the_default_length_costs_under_a_gigabyte_and_trains_cut(tmp_path, demo_model):
    """A 50 MB row used to be tokenized whole before it was cut (8.6 GB); now it trains, cut at the default 2,048
    tokens, for less than 1 GB more than the process held before it read the data (peak resident memory)."""
    data = write_jsonl(tmp_path / "big.jsonl", [FLAT, {**FLAT, "analysis": "denke nach " * 5_000_000}])
    assert (tmp_path / "big.jsonl").stat().st_size > 50_000_000
    wrapper = ("import resource, sys; import gpt_oss_20b_sft as s, torch, transformers, trl, peft, datasets; "
               "s.load_tokenizer(sys.argv[1]); before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
               "code = s.main(sys.argv[2:]); "
               "print('grew', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before); sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", wrapper, str(demo_model), "--model", str(demo_model), "--dataset", data,
                          "--max-steps", "1", "--batch_size", "2", "--report_to", "none",
                          "--output_dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "data: 2 rows, 1 cut at 2048 tokens" in out.stdout
    grew_kib = int(out.stdout.split("grew ")[1].split()[0])
    assert grew_kib < 1024 * 1024, f"{grew_kib / 1024:.0f} MiB"
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["data"]["rows_truncated"] == 1 and summary["data"]["longest_row_tokens"] == 2048


def test_a_parquet_file_of_another_schema_is_one_line_and_nothing_else(tmp_path, demo_model):
    """Read with pyarrow: no progress bars from datasets before the error, no copy in datasets' cache."""
    import datasets

    datasets.Dataset.from_list([{"question": "2+2?", "reply": "4"}]).to_parquet(str(tmp_path / "other.parquet"))
    result = run_cli("--demo", "--dataset", "other.parquet", "--report_to", "none", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert len(result.stderr.strip().splitlines()) == 1 and "row 1" in result.stderr, result.stderr
