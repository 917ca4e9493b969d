import datetime
import os
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


def pytest_configure(config):
    config.addinivalue_line("markers", "real_tokenizer: needs ../shared/gpt-oss-20b (skipped when absent)")


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
    import gpt_oss_20b_sft as sft

    return sft.build_demo_model()
