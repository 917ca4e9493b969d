"""Reading rows, validating the schema, building the chat, filtering."""

import json

import pytest

import gpt_oss_20b_sft as sft
from conftest import assert_usage_error, run_cli, write_jsonl

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
])
def test_schema_errors_name_the_row_and_field(row, message):
    with pytest.raises(sft.UsageError) as e:
        sft.prepare_chats([row])
    assert message in str(e.value)


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


def test_a_row_no_token_budget_could_hold_is_one_line_before_it_is_tokenized(tmp_path, demo_model):
    """A 4 MB row with --max_seq_length 512 could only be cut; tokenizing it whole first is what costs GBs (a 50 MB
    row: 8.6 GB). Refused in one line, nothing written; a row just under the bound is cut as before."""
    huge = {**FLAT, "analysis": "denke " * 700_000}
    data = write_jsonl(tmp_path / "big.jsonl", [FLAT, huge])
    out = run_cli("--dataset", data, "--model", str(demo_model), "--max_seq_length", "512", "--output_dir",
                  str(tmp_path / "out"), "--report_to", "none", cwd=tmp_path)
    assert_usage_error(out, "training example 2 is 4,200,")
    assert "characters, far over --max_seq_length 512 tokens: shorten or drop it" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]
    tokenizer = sft.load_tokenizer(str(demo_model))
    under = sft.prepare_chats([{**FLAT, "analysis": "denke " * 5_000}])
    examples, stats = sft.tokenize_chats(tokenizer, under, max_length=512)
    assert stats["rows_truncated"] == 1 and len(examples[0]["input_ids"]) == 512
