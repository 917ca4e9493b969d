"""The README: a user guide, its install and test commands what CI runs, its flags ones the parser takes."""

import re
import subprocess
import sys

import pytest

import gpt_oss_20b_sft as sft
from conftest import SCRIPT


# The README: a user guide, short, with one link to the lab notes and no hand-kept copy of --help.
README = SCRIPT.parent / "README.md"
# Flags the README shows for other tools (launchers, servers), not for the script.
OTHER_TOOLS_FLAGS = {"nproc_per_node", "num_gpus", "multi_gpu", "num_processes", "nnodes", "hostfile",
                     "num_machines", "jinja", "enable_lora", "max_lora_rank", "lora_modules", "project", "dist",
                     "no_loadscope_reorder"}


def test_readme_is_a_user_guide_of_at_most_300_lines_that_links_the_notes_once():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    assert text.count("](NOTES.md)") == 1 and (SCRIPT.parent / "NOTES.md").is_file()
    assert not [line for line in text.splitlines() if line.startswith("| `--")]  # no flags table: --help has them


def test_readme_installs_what_ci_installs_and_runs_its_tests():
    """.ci/run installs what the README tells a CPU-only user to install, and runs the README's full test command."""
    readme, ci = README.read_text(encoding="utf-8"), (SCRIPT.parent / ".ci" / "run").read_text()
    installs = re.findall(r"^(.*?)python -m pip install -q -r (\S+)", ci, re.M)
    assert [file for _, file in installs] == ["requirements-cpu.txt", "requirements-serve.txt"]
    for prefix, file in installs:  # the same command, but for CI's own pip settings (PIP_RETRIES: no network)
        prefix = re.sub(r"PIP_\w+=\S+ ", "", prefix)
        assert f"{prefix}pip install -r {file}" in readme, (prefix, file)
    command = "python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests"
    assert command in readme and re.search(rf"^{re.escape(command)}\b", ci, re.M)


@pytest.mark.slow
def test_readme_flags_are_flags_the_parser_accepts():
    """Every --flag the README writes is one that `--mode M --help` prints for some mode (either spelling)."""
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), "--mode", mode, "--help"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for mode in sft.MODES]
    accepted = set()
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        for line in out.splitlines():  # "  --batch_size N   help": the flags are in the part before the help
            if re.match(r"\s+-", line):
                accepted |= set(re.findall(r"--([\w-]+)", re.split(r"\s{2,}", line.strip())[0]))
    accepted = {flag.replace("-", "_") for flag in accepted}
    assert {"batch_size", "no_stream", "merge_format", "print_config"} <= accepted  # the help was read
    written = {flag.replace("-", "_") for flag in
               re.findall(r"(?<![\w-])--([a-z][\w-]*[a-z0-9])", README.read_text(encoding="utf-8"))}
    assert written - OTHER_TOOLS_FLAGS - accepted == set()
