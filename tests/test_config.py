"""Settings: one field each, layered defaults, recipes, both spellings, and the one-line errors for bad values."""

import dataclasses
import json
import re
import shutil

import pytest

import gpt_oss_20b_sft as sft
from conftest import ROOT, assert_usage_error, demo_training, resolve, run_cli


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


@pytest.mark.parametrize("command", ["--mode train", "--demo", "--mode eval --demo", "--mode infer", "--mode merge --demo"])
def test_print_config_prints_the_mode_s_settings_each_from_its_layers(command):
    """Every field of the mode and no other; each value the field's default, under the mode's, under the demo's,
    except the settings worked out from others (derive)."""
    argv = command.split()
    mode = sft.MODES[argv[1] if "--mode" in argv else "train"]
    fields = {f.name: f for f in dataclasses.fields(mode.settings)}
    now = printed(*argv)
    assert set(now) == set(fields) - {"print_config", "local_rank"} | {"runtime"}
    layers = {**mode.defaults, **(sft.DEMO_DEFAULTS if "--demo" in argv else {})}
    derived = {"mode", "demo", "json", "model", "adapter", "output_dir", *mode.derive(sft.parse(argv))}
    for name in set(now) - derived - {"runtime"}:
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert now[name] == layers.get(name, default), name


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
    args = sft.build_sft_config(cfg, sft.find_runtime(cfg))
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
             "output_dir": "x", "lora_r": "8"}
    argv = []
    for name, value in flags.items():
        argv += [f"--{name if spelling == 'underscore' else name.replace('_', '-')}", value]
    cfg = resolve(*argv, "--gradient_checkpointing" if spelling == "underscore" else "--no-gradient-checkpointing")
    assert (cfg.batch_size, cfg.max_seq_length, cfg.learning_rate, cfg.num_train_epochs) == (4, 1536, 1e-4, 1.0)
    assert (cfg.output_dir, cfg.lora_r) == ("x", 8)
    assert cfg.gradient_checkpointing is (spelling == "underscore")
    language = "--reasoning_language" if spelling == "underscore" else "--reasoning-language"  # infer's setting
    assert resolve("--mode", "infer", language, "Chinese").reasoning_language == "Chinese"


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
    assert resolve("--mode", "eval", "--demo").max_new_tokens == 224  # the demo's layer is above the mode's
    cfg = resolve("--demo")
    assert cfg.dataset.endswith("data/demo_sample.jsonl") and cfg.output_dir == "demo_output"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("mode: eval\ndemo: true\nmax_new_tokens: 7\n")
    cfg = resolve("--config", str(recipe))
    assert (cfg.mode, cfg.temperature, cfg.max_new_tokens, cfg.compare_base) == ("eval", 0.0, 7, True)
    assert resolve("--config", str(recipe), "--max_new_tokens", "9", "--no-compare-base").max_new_tokens == 9



def test_the_tests_plain_demo_training_is_the_demos_training():
    """conftest's demo_training(), which the tests of a run's mechanics use, trains as --demo trains."""
    demo = dataclasses.asdict(resolve("--demo", "--output_dir", "x"))
    plain = dataclasses.asdict(resolve(*demo_training("--output_dir", "x")))
    assert {k: v for k, v in plain.items() if demo[k] != v} == {"demo": False}

@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "0"], "--batch_size (--per_device_train_batch_size) must be a positive integer, got 0"),
    (["--max-seq-length", "-5"], "--max_seq_length (--max_length) must be a positive integer, got -5"),
    (["--lora_r", "0"], "--lora_r must be a positive integer, got 0"),
    (["--learning_rate", "0"], "--learning_rate must be greater than 0, got 0.0"),
    (["--num_train_epochs", "-1"], "--num_train_epochs must be greater than 0, got -1.0"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1), got 1.5"),
    (["--mode", "infer", "--temperature", "-1"], "--temperature cannot be negative, got -1.0"),
    (["--weight_decay", "-0.1"], "--weight_decay cannot be negative, got -0.1"),
    (["--max_samples", "0"], "--max_samples (--limit) must be a positive integer, got 0"),
    (["--mode", "infer", "--reasoning-language", " "], "--reasoning-language is empty"),
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
    ("mode: fly\n", "--mode: 'fly' is not a valid value; choose from train, infer, chat, eval, grpo, merge"),
    ("lora_rank: 8\n", "unknown setting 'lora_rank' (did you mean lora_r?)"),
    ("- just a list\n", "must be a YAML mapping of settings"),
    ("a: [\n", "is not valid YAML"),
    # an old recipe with a field that moved gets a one-line hint
    ("mode: eval\nmax_samples: 3\n", "--config r.yaml: max_samples is max_questions in --mode eval: rename it"),
    ("mode: eval\nreasoning_languages: [German]\n", "reasoning_languages is eval_reasoning_languages in --mode eval"),
    ("mode: merge\nlearning_rate: 1.0e-4\n",
     "learning_rate is a train and grpo setting; --mode merge does not read it: drop"),
    ("temperature: 0.3\n",
     "--config r.yaml: temperature is an infer, chat, eval and grpo setting; --mode train does not"),
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


@pytest.mark.parametrize("mode", ["train", "infer", "chat", "eval", "merge"])
def test_help_lists_every_setting_of_the_mode_once_with_its_default(mode):
    out = run_cli("--mode", mode, "--help")
    assert out.returncode == 0
    for f in dataclasses.fields(sft.MODES[mode].settings):
        if f.name != "local_rank":
            assert len(re.findall(rf"^  --{f.name}\b", out.stdout, re.M)) == 1, f.name
    others = {f.name for m in sft.MODES.values() for f in dataclasses.fields(m.settings)} - {
        f.name for f in dataclasses.fields(sft.MODES[mode].settings)}
    assert not [name for name in others if re.search(rf"^  --{name}\b", out.stdout, re.M)]  # nor other modes' settings
    if mode == "train":
        assert "--learning_rate X     peak learning rate (default: 2e-05)" in out.stdout
    if mode == "eval":
        assert "(default: 1024)" in out.stdout  # the mode's layer shows


@pytest.mark.parametrize("mode, most", [("merge", 15), ("infer", 25), ("chat", 25), ("eval", 30)])
def test_each_mode_lists_few_flags(mode, most):
    """Each mode's --help lists its own settings and the common ones, not every mode's (--help and --config too)."""
    listed = [line for line in run_cli("--mode", mode, "--help").stdout.splitlines() if line.startswith("  -")]
    assert len(listed) <= most, listed


@pytest.mark.parametrize("argv, needle", [
    (["--mode", "merge", "--learning_rate", "1e-4"],
     "--learning_rate is a train and grpo setting; --mode merge does not read it"),
    (["--mode", "train", "--temperature=0"],
     "--temperature is an infer, chat, eval and grpo setting; --mode train does not"),
    (["--mode", "infer", "--no-compare-base"], "--no-compare-base is an eval setting; --mode infer does not read it"),
    (["--mode", "merge", "--limit", "3"], "--limit is a train, eval and grpo setting; --mode merge does not read it"),
    (["--mode", "eval", "--reasoning-language", "German"], "--reasoning-language is an infer and chat setting"),
])
def test_a_flag_of_another_mode_names_the_modes_that_read_it(tmp_path, argv, needle):
    assert_usage_error(run_cli(*argv, "--print-config", cwd=tmp_path), needle)
    assert list(tmp_path.iterdir()) == []


def test_eval_has_its_own_row_limit_and_languages_and_takes_the_old_flags():
    """eval's questions per language and languages to ask are fields of their own; the flags users typed still work."""
    for limit in ("--limit", "--max_samples", "--max-samples", "--max-questions"):
        assert resolve("--mode", "eval", limit, "3").max_questions == 3
    for languages in ("--reasoning-languages", "--reasoning_languages", "--eval-reasoning-languages"):
        assert resolve("--mode", "eval", languages, "zh,ja").eval_reasoning_languages == ["Chinese", "Japanese"]
    train = resolve("--limit", "3", "--reasoning-languages", "fr")
    assert (train.max_samples, train.reasoning_languages) == (3, ["French"])


# No mode runs another: the demo's adapter for infer, chat, eval and merge is trained by the demo's own train
# settings, never by the settings of the mode that needs it (the two bugs below came from that)
@pytest.mark.slow
def test_eval_demo_asks_the_languages_and_questions_given_and_trains_with_the_demos_own_settings(demo_run, tmp_path,
                                                                                                 monkeypatch, capsys):
    """Both bugs in one fresh folder: eval's languages and question limit reach eval and not the demo's training.
    The step hands training exactly what `--demo` trains with (whose run of every row test_demo checks); here that
    run's adapter is copied in where the step's training would write it, instead of training it a second time."""
    trained_with = []

    def train(cfg):
        trained_with.append(cfg)
        shutil.copytree(demo_run / "user" / "demo_output", cfg.output_dir)  # copy2 keeps the mtimes its record holds

    monkeypatch.setattr(sft, "run_train", train)
    monkeypatch.chdir(tmp_path)
    # was exit 2, "no rows with reasoning language ...": the languages reached the demo's training
    assert sft.main(["--mode", "eval", "--demo", "--reasoning-languages", "Chinese,Japanese", "--limit", "2"]) == 0
    assert trained_with == [resolve("--mode", "train", "--demo", "--report_to", "none")]
    # every row in each of the sample's languages (was 2 rows: --limit reached training)
    assert trained_with[0].max_samples is None and trained_with[0].reasoning_languages is None
    report = json.loads((tmp_path / "demo_output" / "eval" / "eval_results.json").read_text())
    assert sorted({i["reasoning_language"] for i in report["items"]}) == ["Chinese", "Japanese"]
    assert report["config"]["max_questions"] == 2 and len(report["items"]) == 2 * 2 * 2  # base and tuned, 2 x 2
    assert "| all | tuned | 4 |" in capsys.readouterr().out
