"""bench/device_run.sh, the one command a lent GPU runs, proven here by its dry run (DRY=1, the demo's tiny model on
the CPU): the wheels staged by bench/stage_offline.sh installed with --target, every run of its table measured."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

TABLE = ["ours", "baseline", "ours_4bit", "grpo", "ours_packing", "ours_checkpoint_every2", "120b:ours_4bit_b1_ga2",
         "ours_compile"]  # baseline_b4 and grpo_eager run only where baseline and grpo fail


@pytest.mark.slow
def test_the_gpu_commands_dry_run_installs_the_staged_wheels_and_measures_every_run(tmp_path):
    python = f"{sys.version_info.major}.{sys.version_info.minor}"  # wheels for this interpreter, as for the node's
    stage = subprocess.run(["bash", "bench/stage_offline.sh", python, str(tmp_path / "offline")], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert stage.returncode == 0, stage.stderr[-2000:]
    out = tmp_path / "out"
    env = {**os.environ, "DRY": "1", "OUT": str(out), "STAGED": str(tmp_path / "offline"), "WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable, "BUDGET": "1500"}
    run = subprocess.run(["bash", "bench/device_run.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1600)
    assert run.returncode == 0, run.stdout[-2000:] + (out / "logs.txt").read_text()[-3000:]
    machine = (out / "machine.txt").read_text()
    assert "installed 7 staged wheels into" in machine and "DRY run on the CPU" in machine, machine
    assert all((tmp_path / "work" / "site" / name).is_dir() for name in ("transformers", "trl", "peft", "datasets"))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [row["run"] for row in rows] == TABLE, (out / "logs.txt").read_text()[-3000:]
    measured = lambda row: "rollout_tokens_per_second" if row["run"] == "grpo" else "tokens_per_second"
    failed = [row["run"] for row in rows if row["exit"] != 0 or measured(row) not in row["summary"]]
    assert failed == [], (out / "logs.txt").read_text()[-3000:]
    grpo = rows[TABLE.index("grpo")]["summary"]  # 3 steps of 2 completions of 16 tokens (random weights never stop)
    assert (grpo["steps_measured"], grpo["num_generations"], grpo["completion_tokens_per_step"]) == (2, 2, 32)
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in TABLE) and "failed" not in table and "timed out" not in table
    assert "GRPO (the first step, with its warm-up, untimed):" in table
    for check in ("check_attention.txt", "mask_bench.txt"):  # each a JSON line of its measurement
        assert [json.loads(line) for line in (out / check).read_text().splitlines()], check
