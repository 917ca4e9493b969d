"""Careless and bad uses across the four modes: each ends in one line on stderr and exit code 2, before anything
is loaded, with no traceback, nothing on stdout and no file written or deleted in the folder it ran from."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import SCRIPT, assert_usage_error, resolve, run_cli, snapshot, sft, write_jsonl

ROW = {"reasoning_language": "French", "developer": "You are terse.", "user": "2+2?", "analysis": "Deux plus deux.",
       "final": "4"}


@pytest.fixture
def workdir(tmp_path, monkeypatch, demo_model):
    """A user's folder: their notes, a dataset in the right shape and a few in the wrong one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.txt").write_text("three years of work\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "code.py").write_text("print('mine')\n")
    write_jsonl(tmp_path / "mydata.jsonl", [ROW, ROW])
    (tmp_path / "latin.jsonl").write_bytes(json.dumps(ROW).encode() + b"\n" + '{"user": "caf\u00e9"}'.encode("latin-1"))
    (tmp_path / "table.csv").write_text("user,final\n2+2?,4\n")
    write_jsonl(tmp_path / "nulllang.jsonl", [ROW, {**ROW, "reasoning_language": None}])
    write_jsonl(tmp_path / "klingon.jsonl", [ROW, {**ROW, "reasoning_language": "Klingon"}])
    (tmp_path / "listline.jsonl").write_text(json.dumps(ROW) + "\n[1, 2, 3]\n")
    (tmp_path / "unknown_key.yaml").write_text("learning_rat: 1.0e-4\n")
    (tmp_path / "bomb.yaml").write_text("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{x}: &{x} [{', '.join([f'*{p}'] * 9)}]\n" for p, x in zip("abcdefgh", "bcdefghi")) + "target_modules: *i\n")
    (tmp_path / "not_an_adapter").mkdir()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(demo_model)}))
    shutil.copytree(tmp_path / "adapter", tmp_path / "truncated")
    (tmp_path / "truncated" / "adapter_model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{")
    return tmp_path


TRAIN = ["--dataset", "mydata.jsonl", "--output_dir", "out", "--report_to", "none"]  # + --model <demo model>

CASES = [
    # train: flags
    (["--lr", "1e-4"], "unrecognized arguments: --lr 1e-4"),
    (["--learning", "1e-4"], "unrecognized arguments: --learning 1e-4"),  # no abbreviations
    (["--mode", "bogus"], "argument --mode: invalid choice: 'bogus'"),
    (["--batch_size", "0"], "--batch_size (--per_device_train_batch_size) must be a positive integer, got 0"),
    (["--max_samples", "0"], "--max_samples (--limit) must be a positive integer, got 0"),
    (["--max_seq_length", "abc"], "argument --max_seq_length/--max-seq-length/--max_length/--max-length: invalid int"),
    (["--mode", "infer", "--temperature", "-1"], "--temperature cannot be negative, got -1.0"),
    (["--eval_split", "1.5"], "--eval_split must be in [0, 1), got 1.5"),
    (["--attn_implementation", "flash_attention_2"], "invalid choice: 'flash_attention_2'"),
    (["--report_to", "wandb"], "--report_to wandb needs its package: pip install wandb"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
    (["--lr_scheduler_type", "cosine_with_min_lr"], "--lr_scheduler_type cosine_with_min_lr and --min_lr_rate go together"),
    (["--use_4bit", "--target_parameters", "mlp.experts.down_proj"], "--use_4bit keeps the expert weights in MXFP4"),
    (["--deepspeed", "bogus.json"], "--deepspeed bogus.json: not 'zero3' and not a readable DeepSpeed JSON file"),
    (["--score_file", "x.jsonl"], "--score_file is an eval setting; --mode train does not read it"),
    (["--config", "missing.yaml"], "--config missing.yaml: no such file or directory"),
    (["--config", "unknown_key.yaml"], "unknown setting 'learning_rat' (did you mean learning_rate?)"),
    (["--config", "bomb.yaml"], "--config bomb.yaml: b holds nested values; a setting is a number, a string or a list"),
    # train: what the libraries would only reject after loading the model
    (["MODEL", *TRAIN, "--optim", "adamw_bogus"], "--optim 'adamw_bogus' is not one of transformers' names"),
    (["MODEL", *TRAIN, "--lr_scheduler_type", "cosine_bogus"], "--lr_scheduler_type 'cosine_bogus' is not one of"),
    (["MODEL", *TRAIN, "--target_modules", "c_attn"], "--target_modules c_attn: no such Linear layer in"),
    (["MODEL", *TRAIN, "--target_parameters", "mlp.bogus"], "--target_parameters mlp.bogus: no such parameter in"),
    # train: files
    (["MODEL", *TRAIN[2:], "--dataset", "latin.jsonl"], "latin.jsonl line 2 is not UTF-8 (byte 0xe9)"),
    (["MODEL", *TRAIN[2:], "--dataset", "table.csv"], "row 1: missing column(s) reasoning_language, analysis"),
    (["MODEL", *TRAIN[2:], "--dataset", "thesis.txt"], "is a .txt file; datasets are read from .jsonl, .json"),
    (["MODEL", *TRAIN[2:], "--dataset", "gone.jsonl"], "dataset file gone.jsonl does not exist"),
    (["MODEL", *TRAIN[2:], "--dataset", "nulllang.jsonl"], "row 2: column 'reasoning_language' must be a string, got null"),
    (["MODEL", *TRAIN[2:], "--dataset", "klingon.jsonl"], "row 2: reasoning_language: unknown language 'Klingon'"),
    (["MODEL", *TRAIN[2:], "--dataset", "listline.jsonl"], "dataset file listline.jsonl line 2 is [1, 2, 3], not an "
                                                           "object (a row): one object per line"),
    (["MODEL", *TRAIN[:2], "--output_dir", "."], "--output_dir . is the folder you are in"),
    (["MODEL", *TRAIN[:2], "--output_dir", "thesis.txt"], "--output_dir thesis.txt is a file"),
    (["MODEL", *TRAIN[:2], "--output_dir", "src", "--overwrite"], "--output_dir src holds files this tool did not write"),
    (["MODEL", *TRAIN[:2], "--output_dir", "thesis.txt/out"], "thesis.txt is a file, so no folder can be made in it"),
    (["MODEL", *TRAIN[:2], "--output_dir", "x" * 300], "is longer than the 255 bytes the file system allows"),
    # empty paths (an unset shell variable), non-finite numbers, a seed numpy cannot take, train given an adapter
    (["--output_dir", ""], "--output_dir is empty: give a path"),
    (["--mode", "merge", "--adapter", "adapter", "--output_dir", "  "], "--output_dir is empty: give a path"),
    (["--dataset", ""], "--dataset is empty: give a path"),
    (["--mode", "infer", "--adapter", "", "--prompt", "hi"], "--adapter is empty: give a path"),
    (["--num_train_epochs", "inf"], "--num_train_epochs must be a finite number, got inf"),
    (["--mode", "infer", "--temperature", "nan", "--prompt", "hi"], "--temperature must be a finite number, got nan"),
    (["--learning_rate=-inf"], "--learning_rate must be a finite number, got -inf"),
    (["--seed=-1"], "--seed must be in [0, 2**32), got -1"),
    (["MODEL", *TRAIN, "--adapter", "adapter"], "--adapter is for infer, chat, eval, grpo and merge: train makes a new adapter"),
    (["--model", "./nowhere", *TRAIN], "model directory ./nowhere does not exist"),
    # infer
    (["--mode", "infer", "--json", "--raw", "--prompt", "hi"], "--json and --raw are two output formats"),
    (["--mode", "infer", "--reasoning_language", " ", "--prompt", "hi"], "--reasoning-language is empty"),
    (["--mode", "infer", "--adapter", "not_an_adapter", "--prompt", "hi"], "is not a LoRA adapter directory"),
    (["--mode", "infer", "MODEL", "--prompt", "  "], "no prompt: pass --prompt"),
    (["--mode", "infer", "--model", "../nowhere", "--prompt", "hi"], "model directory ../nowhere does not exist"),
    (["--mode", "infer", "--adapter", "truncated", "--prompt", "hi"],
     "--adapter truncated: adapter_model.safetensors cannot be read ("),
    # eval
    (["--mode", "eval", "--score_file", "missing.jsonl"], "--score-file missing.jsonl does not exist"),
    (["--mode", "eval", "--score_file", "latin.jsonl"], "latin.jsonl line 2 is not UTF-8"),
    (["--mode", "eval", "--eval_batch_size", "0", "--adapter", "adapter"], "--eval_batch_size must be a positive integer"),
    (["--mode", "eval", "--compare-base"], "--compare-base needs --adapter"),
    # merge
    (["--mode", "merge"], "--mode merge needs --adapter"),
    (["--mode", "merge", "--adapter", "adapter", "--use_4bit"],
     "--use_4bit is a train, infer, chat, eval and grpo setting; --mode merge does not read it"),
    (["--mode", "merge", "--adapter", "adapter", "--output_dir", "."], "--output_dir . is the folder you are in"),
    (["--mode", "merge", "--adapter", "adapter", "--output_dir", "src"], "--output_dir src holds files this tool did not"),
]


@pytest.mark.parametrize("argv, needle", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(workdir, demo_model, capsys, argv, needle):
    argv = [a for arg in argv for a in (["--model", str(demo_model)] if arg == "MODEL" else [arg])]
    before = snapshot(workdir)
    try:
        code = sft.main(argv)
    except SystemExit as e:  # argparse's errors exit from inside the parser
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert snapshot(workdir) == before


def test_offline_without_hf_hub_offline_fails_in_one_line_without_retries(tmp_path):
    """The README's own infer command, the Hub unreachable and HF_HUB_OFFLINE unset: no download retries."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="https://127.0.0.1:9", HF_HOME=str(tmp_path / "empty_cache"))  # nothing listens there
    result = run_cli("--mode", "infer", stdin="2+2?", cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 2 and "Retrying" not in result.stderr, result.stderr
    assert result.stderr == ("error: 'openai/gpt-oss-20b' is not a local directory and not in the Hugging Face cache, "
                             "and the Hub is offline; connect to the Hub once or pass a local directory\n")
    assert result.stdout.startswith("note: there is no CUDA GPU here and openai/gpt-oss-20b is a full-size model")


def test_push_to_hub_is_refused_before_training_when_the_hub_is_unreachable(tmp_path, demo_model):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="https://127.0.0.1:9")
    result = run_cli("--model", str(demo_model), "--dataset", str(sft.DEMO_DATASET), "--push_to_hub", "--hub_model_id",
                     "you/x", "--output_dir", str(tmp_path / "out"), cwd=tmp_path, env=env)
    assert_usage_error(result, "--push_to_hub: the Hugging Face Hub is unreachable")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ctrl_c_in_training_is_one_line_exit_130_naming_the_checkpoint(tmp_path, demo_model):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--model", str(demo_model), "--dataset",
                                str(sft.DEMO_DATASET), "--max_seq_length", "256", "--report_to", "none",
                                "--max_steps", "10000", "--save_steps", "2", "--output_dir", str(out)],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-2" / "trainer_state.json").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()  # a run that ignored Ctrl-C would otherwise train on after the test
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and f"the last checkpoint is {out}/checkpoint-" in last, last
    assert last.endswith("run the same command with --resume to continue from it")
    assert not (out / "adapter_config.json").exists()  # no half-written adapter


def run_in_shell(command, tmp_path, env=None):
    return subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
@pytest.mark.parametrize("stdin, needle", [
    ("0<&-", "error: no prompt: pass --prompt"),  # stdin closed
    ("< /dev/urandom head -c 64 |", "error: the prompt on stdin is not UTF-8 text"),
])
def test_infer_with_stdin_closed_or_binary_is_one_line(tmp_path, demo_model, stdin, needle):
    (tmp_path / "thesis.txt").write_text("mine")
    before = snapshot(tmp_path)
    pipe = stdin if stdin.endswith("|") else ""
    command = (f"{pipe} {sys.executable} {SCRIPT} --mode infer --model {demo_model} "
               f"{'' if pipe else stdin}").replace("< /dev/urandom head -c 64 |", "printf '\\xff\\xfe\\x00' |")
    result = run_in_shell(command, tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(needle), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and snapshot(tmp_path) == before


@pytest.mark.slow
def test_chat_with_stdin_closed_and_an_output_dir_that_cannot_be_made_are_one_line(tmp_path, demo_model):
    result = run_in_shell(f"{sys.executable} {SCRIPT} --mode chat --model {demo_model} 0<&-", tmp_path)
    assert result.returncode == 2 and result.stderr == "error: --mode chat reads your questions on stdin, which is closed\n"
    result = run_cli("--model", str(demo_model), "--dataset", str(sft.DEMO_DATASET), "--report_to", "none",
                     "--output_dir", "/proc/no_such_dir/out", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: --output_dir /proc/no_such_dir/out cannot be made:")


def test_a_closed_pipe_ends_quietly_and_an_ascii_terminal_gets_no_traceback(tmp_path):
    result = run_in_shell(f"{sys.executable} {SCRIPT} --print-config | head -c 0; exit ${{PIPESTATUS[0]}}", tmp_path)
    assert result.stderr == "" and result.stdout == "" and result.returncode in (0, 1)
    result = run_cli("--mode", "infer", "--prompt", "Ça va ? 你好", "--print-config", cwd=tmp_path,
                     env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0 and result.stderr == "" and "\\xc7a va ? \\u4f60\\u597d" in result.stdout


@pytest.mark.slow
def test_a_prompt_over_the_context_is_refused_with_the_numbers(tmp_path, demo_model):
    result = run_cli("--mode", "infer", "--model", str(demo_model), "--prompt", " ".join(map(str, range(5000))), cwd=tmp_path)
    assert_usage_error(result, "over the 4,096 tokens of")  # before the model loads: nothing else printed
    assert result.stderr.startswith("error: the prompt is ")


def test_a_write_that_finds_no_room_is_one_line_exit_1_and_leaves_nothing_half_written(tmp_path):
    """A full disk, a quota or a file-size limit (the one a test can set): the eval report cannot be written."""
    import resource

    (tmp_path / "thesis.txt").write_text("mine")
    write_jsonl(tmp_path / "outs.jsonl", [{"reasoning_language": "German", "analysis": "Ich rechne nach. " * 40,
                                           "final": "4"}] * 5)
    before = snapshot(tmp_path)
    result = subprocess.run([sys.executable, str(SCRIPT), "--mode", "eval", "--score-file", "outs.jsonl",
                             "--output_dir", "ev"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Writing ev/eval_results.json failed: file too large; "), line
    assert "nothing half-written is left. Make room and run the same command again." in line
    assert snapshot(tmp_path) == {**before, f"ev/{sft.OWNER_FILE}": (tmp_path / "ev" / sft.OWNER_FILE).read_bytes()}


def test_a_demo_cache_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "thesis.txt").write_text("mine")
    before = snapshot(tmp_path)
    result = run_cli("--demo", "--report_to", "none", cwd=tmp_path,
                     env={**os.environ, "GPT_OSS_SFT_CACHE": str(tmp_path / "thesis.txt")})
    assert_usage_error(result, f"the demo's cache {tmp_path / 'thesis.txt'} cannot be made (file exists); set "
                               "GPT_OSS_SFT_CACHE to a folder you can write")
    assert snapshot(tmp_path) == before


def test_a_garbled_adapter_config_is_named_as_such(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "openai/gpt-oss-20b",')
    for mode in ("infer", "merge"):
        with pytest.raises(sft.UsageError, match=f"^--adapter {tmp_path / 'adapter'}: adapter_config.json is not "
                                                 "valid JSON \\("):
            resolve("--mode", mode, "--adapter", str(tmp_path / "adapter"))
