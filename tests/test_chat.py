"""Talk to it: streamed answers equal the finished ones, and the chat (history, commands, /save, Ctrl-C), on the demo's
tokenizer with scripted answers where the chat's own logic is under test, and on the tiny model in a terminal."""

import dataclasses
import io
import json
import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import gpt_oss_20b_sft as sft
from conftest import SCRIPT, ScriptedModel, assert_usage_error, file_size_limit, resolve, run_cli

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
FIRST, SECOND = "What is 7 x 8?", "How many hours are in a week?"
CHAT_FLAGS = ("--temperature", "0", "--max_new_tokens", "200")
# What the scripted model answers them: reasoning, then a final message (a turn without one is not kept).
ANSWERS = {FIRST: "<|channel|>analysis<|message|>Je multiplie 7 par 8 : cela fait 56. Je réponds brièvement avec le "
                  "produit.<|end|><|start|>assistant<|channel|>final<|message|>7 x 8 = 56.<|return|>",
           SECOND: "<|channel|>analysis<|message|>Una settimana ha sette giorni e ogni giorno ha 24 ore, quindi sono "
                   "168 ore.<|end|><|start|>assistant<|channel|>final<|message|>168 hours.<|return|>"}


@pytest.fixture(scope="module")
def loaded(demo_model):
    """The chat's settings, the scripted model and the demo's real tokenizer."""
    cfg = resolve("--mode", "chat", "--model", str(demo_model), *CHAT_FLAGS)
    tokenizer = sft.load_tokenizer(str(demo_model))
    return cfg, ScriptedModel(tokenizer, ANSWERS), tokenizer


@pytest.fixture(scope="module")
def two_turns(loaded):
    """A real chat: a question reasoned in French, /lang italian, a follow-up. (session, printer of each turn, what
    was printed)."""
    cfg, model, tokenizer = loaded
    out = io.StringIO()
    session = sft.ChatSession("French", None, "medium")
    stdout, sys.stdout = sys.stdout, out
    try:
        session, first = sft.chat_turn(cfg, model, tokenizer, session, FIRST)
        session, message = sft.handle_command("/lang italian", session)
        session, second = sft.chat_turn(cfg, model, tokenizer, session, SECOND)
    finally:
        sys.stdout = stdout
    assert message == "reasoning language: Italian"
    return session, first, second, out.getvalue()


# --- streaming


@pytest.mark.parametrize("prompt, language, temperature, tokens, scripted", [
    (FIRST, "French", "0", "120", True),  # analysis, then a final answer closed by <|return|>
    ("Quelle est la capitale de la France ?", "French", "0.6", "120", False),  # the tiny model sampling, same seed
    (SECOND, "German", "0", "12", True),  # no final within the tokens: the placeholder line
])
def test_streamed_text_equals_the_finished_output(demo_model, loaded, capsys, monkeypatch, prompt, language,
                                                  temperature, tokens, scripted):
    if scripted:
        monkeypatch.setattr(sft, "load_for_inference", lambda cfg, runtime, chat: loaded[1:])
    argv = ("--mode", "infer", "--model", str(demo_model), "--prompt", prompt, "--reasoning-language", language,
            "--temperature", temperature, "--max_new_tokens", tokens)
    finished = sft.run_infer(resolve(*argv, "--no-stream"))
    assert scripted is False or (finished["final"] is None) == (tokens == "12")
    whole = capsys.readouterr().out
    writes = []

    class Recording(io.StringIO):  # stdout, remembering each write
        def write(self, text):
            writes.append(text)
            return super().write(text)

    monkeypatch.setattr(sys, "stdout", Recording())
    streamed = sft.run_infer(resolve(*argv, "--stream"))
    assert "".join(writes) == whole
    assert streamed == finished
    assert whole.startswith(f"--- reasoning ({language}) ---\n") and "\n\n--- final answer ---\n" in whole
    assert len(writes) > 10  # piece by piece, not once at the end


def feed(printer, ids, prompt=(1, 2, 3)):
    """What generate() hands a streamer: the prompt's ids, then one token at a time, then end()."""
    printer.put(torch.tensor([list(prompt)]))
    for token in ids:
        printer.put(torch.tensor([token]))
    printer.end()


@pytest.mark.parametrize("transcript", [
    "<|channel|>analysis<|message|>  Ich rechne: 7 × 8 = 56 🎉, 你好。\n\n<|end|><|start|>assistant<|channel|>final"
    "<|message|> Die Antwort ist 56 — 答案是五十六。 <|return|>",
    "<|channel|>analysis<|message|>Erst dies.<|end|><|start|>assistant<|channel|>analysis<|message|>  Dann das 🙂"
    "<|end|><|start|>assistant<|channel|>final<|message|>Ende<|end|><|start|>assistant<|channel|>final<|message|>"
    "und mehr",  # two messages per channel, joined by a newline; the last cut off
    "<|channel|>analysis<|message|>ünter<|end|><|start|>assistant<|channel|>analysis<|message|>",  # no final
    "<|channel|>final<|message|>Nur die Antwort<|return|>",  # no reasoning
    "<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>analysis<|message|><|end|>",  # empty, joined
    "just text, 日本語, no channel",  # no harmony at all: the raw text once generation ends
])
def test_streaming_on_the_real_tokenizer_prints_whole_characters(real_tokenizer, transcript):
    ids = real_tokenizer.encode(transcript, add_special_tokens=False)
    pieces = [real_tokenizer.decode([t]) for t in ids]
    result = sft.split_channels(ids, real_tokenizer)
    expected = sft.format_answer(result, real_tokenizer.decode(ids), "German")
    plain, dimmed = io.StringIO(), io.StringIO()
    feed(sft.AnswerPrinter(real_tokenizer, "German", plain), ids)
    feed(sft.AnswerPrinter(real_tokenizer, "German", dimmed, dim=True), ids)
    assert plain.getvalue() == expected and "\ufffd" not in expected
    assert ANSI.sub("", dimmed.getvalue()) == expected
    if result["analysis"].strip():  # the reasoning, and only it, is dimmed
        assert f"{sft.DIM}{result['analysis'].strip()}{sft.PLAIN}\n\n--- final answer ---" in dimmed.getvalue()
    if "🎉" in transcript:
        assert any("\ufffd" in p for p in pieces)  # the case at stake: a character split over tokens


def test_stream_follows_the_terminal_and_leaves_json_and_raw_whole():
    assert resolve("--mode", "infer").stream is False  # pytest's stdout is no terminal
    assert resolve("--mode", "infer", "--stream").stream is True
    assert resolve("--mode", "chat").stream is True and resolve("--mode", "chat", "--no-stream").stream is False
    assert resolve("--mode", "infer", "--json").stream is False


@pytest.mark.parametrize("argv, needle", [
    (["--mode", "infer", "--stream", "--json", "--prompt", "hi"], "--stream prints text as it is generated, --json"),
    (["--mode", "infer", "--stream", "--raw", "--prompt", "hi"], "--stream prints text as it is generated, --raw"),
    (["--mode", "chat", "--json"], "--mode chat prints text"),
    (["--mode", "chat", "--demo", "--reasoning-language", "Klingon"], "--reasoning-language: unknown language"),
])
def test_contradictions_are_one_line(tmp_path, argv, needle):
    assert_usage_error(run_cli(*argv, cwd=tmp_path), needle)


# --- chat


def test_history_is_kept_in_harmonys_way(two_turns, loaded):
    session, first, second, printed = two_turns
    _, _, tokenizer = loaded
    (one, two) = session.rows
    assert one["final"] and two["final"]  # both turns kept
    # turn 2's prompt, as the model received it, is the template's rendering of the history without turn 1's analysis
    history = [{"role": "system", "content": "reasoning language: Italian"}, {"role": "user", "content": FIRST},
               {"role": "assistant", "content": one["final"]}, {"role": "user", "content": SECOND}]
    rendered = tokenizer.apply_chat_template(history, add_generation_prompt=True, reasoning_effort="medium",
                                             return_dict=True)["input_ids"]
    assert second.prompt == list(rendered)
    assert one["analysis"].strip() and one["analysis"] not in tokenizer.decode(second.prompt)
    assert first.prompt == list(tokenizer.apply_chat_template(
        sft.build_chat(FIRST, "French"), add_generation_prompt=True, reasoning_effort="medium", return_dict=True)["input_ids"])
    assert printed.count("--- reasoning (French) ---") == 1 and printed.count("--- reasoning (Italian) ---") == 1
    assert two["messages"] == [history[0], *session.history]
    assert session.history[1] == {"role": "assistant", "content": one["final"], "thinking": one["analysis"]}


def test_chat_without_streaming_prints_the_same_answer_at_the_end(loaded, capsys):
    cfg, model, tokenizer = loaded
    printed = []
    for stream in (True, False):
        session, printer = sft.chat_turn(dataclasses.replace(cfg, stream=stream), model, tokenizer,
                                         sft.ChatSession("French", None, "medium"), FIRST)
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] == sft.format_answer(sft.split_channels(printer.ids, tokenizer),
                                                         tokenizer.decode(printer.ids), "French") + "\n"
    assert session.rows[0]["final"].strip() in printed[1]


def test_the_real_template_drops_earlier_analysis(real_tokenizer, pinned_date):
    session = sft.ChatSession("French", "Spanish", "high").answered("Combien font 7 x 8 ?", "SECRET-ANALYSIS", "56")
    with_analysis = real_tokenizer.apply_chat_template(session.messages("Et 9 x 9 ?"), add_generation_prompt=True,
                                                       reasoning_effort="high", tokenize=False)
    without = [{"role": "system", "content": "reasoning language: French\n\nAlways write the final answer in Spanish."},
               {"role": "user", "content": "Combien font 7 x 8 ?"}, {"role": "assistant", "content": "56"},
               {"role": "user", "content": "Et 9 x 9 ?"}]
    assert with_analysis == real_tokenizer.apply_chat_template(without, add_generation_prompt=True,
                                                               reasoning_effort="high", tokenize=False)
    assert "SECRET-ANALYSIS" not in with_analysis
    assert ("<|start|>user<|message|>Combien font 7 x 8 ?<|end|><|start|>assistant<|channel|>final<|message|>56<|end|>"
            "<|start|>user<|message|>Et 9 x 9 ?<|end|><|start|>assistant") in with_analysis


def test_commands():
    session = sft.ChatSession("English", None, "medium", history=({"role": "user", "content": "q"},), rows=({},))
    expected = [("/lang german", "reasoning language: German", dict(reasoning_language="German")),
                ("/answer spanish", "answer language: Spanish", dict(answer_language="Spanish")),
                ("/answer", "answer language: not set", dict(answer_language=None)),
                ("/effort high", "reasoning effort: high", dict(reasoning_effort="high")),
                ("/clear", "new conversation (the earlier turns stay in /save)", dict(history=()))]
    for line, message, changed in expected:
        after, said = sft.handle_command(line, session)
        assert said == message and after == dataclasses.replace(session, **changed)
    for line, needle in [("/lang Klingon", "error: /lang: unknown language 'Klingon'"),
                         ("/lang", "error: /lang needs a value: /lang French"),
                         ("/effort extreme", "error: /effort extreme: choose low, medium or high"),
                         ("/save", "error: /save needs a value"), ("/bogus", "error: unknown command /bogus")]:
        after, said = sft.handle_command(line, session)
        assert after == session and said.startswith(needle) and "\n" not in said
    assert sft.handle_command("/lang Deutsch", session)[1] == "reasoning language: German"  # the rule of every mode
    anything = dataclasses.replace(session, any_language=True)  # --allow-any-language
    assert sft.handle_command("/lang Klingon", anything)[1] == "reasoning language: Klingon"
    assert sft.handle_command("/help", session) == (session, sft.CHAT_HELP)
    assert sft.handle_command("/exit", session)[0] is None


def test_save_leaves_out_turns_without_reasoning(tmp_path):
    session = sft.ChatSession("French", None, "low").answered("a?", "", "A").answered("b?", "je pense", "B")
    path = tmp_path / "c.jsonl"
    assert sft.handle_command(f"/save {path}", session)[1] == f"saved 1 turn to {path} (1 without reasoning left out)"
    (row,) = sft.read_rows(str(path))
    assert sft.prepare_chats([row]) == [[
        {"role": "system", "content": "reasoning language: French"}, {"role": "user", "content": "a?"},
        {"role": "assistant", "content": "A", "thinking": ""}, {"role": "user", "content": "b?"},
        {"role": "assistant", "content": "B", "thinking": "je pense"}]]
    empty = sft.ChatSession("French", None, "low").answered("a?", " ", "A")
    assert sft.handle_command(f"/save {tmp_path / 'd.jsonl'}", empty)[1] == "error: /save: no answer with reasoning yet"


def test_a_save_the_file_system_refuses_is_one_line_and_the_turns_stay(tmp_path):
    session = sft.ChatSession("French", None, "low").answered("a?", "je pense", "A")
    too_long = tmp_path / ("x" * 300 + ".jsonl")  # past the file system's 255 bytes per name
    after, said = sft.handle_command(f"/save {too_long}", session)
    assert after == session and said == f"error: /save {too_long}: file name too long"
    assert list(tmp_path.iterdir()) == []
    assert sft.handle_command(f"/save {tmp_path / 'c.jsonl'}", after)[1] == f"saved 1 turn to {tmp_path / 'c.jsonl'}"


def test_a_save_onto_a_full_disk_is_one_line_leaves_nothing_and_the_turns_stay(tmp_path):
    """Issue 38: the write fails part-way (a file size limit for this process, as a full disk fails it: EFBIG)."""
    session = sft.ChatSession("French", None, "low").answered("a?", "je pense " * 500, "A")
    with file_size_limit(1000):
        after, said = sft.handle_command(f"/save {tmp_path / 'c.jsonl'}", session)
    assert after == session and said == f"error: /save {tmp_path / 'c.jsonl'}: file too large"
    assert list(tmp_path.iterdir()) == []
    assert sft.handle_command(f"/save {tmp_path / 'c.jsonl'}", after)[1] == f"saved 1 turn to {tmp_path / 'c.jsonl'}"


@pytest.mark.slow
def test_save_writes_rows_train_reads_and_refuses_foreign_files(two_turns, tmp_path, demo_model):
    session = two_turns[0]
    path = tmp_path / "chat.jsonl"
    assert sft.handle_command(f"/save {path}", session) == (session, f"saved 2 turns to {path}")
    assert sft.handle_command(f"/save {path}", session)[1] == f"saved 2 turns to {path}"  # its own file: replaced
    rows = sft.read_rows(str(path))
    chats = sft.prepare_chats(rows)
    assert [sft.reasoning_language_of(r, c) for r, c in zip(rows, chats)] == ["French", "Italian"]
    assert chats[1][0] == {"role": "system", "content": "reasoning language: Italian"} and len(chats[1]) == 5
    assert [i["reasoning_language"] for i in sft.read_score_file(str(path))] == ["French", "Italian"]
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text('{"messages": []}\n')
    for target, needle in [(foreign, "the file exists and this chat did not write it"),
                           (tmp_path / "chat.txt", "name a .jsonl file"), (tmp_path / "no" / "c.jsonl", "no folder")]:
        after, said = sft.handle_command(f"/save {target}", session)
        assert after == session and said.startswith(f"error: /save {target}: ") and needle in said
    assert foreign.read_text() == '{"messages": []}\n' and not (tmp_path / "chat.txt").exists()
    # train mode takes the file as its dataset
    out = tmp_path / "adapter"
    sft.run_train(resolve("--demo", "--model", str(demo_model), "--dataset", str(path), "--output_dir", str(out),
                          "--max_steps", "1", "--report_to", "none"))
    assert json.loads((out / "run_summary.json").read_text())["data"]["rows_used"] == 2


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(loaded, monkeypatch):
    cfg, model, tokenizer = loaded
    monkeypatch.setattr(sft, "load_for_inference", lambda cfg, runtime: (model, tokenizer))  # loaded once for the module
    asked = []

    class Terminal(io.StringIO):
        """stdout; the user presses Ctrl-C (a real SIGINT) once the first answer's reasoning starts."""
        def write(self, text):
            if "--- reasoning" in text and not asked[1:]:
                signal.raise_signal(signal.SIGINT)
            return super().write(text)

    lines = iter([FIRST, KeyboardInterrupt, FIRST])

    def ask(prompt):
        asked.append(prompt)
        line = next(lines, EOFError)
        if isinstance(line, type):
            raise line
        return line

    monkeypatch.setattr(sys, "stdout", Terminal())
    session = sft.run_chat(dataclasses.replace(cfg, reasoning_language="French"), ask=ask)
    printed = sys.stdout.getvalue()
    assert asked == ["you> "] * 4  # back at the prompt after the stop, after Ctrl-C at the prompt, until Ctrl-D
    stopped, rest = printed.split("[stopped: this answer is not kept]\n", 1)
    assert "(Ctrl-D or /exit leaves)" in rest
    again = rest[rest.index("--- reasoning (French) ---"):]
    cut = stopped[stopped.index("--- reasoning (French) ---"):].rstrip()
    assert again.startswith(cut) and len(again) > len(cut) + 20  # the same answer, stopped early the first time
    assert len(session.rows) == 1 and session.rows[0]["user"] == FIRST  # the stopped turn is not kept
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C outside generation as before


class Pty:
    """The script in a pseudo-terminal, as a user runs it: what it prints, and keys typed into it."""

    def __init__(self, *args, cwd):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: stdin, stdout and stderr are the terminal
            os.chdir(cwd)
            os.execv(sys.executable, [sys.executable, str(SCRIPT), *args])
        self.text = ""

    def expect(self, needle, deadline=600):
        """Read until needle appears after what was read before; the transcript so far on failure."""
        start, limit = len(self.text), time.monotonic() + deadline  # a guard against hanging, not a timing assertion
        while needle not in self.text[start:]:
            assert time.monotonic() < limit, f"no {needle!r} in:\n{self.text}"
            if select.select([self.fd], [], [], 1)[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                assert chunk, f"the chat ended before {needle!r}:\n{self.text}"
                self.text += chunk.decode("utf-8", "replace")
        return self.text[start:]

    def waiting_for_a_key(self, deadline=60):
        """Return once the chat's main thread sleeps in select() on the terminal. Ctrl-C typed the instant the prompt
        appears, before readline waits, is seen only at the next key: CPython's readline checks for signals when its
        select() is interrupted, not before it starts (a window no person can type into)."""
        limit = time.monotonic() + deadline  # a guard against hanging, not a timing assertion
        while "poll_schedule_timeout" not in Path(f"/proc/{self.pid}/wchan").read_text():
            assert time.monotonic() < limit, f"the chat is not waiting for a key:\n{self.text}"
            time.sleep(0.05)

    def type(self, keys):
        os.write(self.fd, keys.encode())

    def wait(self, deadline=120):
        """The exit code, once the child has ended (what it still prints is read, so it never blocks on writing)."""
        limit, open_ = time.monotonic() + deadline, True
        while time.monotonic() < limit:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            if open_ and select.select([self.fd], [], [], 1)[0]:
                try:
                    open_ = bool(os.read(self.fd, 4096))
                except OSError:  # the child closed the terminal
                    open_ = False
            elif not open_:
                time.sleep(0.1)
        raise AssertionError(f"the chat did not end:\n{self.text}")


@pytest.mark.slow
def test_chat_in_a_terminal(tmp_path, demo_model):
    chat = Pty("--mode", "chat", "--model", str(demo_model), "--reasoning-language", "French", *CHAT_FLAGS,
               cwd=tmp_path)
    chat.expect("you> ")
    chat.type(FIRST + "\r")
    first = chat.expect("you> ")
    chat.type("/lang italian\r")
    assert "reasoning language: Italian" in chat.expect("you> ")
    chat.type(SECOND + "\r")
    second = chat.expect("you> ")
    chat.waiting_for_a_key()
    chat.type("\x03")  # Ctrl-C at the prompt: a new prompt
    assert "(Ctrl-D or /exit leaves)" in chat.expect("you> ")
    chat.type("\x04")  # Ctrl-D leaves
    assert chat.wait() == 0
    assert f"{sft.DIM}" in first and f"{sft.PLAIN}\r\n\r\n--- final answer ---" in first  # the reasoning dimmed
    assert "--- reasoning (Italian) ---" in second and "Traceback" not in chat.text
    # the first answer, as shown, is what infer prints without streaming for the same question and settings
    shown = ANSI.sub("", first).replace("\r\n", "\n")
    shown = shown[shown.index("--- reasoning"):shown.rindex("\n\nyou> ")] + "\n"
    infer = run_cli("--mode", "infer", "--model", str(demo_model), "--prompt", FIRST, "--reasoning-language",
                    "French", *CHAT_FLAGS, "--no-stream")
    assert infer.returncode == 0 and shown.startswith(infer.stdout)  # then a note if the turn is not kept
    assert shown[len(infer.stdout):] in ("", "[not kept in the conversation: no final answer]\n")


@pytest.mark.slow
def test_chat_with_demo_and_4bit_reads_stdin_lines(tmp_path, demo_model):
    adapter = tmp_path / "adapter"
    sft.run_train(resolve("--demo", "--model", str(demo_model), "--output_dir", str(adapter), "--max_steps", "1",
                          "--report_to", "none"))
    result = run_cli("--mode", "chat", "--demo", "--use_4bit", "--adapter", str(adapter), "--max_new_tokens", "16",
                     cwd=tmp_path, stdin="What is 7 x 8?\n/effort low\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert f"chat with {adapter}, reasoning in German." in result.stdout
    assert "you> --- reasoning (German) ---\n" in result.stdout and "you> reasoning effort: low\nyou> " in result.stdout
    assert "Traceback" not in result.stderr
