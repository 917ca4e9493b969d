"""Shared set-up and helpers: the tests run offline, on CPU, with a demo cache of their own."""

import contextlib
import datetime
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "gpt-oss-20b"
SCRIPT = ROOT / "gpt_oss_20b_sft.py"
sys.path.insert(0, str(ROOT))

# Offline, local-only logging, and a demo cache private to the test session (set before the script is imported).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("GPT_OSS_SFT_CACHE", str(Path(os.environ.get("PYTEST_CACHE_ROOT", "/tmp")) / "gpt_oss_sft_test_cache"))
os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(SHARED)
os.environ["TRACKIO_DIR"] = TRACKIO_DIR = tempfile.mkdtemp(prefix="trackio_test_")
if os.environ.get("PYTEST_XDIST_WORKER"):  # parallel workers (pytest -n 2): a core each, for them and what they start
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Ctrl-C as in a shell's foreground job, for the tests that send SIGINT to the script: a script's background job
# (`pytest &`) starts with SIGINT ignored, children inherit that, and Python keeps an ignored SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)

import gpt_oss_20b_sft as sft  # noqa: E402  (after the environment above)


def pytest_configure(config):
    config.addinivalue_line("markers", "real_tokenizer: needs ../shared/gpt-oss-20b (skipped when absent)")
    config.addinivalue_line("markers", "slow: starts processes (the script, launchers, kills) or runs the whole demo; "
                                       "-m 'not slow' is the fast tier, CI runs everything")


STARTS_A_PROCESS = re.compile(r"\b(run_cli|run_without|subprocess\.|Popen)\(?")


# The order `pytest -n 2 --dist loadfile --no-loadscope-reorder` hands whole files to the two workers: the longest
# first, so that both end together; test_gguf second, as it builds its own model while the first file builds
# the demo's base, which nearly every other file needs. Files not named follow, in their usual order.
LONGEST_FIRST = ["test_bench", "test_gguf", "test_multi", "test_outputs", "test_grpo", "test_speed", "test_train_infer",
                 "test_merge", "test_config", "test_eval", "test_resume", "test_bad_inputs"]


def pytest_collection_modifyitems(items):
    """A test that starts a process is in the slow tier by that fact, marked or not, so the fast tier stays fast as
    tests are added. Files in LONGEST_FIRST's order, each file's tests in theirs."""
    for item in items:
        function = getattr(item, "function", None)
        if function and "slow" not in item.keywords and STARTS_A_PROCESS.search(inspect.getsource(function)):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


# A short demo run for the tests of a run's mechanics: the sample's first 45 rows (9 per language), 3 epochs, 9 steps
SMALL = ("--limit", "45", "--num_train_epochs", "3")


def demo_training(*extra) -> list:
    """The demo's training as plain flags, without the answer and the table --demo ends with (a quarter of a short
    demo run's time): for the tests of a run's mechanics. test_config checks these resolve to --demo's settings."""
    return ["--model", str(sft.build_demo_model()), "--dataset", str(sft.DEMO_DATASET), "--max_seq_length", "512",
            "--learning_rate", "3e-2", "--num_train_epochs", "10", "--no-gradient-checkpointing", *extra]


def run_cli(*args, cwd=ROOT, stdin=None, timeout=300, env=None):
    """The script as a user runs it: a new process, its exit code and what it printed."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          input=stdin, timeout=timeout, env=env)


def resolve(*argv):
    """The resolved settings of a command line, as main() gets them."""
    return sft.parse_config(list(argv))


def load_to_train(cfg, config=None):
    """The model as training loads it here (its strategy aside): load_model with the run's settings, on the CPU."""
    runtime = sft.find_runtime(cfg)
    return sft.load_model(cfg.model, config or sft.load_model_config(cfg.model), runtime.dtype, "eager", runtime.device,
                          runtime.device_map, use_4bit=cfg.use_4bit, random_init=cfg.random_init, seed=cfg.seed,
                          training=True)


def assert_usage_error(result, needle):
    """A bad input's answer: exit code 2, nothing on stdout, one line on stderr containing needle, no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def snapshot(folder):
    """Every file under folder with its bytes: what 'nothing was written or deleted' compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@contextlib.contextmanager
def file_size_limit(limit: int):
    """For the block, a write of this process past `limit` bytes fails as on a full disk (EFBIG; SIGXFSZ ignored):
    no root and no mount needed. main() installs its own SIGTERM handler: that is put back too."""
    import resource

    limits, xfsz, term = (resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
                          signal.getsignal(signal.SIGTERM))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, xfsz)
        signal.signal(signal.SIGTERM, term)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def real_tokenizer():
    if not (SHARED / "tokenizer.json").exists():
        pytest.skip(f"{SHARED} is absent (fresh clone): the real-tokenizer tests need it")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SHARED))


@pytest.fixture
def pinned_date(monkeypatch):
    """The gpt-oss template writes today's date; pin it so token ids are stable."""
    import transformers.utils.chat_template_utils as ctu

    class FixedDatetime(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2025, 6, 28)

    monkeypatch.setattr(ctu, "datetime", FixedDatetime)
    return "2025-06-28"


def once_per_session(tmp_path_factory, name, make) -> Path:
    """make(folder) once per test session, by whichever worker (pytest-xdist's -n) asks first; the others wait for it
    and reuse the folder."""
    from filelock import FileLock  # huggingface_hub's dependency

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist's workers share the parent
    folder = root / name
    with FileLock(f"{folder}.lock"):
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


@pytest.fixture(scope="session")
def demo_model():
    return sft.build_demo_model()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, demo_model):
    """The demo command as a user runs it, once per session in a fresh folder: the folder it leaves (the adapter in
    demo_output/, its table in demo_output/eval/) and what it printed (stdout.txt, stderr.txt beside it)."""
    def run(folder):
        (folder / "user").mkdir()
        result = run_cli("--demo", "--report_to", "none", cwd=folder / "user", timeout=900)
        (folder / "stdout.txt").write_text(result.stdout)
        (folder / "stderr.txt").write_text(result.stderr)
        assert result.returncode == 0, result.stderr[-2000:]

    return once_per_session(tmp_path_factory, "demo_run", run)


@pytest.fixture
def demo_folder(tmp_path, demo_run):
    """A fresh folder holding a copy of the demo's adapter in demo_output/, as a user's demo run leaves it."""
    shutil.copytree(demo_run / "user" / "demo_output", tmp_path / "demo_output")  # copy2 keeps the mtimes the
    return tmp_path  # folder's record holds


class ScriptedModel:
    """Stands in for the model at generate(), where the tool's own logic (streaming, channel parsing, chat history,
    Ctrl-C) is under test: each prompt gets a fixed harmony transcript, chosen by the question in its last user
    turn, fed token by token to the streamer and the stopping criteria the way transformers' generate() feeds them.
    The tokenizer, the template and everything around generate() are real."""

    device = "cpu"

    def __init__(self, tokenizer, answers: dict):
        self.tokenizer, self.answers = tokenizer, answers

    def answer(self, prompt) -> list:
        last_question = self.tokenizer.decode(prompt).rsplit("<|start|>user<|message|>", 1)[-1]
        transcript = next(text for question, text in self.answers.items() if last_question.startswith(question))
        return self.tokenizer.encode(transcript, add_special_tokens=False)

    def generate(self, input_ids, max_new_tokens, eos_token_id, pad_token_id, streamer=None, stopping_criteria=(),
                 **_):
        import torch

        if streamer:
            streamer.put(input_ids)
        rows = []
        for prompt in input_ids:
            new = []
            for token in self.answer(prompt.tolist())[:max_new_tokens]:
                new.append(token)
                if streamer:
                    streamer.put(torch.tensor([token]))
                so_far = torch.cat([prompt, torch.tensor(new)])[None]
                if token in eos_token_id or any(bool(c(so_far, None).all()) for c in stopping_criteria):
                    break
            rows.append(prompt.tolist() + new)
        if streamer:
            streamer.end()
        width = max(map(len, rows))
        return torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows])
