"""Shared set-up and helpers: the tests run offline, on CPU, with a demo cache of their own."""

import datetime
import json
import os
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

# Ctrl-C as in a shell's foreground job, for the tests that send SIGINT to the script: a script's background job
# (`pytest &`) starts with SIGINT ignored, children inherit that, and Python keeps an ignored SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)

import gpt_oss_20b_sft as sft  # noqa: E402  (after the environment above)


def pytest_configure(config):
    config.addinivalue_line("markers", "real_tokenizer: needs ../shared/gpt-oss-20b (skipped when absent)")
    config.addinivalue_line("markers", "slow: runs the script in subprocesses or trains (CI runs these too)")


def run_cli(*args, cwd=ROOT, stdin=None, timeout=300, env=None):
    """The script as a user runs it: a new process, its exit code and what it printed."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          input=stdin, timeout=timeout, env=env)


def resolve(*argv):
    """The resolved settings of a command line, as main() gets them."""
    return sft.parse_config(list(argv))


def assert_usage_error(result, needle):
    """A bad input's answer: exit code 2, nothing on stdout, one line on stderr containing needle, no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def snapshot(folder):
    """Every file under folder with its bytes: what 'nothing was written or deleted' compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


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


@pytest.fixture(scope="session")
def demo_model():
    return sft.build_demo_model()
