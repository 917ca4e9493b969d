"""Settings: one field each, layered defaults, recipes, both spellings, and the one-line errors for bad values."""

import dataclasses
import json

import pytest

import gpt_oss_20b_sft as sft
from conftest import ROOT, assert_usage_error, resolve, run_cli


def printed(*argv, cwd=ROOT):
    out = run_cli(*argv, "--print-config", "--json", cwd=cwd)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_print_config_shows_the_seed_recipe():
    cfg = printed("--mode", "train")
    expected = dict(mode="train", model="openai/gpt-oss-20b", dataset="HuggingFaceH4/Multilingual-Thinking",
                    lora_r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"], target_parameters=[],
                    batch_size=8, gradient_accumulation_steps=2, learning_rate=2e-5, lr_scheduler_type="cosine",
                    warmup_ratio=0.1, num_train_epochs=3.0, max_seq_length=2048, optim="adamw_torch_fused",
                    weight_decay=0.01, gradient_checkpointing=True, train_on_all_tokens=False,
                    router_aux_loss_coef=0.0, report_to="trackio", push_to_hub=False)
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["runtime"] == {"device": "cpu", "dtype": "float32", "attn_implementation": "eager", "experts": "bf16",
                              "packing": False, "sampler": "batch_rebalance", "world_size": 1, "strategy": "single",
                              "effective_batch_size": 16,
                              "note": "there is no CUDA GPU here and openai/gpt-oss-20b is a full-size model: training "
                                      "needs a GPU with >= 80 GB and inference one with >= 24 GB (--use_4bit); on CPU, "
                                      "--demo and tiny local models run"}  # said up front, before anything else fails


# What this change meant to change in --print-config, against what it printed before (tests/print_config_before.json)
RENAMED = {"limit": "max_samples", "answer_language": "answer_languages"}  # --limit and --answer-language still work
ADDED = {"min_lr_rate": None, "eval_batch_size": 32, "eval_split": None, "merge_format": "mxfp4",
         "merge_logits_check": True, "allow_any_language": False, "checkpoint_every": 1, "compile": False,
         "stream": False}  # stream: stdout is no terminal
ON_PURPOSE = {
    "--demo": {"model": "<CACHE>/tiny-gpt-oss"},  # the model the demo runs on, shown instead of set at run time
    "--mode eval --demo": {"model": "<CACHE>/tiny-gpt-oss", "adapter": "demo_output",  # likewise
                           "batch_size": 8},  # eval's generation batch is eval_batch_size now, not batch_size
    "--mode infer": {"output_dir": None},  # infer writes nothing
}


@pytest.mark.parametrize("command", ["--mode train", "--demo", "--mode eval --demo", "--mode infer"])
def test_print_config_shows_what_it_showed_before_but_for_the_named_changes(command):
    before = json.loads((ROOT / "tests" / "print_config_before.json").read_text())[command]
    expected = {RENAMED.get(k, k): v for k, v in before.items() if k != "runtime"}
    expected.update(ADDED, json=True, **{k: v.replace("<CACHE>", str(sft.DEMO_CACHE)) if isinstance(v, str) else v
                                         for k, v in ON_PURPOSE.get(command, {}).items()})
    expected = json.loads(json.dumps(expected).replace("<ROOT>", str(ROOT)))
    now = printed(*command.split())
    assert {k: v for k, v in now.items() if k != "runtime"} == expected


@pytest.mark.parametrize("command", [[], ["--demo"], ["--mode", "eval", "--demo", "--limit", "3"],
                                     ["--mode", "infer", "--reasoning-language", "Italian", "--temperature", "0"],
                                     ["--config", "recipes/cookbook.yaml", "--batch_size", "2"]])
def test_printed_settings_fed_back_as_a_recipe_give_the_same_settings(tmp_path, command):
    first = run_cli(*command, "--print-config")
    assert first.returncode == 0, first.stderr
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(first.stdout)
    again = run_cli("--config", str(recipe), "--print-config")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout


def test_the_seed_recipe_is_what_runs_with_no_flags():
    assert resolve("--config", "recipes/seed.yaml") == resolve()


def test_the_cookbook_recipe_and_flags_over_it():
    cfg = resolve("--config", "recipes/cookbook.yaml")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.learning_rate, cfg.lr_scheduler_type, cfg.min_lr_rate) == (
        8, 16, 2e-4, "cosine_with_min_lr", 0.1)
    assert (cfg.warmup_ratio, cfg.num_train_epochs, cfg.batch_size, cfg.gradient_accumulation_steps) == (0.03, 1, 4, 4)
    assert cfg.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.target_parameters == [f"{layer}.mlp.experts.{name}" for layer in (7, 15, 23)
                                     for name in ("gate_up_proj", "down_proj")]
    assert resolve("--config", "recipes/cookbook.yaml", "--learning_rate", "1e-4").learning_rate == 1e-4  # flags win
    args = sft.build_sft_config(cfg, on_cuda=False)
    assert args.lr_scheduler_kwargs == {"min_lr_rate": 0.1} and args.lr_scheduler_type == "cosine_with_min_lr"


def test_print_config_writes_nothing_and_loads_no_model(tmp_path):
    (tmp_path / "weightless").mkdir()  # no config.json, no weights: loading anything from it would fail
    out = run_cli("--print-config", "--model", str(tmp_path / "weightless"), "--output_dir", str(tmp_path / "out"),
                  cwd=tmp_path)
    assert out.returncode == 0 and f"model: {tmp_path / 'weightless'}" in out.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["weightless"] and not any((tmp_path / "weightless").iterdir())


def test_settings_are_frozen_once_resolved():
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolve().lora_r = 4


@pytest.mark.parametrize("spelling", ["underscore", "hyphen"])
def test_seed_flags_in_both_spellings(spelling):
    flags = {"batch_size": "4", "max_seq_length": "1536", "learning_rate": "1e-4", "num_train_epochs": "1",
             "output_dir": "x", "lora_r": "8", "reasoning_language": "Chinese"}
    argv = []
    for name, value in flags.items():
        argv += [f"--{name if spelling == 'underscore' else name.replace('_', '-')}", value]
    cfg = resolve(*argv, "--gradient_checkpointing" if spelling == "underscore" else "--no-gradient-checkpointing")
    assert (cfg.batch_size, cfg.max_seq_length, cfg.learning_rate, cfg.num_train_epochs) == (4, 1536, 1e-4, 1.0)
    assert (cfg.output_dir, cfg.lora_r, cfg.reasoning_language) == ("x", 8, "Chinese")
    assert cfg.gradient_checkpointing is (spelling == "underscore")


def test_aliases_and_lists():
    cfg = resolve("--target_parameters", "mlp.experts.gate_up_proj, mlp.experts.down_proj",
                  "--reasoning-languages", "French,German", "--max_length", "1000", "--output", "o", "--limit", "3")
    assert cfg.target_parameters == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert (cfg.reasoning_languages, cfg.max_seq_length, cfg.output_dir, cfg.max_samples) == (["French", "German"],
                                                                                            1000, "o", 3)
    assert resolve("--target_modules", "q_proj", "k_proj").target_modules == ["q_proj", "k_proj"]
    assert sft.build_lora_config(resolve("--target_modules", "all-linear")).target_modules == "all-linear"


def test_layers_mode_then_demo_then_recipe_then_flags(tmp_path):
    assert (resolve("--mode", "eval").temperature, resolve("--mode", "infer").temperature) == (0.0, 0.6)
    assert resolve("--mode", "eval", "--demo").max_new_tokens == 48  # the demo's layer is above the mode's
    cfg = resolve("--demo")
    assert cfg.dataset.endswith("data/demo_sample.jsonl") and cfg.output_dir == "demo_output"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("mode: eval\ndemo: true\nmax_new_tokens: 7\n")
    cfg = resolve("--config", str(recipe))
    assert (cfg.mode, cfg.temperature, cfg.max_new_tokens, cfg.compare_base) == ("eval", 0.0, 7, True)
    assert resolve("--config", str(recipe), "--max_new_tokens", "9", "--no-compare-base").max_new_tokens == 9


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "0"], "--batch_size (--per_device_train_batch_size) must be a positive integer, got 0"),
    (["--max-seq-length", "-5"], "--max_seq_length (--max_length) must be a positive integer, got -5"),
    (["--lora_r", "0"], "--lora_r must be a positive integer, got 0"),
    (["--learning_rate", "0"], "--learning_rate must be greater than 0, got 0.0"),
    (["--num_train_epochs", "-1"], "--num_train_epochs must be greater than 0, got -1.0"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1), got 1.5"),
    (["--temperature", "-1"], "--temperature cannot be negative, got -1.0"),
    (["--weight_decay", "-0.1"], "--weight_decay cannot be negative, got -0.1"),
    (["--max_samples", "0"], "--max_samples (--limit) must be a positive integer, got 0"),
    (["--reasoning-language", " "], "--reasoning-language is empty"),
    (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
    (["--target_modules", ""], "nothing to train"),
    (["--lr_scheduler_type", "cosine_with_min_lr"], "cosine_with_min_lr and --min_lr_rate go together"),
])
def test_bad_values_are_refused(argv, message):
    with pytest.raises(sft.UsageError) as e:
        resolve(*argv)
    assert message in str(e.value)


@pytest.mark.parametrize("recipe, needle", [
    ("learning_rate: [1, 2]\n", "--learning_rate: [1, 2] is not a valid value"),
    ("mode: fly\n", "--mode: 'fly' is not a valid value; choose from train, infer, chat, eval, merge"),
    ("lora_rank: 8\n", "unknown setting 'lora_rank' (did you mean lora_r?)"),
    ("- just a list\n", "must be a YAML mapping of settings"),
    ("a: [\n", "is not valid YAML"),
])
def test_bad_recipes_are_one_line_exit_2(tmp_path, recipe, needle):
    (tmp_path / "r.yaml").write_text(recipe)
    assert_usage_error(run_cli("--config", "r.yaml", "--print-config", cwd=tmp_path), needle)


@pytest.mark.parametrize("argv, needle", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--lr", "1e-4"], "unrecognized arguments: --lr"),  # no abbreviations: --lr would be ambiguous
    (["--mode", "fly"], "invalid choice: 'fly'"),
    (["--attn-implementation", "sdpa"], "invalid choice: 'sdpa'"),
    (["--batch-size", "-1"], "--batch_size (--per_device_train_batch_size) must be a positive integer, got -1"),
    (["--mode", "infer", "--reasoning-language", ""], "--reasoning-language is empty"),
    (["--config", "missing.yaml"], "--config missing.yaml: no such file or directory"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, argv, needle):
    assert_usage_error(run_cli(*argv, cwd=tmp_path), needle)
    assert list(tmp_path.iterdir()) == []


def test_help_lists_every_setting_once_with_its_default():
    out = run_cli("--help")
    assert out.returncode == 0
    for f in dataclasses.fields(sft.Config):
        if f.name != "local_rank":
            assert f"--{f.name}" in out.stdout, f.name
    assert "--learning_rate X     peak learning rate (default: 2e-05)" in out.stdout
    assert "(default: 1024)" in run_cli("--mode", "eval", "--help").stdout  # the mode's layer shows


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(sft.UsageError, match="holds no complete checkpoint"):
        sft.check_output_dir(resolve("--output_dir", str(tmp_path / "empty"), "--resume"))
