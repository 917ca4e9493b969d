"""--mode grpo: the rewards on scripted completions (loopholes included), the prompts asked in each language as infer
asks them, the bad inputs, and a short run that leaves an adapter infer takes."""

import json
import shutil

import pytest

import gpt_oss_20b_sft as sft
from conftest import assert_usage_error, resolve, run_cli, snapshot, write_jsonl

FRENCH = "Alors, l'utilisateur veut savoir combien font sept fois huit. Je vais calculer calmement puis répondre."
ENGLISH = "Okay, the user wants to know what seven times eight is. I will work it out calmly and then answer."


def test_language_reward_reads_the_reasoning_alone_and_gives_nothing_for_too_little():
    assert sft.language_reward(FRENCH, "French") == 1.0
    assert sft.language_reward(FRENCH, "German") == 0.0
    half = f"{FRENCH}\n{ENGLISH}"  # a switch mid-way: the French sentences' share of the characters
    french = sum(len(s) for s in sft._SENTENCE_BREAK.split(FRENCH))
    english = sum(len(s) for s in sft._SENTENCE_BREAK.split(ENGLISH))
    assert sft.language_reward(half, "French") == pytest.approx(french / (french + english), abs=1e-12)
    # numbers and formulas are not words of any language: removed before detecting, never counted against it
    assert sft.language_reward("Alors, 7 x 8 = 56 et 56 / 8 = 7, donc je réponds calmement que le résultat est "
                               "bien celui-là.", "French") == 1.0
    for nothing in ("", None, "Okay so", "56", "7 x 8 = 56; 56 / 7 = 8", "Alors bon."):  # too short or no words
        assert sft.language_reward(nothing, "French") == 0.0, nothing
    assert sft.language_reward("Okay so", "English") == 0.0  # two words earn nothing, in any language


def test_format_correctness_and_answer_language_rewards():
    closed = [("analysis", FRENCH, True), ("final", "56", True)]
    assert sft.format_reward(closed) == 1.0
    assert sft.format_reward([("analysis", FRENCH, False)]) == 0.0  # unclosed analysis, no answer
    assert sft.format_reward([("analysis", FRENCH, True)]) == 0.0  # reasoning without a final answer
    assert sft.format_reward([("analysis", FRENCH, True), ("final", "5", False)]) == 0.0  # answer cut off
    assert sft.format_reward([("final", "56", True)]) == 0.0  # an answer without reasoning
    assert sft.format_reward([]) == 0.0
    assert sft.correctness_reward("Das Ergebnis ist 56.", {"number": 56}) == 1.0
    assert sft.correctness_reward("Das Ergebnis ist 54.", {"number": 56}) == 0.0
    assert sft.correctness_reward(None, {"accepted": ["Paris"]}) == 0.0
    assert sft.correctness_reward("Paris", None) is None  # the row has no answer: TRL leaves this reward out
    assert sft.answer_language_reward("La capitale de la France est Paris, bien sûr.", "French") == 1.0
    assert sft.answer_language_reward("The capital of France is Paris, of course.", "French") == 0.0
    assert sft.answer_language_reward(None, "French") == 0.0
    assert sft.answer_language_reward("Paris", "") is None


@pytest.mark.real_tokenizer
def test_the_rewards_read_the_harmony_channels_of_the_completion_ids(real_tokenizer):
    """The rewards as TRL calls them: completion token ids (what follows the prompt's <|start|>assistant) and the
    dataset's columns. English reasoning under a Chinese answer earns no Chinese; the per-language means are logged."""
    def ids(text):
        return sft.encode_chat(real_tokenizer, [{"role": "user", "content": "x"}])["input_ids"][:0] + \
            real_tokenizer(text, add_special_tokens=False)["input_ids"]

    completions = [
        ids(f"<|channel|>analysis<|message|>{ENGLISH}<|end|><|start|>assistant<|channel|>final<|message|>"
            "答案是五十六。<|return|>"),
        ids(f"<|channel|>analysis<|message|>{FRENCH}<|end|><|start|>assistant<|channel|>final<|message|>"
            "Sept fois huit font 56.<|return|>"),
        ids(f"<|channel|>analysis<|message|>{FRENCH}"),  # cut off inside the reasoning
    ]
    logged = {}
    language, form, correct, answer_language = sft.grpo_reward_functions(resolve("--mode", "grpo"),
                                                                                  real_tokenizer).values()
    columns = dict(reasoning_language=["Chinese", "French", "French"], answer=[json.dumps({"number": 56})] * 2 + [""],
                   answer_language=["Chinese", "French", ""])
    assert language(completions, log_metric=logged.__setitem__, **columns) == [0.0, 1.0, 1.0]
    assert form(completions, **columns) == [1.0, 1.0, 0.0]
    assert correct(completions, **columns) == [0.0, 1.0, None]  # "五十六" is no number the check reads
    assert answer_language(completions, **columns) == [1.0, 1.0, None]
    assert logged["language_reward/Chinese"] == 0.0 and logged["language_reward/French"] == 1.0
    french_tokens = len(real_tokenizer(FRENCH, add_special_tokens=False)["input_ids"])
    assert logged["reasoning_tokens/French"] == french_tokens
    assert [name for name in sft.reward_weights(resolve("--mode", "grpo"))] == ["language", "format", "correctness",
                                                                               "answer_language"]


def test_each_prompt_is_asked_in_each_language_with_infers_system_prompt(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"user": "What is 7 x 8?", "answer": 56}, {"user": "Capital of France?",
                                                                      "answer": ["Paris"], "answer_language": "fr"}])
    rows = sft.grpo_prompts(resolve("--mode", "grpo", "--dataset", str(prompts), "--reasoning-languages", "de,Chinese"))
    assert [(r["prompt"][1]["content"], r["reasoning_language"]) for r in rows] == [
        ("What is 7 x 8?", "German"), ("What is 7 x 8?", "Chinese"), ("Capital of France?", "German"),
        ("Capital of France?", "Chinese")]
    assert rows[0]["prompt"] == sft.build_chat("What is 7 x 8?", "German")
    assert rows[2]["prompt"] == sft.build_chat("Capital of France?", "German", "French")
    assert [json.loads(r["answer"]) for r in rows] == [{"number": 56}] * 2 + [{"accepted": ["Paris"]}] * 2
    own = tmp_path / "own.jsonl"  # without --reasoning-languages: each row's own
    write_jsonl(own, [{"user": "Hallo?", "reasoning_language": "Italian"}])
    (row,) = sft.grpo_prompts(resolve("--mode", "grpo", "--dataset", str(own)))
    assert (row["reasoning_language"], row["answer"], row["answer_language"]) == ("Italian", "", "")


def test_the_trainer_renders_each_prompt_as_infer_does(tmp_path, demo_model):
    """The token ids GRPOTrainer generates from (its own _tokenize_prompts) equal infer's prompt, at the run's
    reasoning effort."""
    from datasets import Dataset
    from trl import GRPOTrainer

    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"user": "Quelle heure est-il ?"}, {"user": "Wie heißt du?"}])
    cfg = resolve("--mode", "grpo", "--model", str(demo_model), "--dataset", str(prompts), "--reasoning-languages",
                  "French,German", "--reasoning-effort", "low", "--output_dir", str(tmp_path / "out"),
                  "--report_to", "none", "--num_generations", "2", "--batch_size", "2")
    rows = sft.grpo_prompts(cfg)
    tokenizer = sft.load_tokenizer(cfg.model)
    model = sft.load_model(cfg.model, sft.load_model_config(cfg.model), sft.find_runtime(cfg).dtype, "eager", "cpu",
                           None)
    trainer = GRPOTrainer(model=model, reward_funcs=list(sft.grpo_reward_functions(cfg, tokenizer).values()),
                          args=sft.grpo_config(cfg, sft.find_runtime(cfg)), train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=sft.build_lora_config(sft.TrainRun()))
    # private: GRPOTrainer._tokenize_prompts; checked against trl 1.16.0
    theirs, _, _ = trainer._tokenize_prompts([r["prompt"] for r in rows])
    ours = [sft.encode_chat(tokenizer, r["prompt"], add_generation_prompt=True, reasoning_effort="low")["input_ids"]
            for r in rows]
    assert theirs == ours and len(ours) == 4 and "Reasoning: low" in tokenizer.decode(ours[0])


@pytest.mark.parametrize("rows, flags, needle", [
    ([{"question": "7 x 8?"}], [], "prompt row 1 has no 'user' text (the question)"),
    ([{"user": "7 x 8?", "answer": {"value": 56}}], ["--reasoning-languages", "French"],
     "prompt row 1: 'answer' must be a number, a string, a list of strings"),
    ([{"user": "7 x 8?"}], [], "prompt row 1 has no 'reasoning_language': give --reasoning-languages"),
    ([{"user": "7 x 8?", "reasoning_language": "Klingon"}], [],
     "prompt row 1: 'reasoning_language': unknown language 'Klingon' (75 languages are known by English name, ISO "
     "code or native name; the language detector knows no other)"),
    ([{"user": "7 x 8?", "reasoning_language": 3}], [], "prompt row 1: 'reasoning_language': 3 is not a language name"),
    ([{"user": "7 x 8?", "reasoning_language": ["French"]}], [],
     "prompt row 1: 'reasoning_language': .'French'. is not a language name"),  # (a regex: . for [ and ])
    ([{"user": "7 x 8?", "answer_language": 7}], ["--reasoning-languages", "French"],
     "prompt row 1: 'answer_language': 7 is not a language name"),
    ([{"user": "7 x 8?", "answer": {"number": "four"}}], ["--reasoning-languages", "French"],
     "prompt row 1: 'answer' must be a number, a string, a list of strings, {\"number\": x} or {\"accepted\": "),
    ([{"user": "7 x 8?", "answer": {"accepted": "42"}}], ["--reasoning-languages", "French"],
     "prompt row 1: 'answer' must be"),
    ([{"user": "7 x 8?", "answer": float("nan")}], ["--reasoning-languages", "French"], "prompt row 1: 'answer' must be"),
    ([{"user": "7 x 8?", "answer": {"accepted": []}}], ["--reasoning-languages", "French"], "prompt row 1: 'answer' must"),
])
def test_a_bad_prompts_file_is_one_line_before_anything_loads(tmp_path, demo_model, rows, flags, needle):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, rows)
    with pytest.raises(sft.UsageError, match="^" + needle.replace("(", r"\(").replace(")", r"\)")):
        sft.run_grpo(resolve("--mode", "grpo", "--dataset", str(prompts), "--output_dir", str(tmp_path / "out"),
                             "--model", str(demo_model), *flags))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--reasoning-languages", "Klingon"], "--reasoning-languages: unknown language 'Klingon' (75 languages are known "
                                           "by English name, ISO code or native name; the language detector knows no "
                                           "other)"),
    (["--reasoning-languages", ",,"], "--reasoning-languages names no language: name one, e.g. --reasoning-languages "
                                      "German, or leave the flag out"),
    (["--num_generations", "3"], "--num_generations 3 must divide the completions of one optimizer step (8 x 4 x 1 "
                                 "process = 32)"),
    (["--num_generations", "1"], "--num_generations must be at least 2"),
    (["--language_reward", "0", "--format_reward", "0", "--correctness_reward", "0", "--answer_language_reward", "0"],
     "every reward weight is 0"),
    (["--format_reward", "-1"], "--format_reward cannot be negative"),
    (["--allow-any-language"], "--allow-any-language: grpo rewards the reasoning's language with the language detector"),
])
def test_bad_grpo_settings_are_one_line(flags, needle):
    with pytest.raises(sft.UsageError, match="^" + needle.replace("(", r"\(").replace(")", r"\)")):
        resolve("--mode", "grpo", *flags)


def test_each_language_is_asked_once_and_an_empty_csv_cell_is_no_answer(tmp_path):
    assert resolve("--mode", "grpo", "--reasoning-languages", "French,French,fr").reasoning_languages == ["French"]
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("user,answer,reasoning_language\nWhat is 7 x 8?,56,German\nName a red fruit.,,French\n")
    rows = sft.grpo_prompts(resolve("--mode", "grpo", "--dataset", str(prompts)))
    assert [(r["reasoning_language"], r["answer"]) for r in rows] == [("German", '{"accepted": ["56"]}'), ("French", "")]


@pytest.mark.slow
def test_a_refusal_when_the_model_is_read_leaves_the_earlier_run_as_it_was(tmp_path, demo_model):
    """Train and grpo check what loading the model would refuse (--use_4bit on experts not in MXFP4, flex attention
    on a CPU) before they claim the folder: an --overwrite that is refused deletes nothing."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"user": "Quelle heure est-il ?", "reasoning_language": "fr"}])
    out = tmp_path / "grpo"
    run = ["--mode", "grpo", "--model", str(demo_model), "--dataset", str(prompts), "--num_generations", "2",
           "--batch_size", "2", "--gradient_accumulation_steps", "1", "--max_steps", "1", "--max_completion_length", "4",
           "--report_to", "none", "--output_dir", str(out)]
    sft.run_grpo(resolve(*run))
    sft.release_folders()
    before = snapshot(out)
    for flag, needle in (("--use_4bit", "--use_4bit keeps the experts in MXFP4"),
                         ("--attn-implementation=flex_attention", "flex_attention applies gpt-oss's attention sinks")):
        for start, mode in ((sft.run_grpo, run), (sft.run_train, ["--model", str(demo_model), "--dataset",
                                                                   str(sft.DEMO_DATASET), "--report_to", "none",
                                                                   "--output_dir", str(tmp_path / "train")])):
            with pytest.raises(sft.UsageError, match=needle):
                start(resolve(*mode, "--overwrite", flag))
            sft.release_folders()
    assert snapshot(out) == before and not (tmp_path / "train").exists()


@pytest.mark.parametrize("make, said", [(lambda p: None, "does not exist"), (lambda p: p.write_text("x"), "is a file"),
                                        (lambda p: p.mkdir(), "holds no adapter_config.json: it is not a LoRA adapter")])
def test_an_adapter_path_that_is_no_adapter_says_what_it_is(tmp_path, make, said):
    make(tmp_path / "adapter")
    with pytest.raises(sft.UsageError) as refused:
        resolve("--mode", "grpo", "--adapter", str(tmp_path / "adapter"), "--model", "m")
    assert str(refused.value) == f"--adapter {tmp_path / 'adapter'} {said}" + (
        " folder" if said.endswith("adapter") else "") + "; pass the --output_dir of a train or grpo run"


def test_a_folder_of_another_modes_run_is_said_to_be_one(tmp_path):
    out = tmp_path / "sft"
    sft.claim_output_dir(out, "train", replace_own=True)
    (out / "adapter_config.json").write_text("{}")
    sft.record(out, out / "adapter_config.json")
    sft.release_folders()
    with pytest.raises(sft.UsageError) as refused:
        sft.check_output_dir(resolve("--mode", "grpo", "--output_dir", str(out), "--overwrite"))
    sft.release_folders()
    assert str(refused.value) == (f"--output_dir {out} holds a train run's outputs; --mode grpo writes into a folder "
                                  "of its own, e.g. --output_dir gpt-oss-20b-grpo")


def test_an_adapter_that_is_not_a_lora_is_refused(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(sft.UsageError) as refused:
        resolve("--mode", "grpo", "--adapter", str(tmp_path / "adapter"), "--model", "m")
    assert "adapter" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.slow
def test_a_short_grpo_run_writes_an_adapter_that_infer_takes(tmp_path, demo_model):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"user": "Quelle heure est-il ?", "answer": 3}, {"user": "What is 7 plus 8?"}])
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "grpo"
    result = run_cli("--mode", "grpo", "--model", str(demo_model), "--dataset", str(prompts), "--reasoning-languages",
                     "French,German", "--num_generations", "4", "--batch_size", "4", "--gradient_accumulation_steps",
                     "1", "--max_steps", "2", "--max_completion_length", "24", "--learning_rate", "5e-3",
                     "--report_to", "none", "--output_dir", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "prompts: 4 (2 in French, 2 in German), 4 completions each" in result.stdout
    assert (f"saved adapter, model card (README.md), run_summary.json, speed.json and reward_curve.png to {out}/"
            in result.stdout)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["optimizer_steps"] == 2 and summary["reasoning_languages"] == ["French", "German"]
    assert summary["started_from"].startswith("a new LoRA adapter on") and len(summary["per_step"]) == 2
    assert {"language_reward/French", "reasoning_tokens/German"} <= set().union(*summary["per_step"])
    assert {p.name for p in out.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json", "README.md",
                                                "reward_curve.png", "run_summary.json", sft.OWNER_FILE}
    assert (tmp_path / "notes.txt").read_text() == "mine"
    answered = sft.run_infer(resolve("--mode", "infer", "--adapter", str(out), "--model", str(demo_model),
                                     "--prompt", "Hallo?", "--reasoning-language", "German", "--max_new_tokens", "4",
                                     "--temperature", "0"))
    assert answered["reasoning_language"] == "German" and answered["tokens"] == 4  # the adapter loads and answers
    before = snapshot(out)  # a second run into the folder without --overwrite or --resume is refused, nothing touched
    again = run_cli("--mode", "grpo", "--model", str(demo_model), "--dataset", str(prompts), "--reasoning-languages",
                    "French", "--output_dir", str(out), "--report_to", "none", cwd=tmp_path)
    assert again.returncode == 2 and snapshot(out) == before


@pytest.mark.slow
def test_resuming_a_finished_grpo_run_trains_nothing(tmp_path, demo_model):
    """A finished run is said to be one and stays as it is; one that stopped before its adapter was saved gets the
    last checkpoint's adapter, with no step past --max_steps (transformers alone would train one more)."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"user": "Quelle heure est-il ?"}, {"user": "Wie alt bist du?"}])
    out = tmp_path / "grpo"
    run = ["--mode", "grpo", "--model", str(demo_model), "--dataset", str(prompts), "--reasoning-languages",
           "French,German", "--num_generations", "2", "--batch_size", "2", "--gradient_accumulation_steps", "1",
           "--max_steps", "2", "--save_steps", "1", "--max_completion_length", "8", "--report_to", "none",
           "--output_dir", str(out)]
    assert sft.run_grpo(resolve(*run)).state.global_step == 2
    before = snapshot(out)
    assert sft.run_grpo(resolve(*run, "--resume")) is None and snapshot(out) == before
    (out / "adapter_config.json").unlink()  # as if stopped between the last checkpoint and the adapter's save
    trainer = sft.run_grpo(resolve(*run, "--resume"))
    assert trainer.state.global_step == 2 and not (out / "checkpoint-3").exists()
    assert (out / "adapter_model.safetensors").read_bytes() == before["adapter_model.safetensors"]
    assert json.loads((out / "run_summary.json").read_text())["optimizer_steps"] == 2


@pytest.mark.slow
def test_a_kl_term_trains_against_the_given_adapter_and_leaves_its_copy_out_of_the_output(tmp_path, demo_model):
    """--beta with --adapter: TRL 1.16 keeps a frozen copy of the adapter (PEFT adapter "ref") as the KL's reference,
    so the first step's KL is 0 for an adapter that is not the base's identity. The adapter written is the trained
    one alone (PEFT saves every adapter a model holds); checkpoints keep the copy, which transformers reloads on
    resume."""
    import torch
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    start = get_peft_model(AutoModelForCausalLM.from_pretrained(demo_model), sft.build_lora_config(sft.TrainRun()))
    with torch.no_grad():  # B = 0 would make the adapter the base itself, and the base a reference as good as it
        for name, param in start.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    start.save_pretrained(tmp_path / "start")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"user": "Quelle heure est-il ?"}, {"user": "Wie alt bist du?"}])
    out = tmp_path / "grpo"
    trainer = sft.run_grpo(resolve(
        "--mode", "grpo", "--model", str(demo_model), "--adapter", str(tmp_path / "start"), "--beta", "0.04",
        "--dataset", str(prompts), "--reasoning-languages", "French", "--num_generations", "2", "--batch_size", "2",
        "--gradient_accumulation_steps", "1", "--max_steps", "2", "--save_steps", "2", "--max_completion_length", "8",
        "--report_to", "none", "--output_dir", str(out)))
    assert [e["kl"] for e in trainer.state.log_history if "kl" in e][0] == 0  # measured against the adapter itself
    assert "ref" not in {p.name for p in out.iterdir()}
    assert (out / "checkpoint-2" / "ref" / "adapter_model.safetensors").is_file()
    written = load_file(out / "adapter_model.safetensors")
    trained = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert written.keys() == load_file(tmp_path / "start" / "adapter_model.safetensors").keys() == trained.keys()
    assert all(torch.equal(written[name], trained[name]) for name in written)  # the trained adapter, not the copy


@pytest.mark.slow
def test_the_grpo_demo_teaches_the_language_no_sft_row_reasons_in(demo_run, tmp_path):
    """Issue 40's targets, on the demo's held-out questions (kinds no row has), from the demo's SFT adapter: Polish
    (in the base's plain documents only) <= 40% after SFT and >= 80% after GRPO; each SFT language >= 90% after GRPO;
    no more outputs without a final answer than after SFT; reasoning at least 70% as long. One table, base / SFT /
    GRPO side by side."""
    user = tmp_path / "user"
    shutil.copytree(demo_run / "user" / "demo_output", user / "demo_output")
    result = run_cli("--mode", "grpo", "--demo", "--report_to", "none", cwd=user, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    out = user / "demo_grpo_output"
    table = (out / "eval" / "eval_summary.md").read_text()
    assert table in result.stdout and "| Polish * | demo_output | 20 |" in table
    rows = {(r["model"], r["reasoning_language"]): r
            for r in json.loads((out / "eval" / "eval_results.json").read_text())["summary"]}
    sft_rows, grpo_rows = (lambda lang: rows["demo_output", lang]), (lambda lang: rows["demo_grpo_output", lang])
    assert sft_rows("Polish")["reasoning_language_match"] <= 0.4, table
    assert grpo_rows("Polish")["reasoning_language_match"] >= 0.8, table
    for language in ("French", "German", "Spanish", "Italian"):
        assert grpo_rows(language)["reasoning_language_match"] >= 0.9, (language, table)
    assert grpo_rows("all")["malformed"] <= sft_rows("all")["malformed"], table
    assert grpo_rows("all")["reasoning_tokens"] >= 0.7 * sft_rows("all")["reasoning_tokens"], table
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["reasoning_languages"] == ["French", "German", "Italian", "Polish", "Spanish"]
    assert (out / "reward_curve.png").stat().st_size > 0 and (user / "demo_output" / "adapter_config.json").exists()


def test_the_grpo_demo_resolves_before_its_sft_adapter_exists(tmp_path, monkeypatch):
    """--mode grpo --demo in a fresh folder trains the demo's SFT adapter first: its settings (and --print-config)
    resolve before that adapter exists, naming the unseen language among the five."""
    monkeypatch.chdir(tmp_path)
    cfg = resolve("--mode", "grpo", "--demo")
    assert cfg.adapter == "demo_output" and cfg.reasoning_languages == ["Polish", "French", "German", "Spanish",
                                                                        "Italian"]
    assert list(tmp_path.iterdir()) == []
