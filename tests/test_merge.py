"""--mode merge streams the checkpoint: MXFP4 kept byte for byte, bf16 on request or for expert LoRA, checks, errors."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import gpt_oss_20b_sft as sft
from conftest import SCRIPT, file_size_limit, resolve, run_cli, snapshot

ATTENTION = dict(target_modules=["q_proj", "v_proj"])
EXPERTS = dict(target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


@pytest.fixture(scope="module")
def mxfp4_base(demo_model, tmp_path_factory):
    return sft.write_mxfp4_checkpoint(demo_model, tmp_path_factory.mktemp("base") / "tiny-gpt-oss-mxfp4")


def load_base(base, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    return AutoModelForCausalLM.from_pretrained(base, quantization_config=Mxfp4Config(dequantize=True), dtype=dtype,
                                                attn_implementation="eager").eval()


def make_adapter(base, out, **targets):
    """A PEFT adapter with random A and B (as a trained one has), saved the way train mode saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(load_base(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **targets))
    with torch.no_grad():  # an update of a trained adapter's size: it moves the logits by a few tens of percent
        for name, parameter in model.named_parameters():
            parameter.mul_(0.25 if "lora_B" in name else 1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(mxfp4_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return {"attention": make_adapter(mxfp4_base, folder / "attention", **ATTENTION),
            "experts": make_adapter(mxfp4_base, folder / "experts", **EXPERTS)}


@pytest.fixture(scope="module")
def mxfp4_merge(mxfp4_base, adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("merges") / "mxfp4"
    record = sft.run_merge(resolve("--mode", "merge", "--adapter", str(adapters["attention"]), "--model",
                                   str(mxfp4_base), "--output", str(out)))
    return out, record


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def check_batch(tokenizer):
    tokenizer.padding_side = "left"
    return tokenizer.apply_chat_template([sft.build_chat(p, lang) for p, lang in sft.MERGE_CHECK_PROMPTS],
                                         add_generation_prompt=True, padding=True, return_tensors="pt",
                                         return_dict=True)


def test_mxfp4_merge_loads_with_plain_transformers_and_equals_base_plus_adapter_within_bf16_rounding(
        mxfp4_merge, mxfp4_base, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, record = mxfp4_merge
    assert record["passed"] and record["checks_run"] == ["tensors", "logits"] and record["format"] == "mxfp4"
    assert json.loads((out / "merge_check.json").read_text()) == json.loads(json.dumps(record))
    assert (out / "config.json").read_bytes() == (mxfp4_base / "config.json").read_bytes()  # quantization_config kept

    # The exact merge: W (bf16 as stored, in fp32) + s·BA in fp32. The floor: the same with each adapted weight
    # rounded once to bf16 — what storing it in the checkpoint's dtype must cost, and all it may cost.
    exact = PeftModel.from_pretrained(load_base(mxfp4_base), adapters["attention"]).merge_and_unload().eval()
    floor = PeftModel.from_pretrained(load_base(mxfp4_base), adapters["attention"]).merge_and_unload().eval()
    rewritten = {n.removesuffix(".weight") for n in record["weights_rewritten"]}
    assert rewritten == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    for name in rewritten:
        weight = floor.get_submodule(name).weight
        weight.data = weight.data.to(torch.bfloat16).float()

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    batch = check_batch(AutoTokenizer.from_pretrained(out))
    with torch.no_grad():
        want, rounded, got = (m(**batch).logits[batch["attention_mask"].bool()] for m in (exact, floor, merged))
    rounding = float((rounded - want).norm())
    assert rounding > 0 and float((got - want).norm()) <= rounding * (1 + 1e-6)
    assert torch.allclose(got, rounded, rtol=0, atol=1e-5)


def test_mxfp4_merge_copies_every_untouched_tensor_byte_for_byte(mxfp4_merge, mxfp4_base):
    out, record = mxfp4_merge
    base, merged = tensors(mxfp4_base / "model.safetensors"), tensors(out / "model.safetensors")
    assert set(merged) == set(base) and any(n.endswith("_blocks") for n in merged)
    for name, tensor in base.items():
        same = merged[name].dtype == tensor.dtype and torch.equal(merged[name].view(torch.uint8),
                                                                  tensor.view(torch.uint8))
        assert same == (name not in record["weights_rewritten"]), name
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    from transformers import AutoTokenizer

    assert set(AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(["<|return|>", "<|call|>"])) <= set(eos)


def test_tensor_check_catches_a_wrong_merged_tensor(mxfp4_merge, mxfp4_base, adapters, tmp_path):
    from safetensors.torch import save_file

    out, record = mxfp4_merge
    layout = sft.checkpoint_layout([mxfp4_base / "model.safetensors"])
    updates = sft.plan_updates(layout, *sft.read_lora_adapter(str(adapters["attention"])), "a", "m")
    weight_map = dict.fromkeys(tensors(out / "model.safetensors"), "model.safetensors")
    assert sft.check_merged_tensors(out, weight_map, layout, updates, to_bf16=False)["passed"]
    broken = tensors(out / "model.safetensors")
    name = record["weights_rewritten"][0]
    broken[name] = (broken[name].float() * (1 + 2**-6)).to(broken[name].dtype)  # a few bf16 steps off
    save_file(broken, str(tmp_path / "model.safetensors"))
    check = sft.check_merged_tensors(tmp_path, weight_map, layout, updates, to_bf16=False)
    assert not check["passed"] and check["worst_error_over_bound"] > 1


def todays_merge(base, adapter):
    """What --mode merge wrote before it streamed: the model in bf16, PEFT's merge_and_unload."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base, torch.bfloat16), adapter).merge_and_unload().eval()


@pytest.mark.parametrize("kind", ["attention", "experts"])
def test_bf16_merge_equals_todays_bf16_merge(kind, mxfp4_base, adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    flags = ["--merge-format", "bf16"] if kind == "attention" else []  # expert LoRA picks bf16 by itself
    result = run_cli("--mode", "merge", "--adapter", str(adapters[kind]), "--model", str(mxfp4_base), "--output",
                     str(out), *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    note = "note: this adapter changes MXFP4 expert weights (experts.down_proj, experts.gate_up_proj), which would " \
           "need re-quantizing: writing bf16 instead (--merge-format bf16"
    assert (note in result.stdout) == (kind == "experts")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert json.loads((out / "merge_check.json").read_text())["format"] == "bf16"

    today = todays_merge(mxfp4_base, adapters[kind]).state_dict()
    base = load_base(mxfp4_base, torch.bfloat16).state_dict()
    streamed = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").state_dict()
    assert set(streamed) == set(today) and all(t.dtype == torch.bfloat16 for t in streamed.values())
    for name, tensor in today.items():
        if kind == "experts" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            # PEFT rounds s·BA to bf16 before adding it to an expert tensor (two roundings); the stream rounds
            # W + s·BA once, so the two differ by at most one bf16 step of the sum and one of the update
            update = (tensor.float() - base[name].float()).abs()
            step = torch.finfo(torch.bfloat16).eps * (tensor.float().abs() + update)
            assert not torch.equal(streamed[name], base[name]), name
            assert ((streamed[name].float() - tensor.float()).abs() <= step * 1.0001).all(), name
        else:
            assert torch.equal(streamed[name], tensor), name


def test_logits_check_is_skipped_where_the_model_does_not_fit(mxfp4_base, adapters, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sft, "free_memory", lambda on_cuda: 1024)  # a machine with 1 KiB free
    record = sft.run_merge(resolve("--mode", "merge", "--adapter", str(adapters["attention"]), "--model",
                                   str(mxfp4_base), "--output", str(tmp_path / "merged")))
    printed = capsys.readouterr().out
    assert record["checks_run"] == ["tensors"] and record["tensor_check"]["passed"]
    assert "skipped the logits check: it holds the model in bf16" in printed and "0.0 GiB free of RAM" in printed
    written = json.loads((tmp_path / "merged" / "merge_check.json").read_text())
    assert written["logits_check"]["skipped"].startswith("it holds the model in bf16")


def broken_adapter(folder, adapter, how):
    """A copy of a good adapter, damaged one way."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, folder)
    weights = folder / "adapter_model.safetensors"
    if how == "missing file":
        weights.unlink()
    elif how == "corrupt file":
        weights.write_bytes(weights.read_bytes()[:200])
    elif how in ("wrong base", "missing layer"):
        state = load_file(weights)
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        if how == "wrong base":  # an adapter made for a model with another hidden size
            state[key] = torch.zeros(state[key].shape[0], 2 * state[key].shape[1])
        else:
            state[key.replace("layers.0", "layers.7")] = state.pop(key)
            state[key.replace("layers.0", "layers.7").replace("lora_A", "lora_B")] = state.pop(
                key.replace("lora_A", "lora_B"))
        save_file(state, weights)
    elif how == "not LoRA":
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    return folder


@pytest.mark.parametrize("how, needle", [
    ("missing file", "has no adapter_model.safetensors"),
    ("corrupt file", "adapter_model.safetensors is corrupt"),
    ("wrong base", "does not fit"),
    ("missing layer", "model.layers.7.self_attn.q_proj update is 64x64 and the model has no "
                      "model.layers.7.self_attn.q_proj.weight; was it trained on another base?"),
    ("not LoRA", "with use_dora; this tool takes plain LoRA adapters (as train and grpo write them)"),
])
def test_a_broken_or_mismatched_adapter_is_one_line_exit_2_nothing_written(how, needle, mxfp4_base, adapters,
                                                                         tmp_path, capsys):
    adapter = broken_adapter(tmp_path / "adapter", adapters["attention"], how)
    before = snapshot(tmp_path)
    assert sft.main(["--mode", "merge", "--adapter", str(adapter), "--model", str(mxfp4_base)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.slow
def test_a_merge_killed_half_way_leaves_no_output_and_the_next_run_cleans_up(mxfp4_base, adapters, tmp_path):
    out = tmp_path / "merged"
    argv = [sys.executable, str(SCRIPT), "--mode", "merge", "--adapter", str(adapters["attention"]), "--model",
            str(mxfp4_base), "--output", str(out)]
    victim = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".merged.tmp*/model.safetensors")) and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert list(tmp_path.glob(".merged.tmp*/model.safetensors")), "the merge was not caught half-way"
    assert not out.exists()  # a reader never finds a half-written model where the merged one goes

    result = run_cli(*argv[2:])
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # the killed run's staging is gone
    assert json.loads((out / "merge_check.json").read_text())["passed"]


@pytest.mark.slow
def test_merge_from_a_hub_id_reads_the_hugging_face_cache(mxfp4_base, adapters, tmp_path):
    import os
    import shutil

    commit = "0" * 40  # the cache layout huggingface_hub reads offline: refs/main names a snapshot folder
    repo = tmp_path / "hub" / "models--someone--tiny-gpt-oss-mxfp4"
    shutil.copytree(mxfp4_base, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = run_cli("--mode", "merge", "--adapter", str(adapters["attention"]), "--model",
                     "someone/tiny-gpt-oss-mxfp4", "--output", str(tmp_path / "merged"), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "verified: merged logits equal base+adapter" in result.stdout
    record = json.loads((tmp_path / "merged" / "merge_check.json").read_text())
    assert record["base"] == "someone/tiny-gpt-oss-mxfp4" and record["format"] == "mxfp4"
    assert (tmp_path / "merged" / "config.json").read_bytes() == (mxfp4_base / "config.json").read_bytes()


def merged_in_memory(demo_model, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32, attn_implementation="eager")
    return PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()


@pytest.mark.slow  # trains, merges and generates: half a minute each
@pytest.mark.parametrize("targets", [["--target_modules", "q_proj,v_proj"],
                                     ["--target_modules", "q_proj", "--target_parameters",
                                      "mlp.experts.gate_up_proj,mlp.experts.down_proj"]], ids=["attention", "experts"])
def test_merge_writes_a_standard_checkpoint_that_matches_base_plus_adapter(tmp_path, demo_model, targets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "adapter"
    sft.run_train(resolve("--demo", "--model", str(demo_model), "--output_dir", str(adapter), "--report_to", "none",
                          "--max_steps", "3", *targets))
    check = sft.run_merge(resolve("--mode", "merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")))
    assert check["passed"] and check["logits_check"]["adapter_kept"] > 0.5

    merged = tmp_path / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["GptOssForCausalLM"]
    assert config["dtype"] == "float32"  # a base without MXFP4 keeps its own dtypes (this one's is fp32)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    stops = set(tokenizer.convert_tokens_to_ids(["<|return|>", "<|call|>"]))
    assert stops <= set(json.loads((merged / "generation_config.json").read_text())["eos_token_id"])
    weights = load_file(merged / "model.safetensors")
    assert not any("lora" in name for name in weights)
    assert json.loads((merged / "merge_check.json").read_text())["passed"] is True

    reloaded = AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager").eval()
    expected = merged_in_memory(demo_model, adapter)
    ids = tokenizer.apply_chat_template(sft.build_chat("What is 7 x 8?", "German"), add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.equal(reloaded(**ids).logits, expected(**ids).logits)
    base = load_file(demo_model / "model.safetensors")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert torch.equal(weights[name], base[name]) == ("--target_parameters" not in targets)


def test_merge_check_fails_when_the_adapter_is_lost():
    torch.manual_seed(0)
    base = torch.randn(50, 1024)
    tuned = base + 0.5 * torch.randn(50, 1024)
    assert sft.merge_agreement(tuned, base, tuned + 0.001 * torch.randn(50, 1024))["passed"]
    lost = sft.merge_agreement(tuned, base, base)  # what an MXFP4 base does to expert LoRA
    assert not lost["passed"] and lost["relative_error"] > 0.3 and lost["adapter_kept"] == 0.0


@pytest.mark.slow
def test_merge_demo_command(demo_folder):
    tmp_path = demo_folder
    result = run_cli("--mode", "merge", "--demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "verified: merged logits equal base+adapter within bf16 tolerance on 3 prompts" in result.stdout
    assert (tmp_path / "demo_output-merged" / "model.safetensors").exists()
    assert not re.search(r"Warning|deprecated|WARNING", result.stdout + result.stderr), result.stderr[-2000:]
    adapter_config = json.loads((tmp_path / "demo_output" / "adapter_config.json").read_text())
    assert (sft.Path(adapter_config["base_model_name_or_path"]) / "config.json").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--mode", "merge"], "--mode merge needs --adapter"),
    (["--mode", "merge", "--adapter", "."], "--adapter . is not a LoRA adapter directory"),
])
def test_merge_bad_inputs(tmp_path, argv, needle):
    result = run_cli(*argv, cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_merge_into_a_folder_made_beforehand_is_recorded_and_overwrite_replaces_it(demo_folder):
    """Issue 38: the record follows the merge into a folder that existed (empty), so --overwrite replaces the tool's
    own merge; --output_dir equal to --adapter is refused as what it is."""
    (demo_folder / "merged").mkdir()
    merge = ["--mode", "merge", "--demo", "--output", "merged", "--no-merge-logits-check"]
    first = run_cli(*merge, cwd=demo_folder)
    assert first.returncode == 0, first.stderr[-2000:]
    marker = json.loads((demo_folder / "merged" / sft.OWNER_FILE).read_text())
    assert marker["mode"] == "merge" and {"model.safetensors", "merge_check.json"} <= set(marker["written"])
    assert sft.sort_outputs(demo_folder / "merged", "merge")[1] == []  # nothing there is foreign
    again = run_cli(*merge, "--overwrite", cwd=demo_folder)
    assert again.returncode == 0 and "wrote the merged model to merged/" in again.stdout, again.stderr[-2000:]
    into_adapter = run_cli("--mode", "merge", "--demo", "--output", "demo_output", "--overwrite", cwd=demo_folder)
    assert into_adapter.returncode == 2 and into_adapter.stderr.strip() == (
        "error: --output_dir demo_output is --adapter; outputs go into a folder of their own, e.g. --output_dir "
        "demo_output-merged"), into_adapter.stderr


@pytest.mark.slow
def test_a_merge_onto_a_mount_point_stages_on_its_file_system_and_a_read_only_one_is_refused_first(demo_folder):
    """Issue 38: the usual "put the model on the big disk" (a tmpfs mounted on the output folder here, as root). The
    staging folder was the parent's sibling, and the last rename failed as a cross-device link after the whole merge;
    a read-only mount was "permission denied"."""
    target = demo_folder / "bigdisk"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(target)], check=True)
    try:
        merge = ["--mode", "merge", "--demo", "--output", "bigdisk", "--no-merge-logits-check"]
        result = run_cli(*merge, cwd=demo_folder)
        assert result.returncode == 0, result.stderr[-2000:]
        assert (target / "model.safetensors").is_file() and json.loads((target / "merge_check.json").read_text())["passed"]
        assert not [p.name for p in [*target.iterdir(), *demo_folder.iterdir()] if ".tmp" in p.name]
        subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
        before = snapshot(target)
        refused = run_cli(*merge, "--overwrite", cwd=demo_folder)
        assert refused.returncode == 2 and refused.stderr.strip() == (
            f"error: --output_dir bigdisk: {target} is on a file system mounted read-only (permissions will not help): "
            "pick a folder on a writable disk"), refused.stderr
        assert snapshot(target) == before
    finally:
        subprocess.run(["umount", str(target)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("merge_format, said", [("bf16", "file too large; "),
                                                ("gguf", "file too large; |a write came up short; ")])
def test_a_full_disk_while_merging_is_one_paragraph_and_leaves_no_folder(demo_folder, monkeypatch, capsys,
                                                                        merge_format, said):
    """Issue 38: the merged shard (safetensors, which keeps no errno) or the GGUF (Python's own writes) cannot be
    written: the paragraph, exit 1, no output folder and no staging left. The file size limit (a full disk's EFBIG) is
    set in this process for the call only."""
    monkeypatch.chdir(demo_folder)
    with file_size_limit(100_000):
        code = sft.main(["--mode", "merge", "--demo", "--output", "merged", "--merge-format", merge_format,
                         "--no-merge-logits-check"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    # numpy's short write under gguf's writer keeps no errno: which write hits the limit first decides the words
    assert code == 1 and last.startswith("Writing ") and re.search(f"failed: (no space left: )?({said})", last), last
    assert "Make room" in last
    assert not [p.name for p in demo_folder.iterdir() if "merged" in p.name]
