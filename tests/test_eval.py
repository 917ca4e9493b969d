"""--mode eval: the scoring functions, the detector's accuracy, the bundled questions, and the command end to end."""

import collections
import json
from pathlib import Path

import pytest
import torch

import gpt_oss_20b_sft as sft
from conftest import ROOT, SHARED, resolve, run_cli

GERMAN = "Der Nutzer fragt, wie viel sieben mal acht ist. Sieben mal acht ergibt sechsundfünfzig."
ENGLISH = "The user asks for the capital of Australia. Many people think of Sydney, but the capital is Canberra."
CHINESE = "用户问澳大利亚的首都是哪里。很多人以为是悉尼，但其实是堪培拉。"
KOREAN = "사용자가 호주의 수도를 묻고 있습니다. 많은 사람이 시드니라고 생각하지만 수도는 캔버라입니다."


def test_reasoning_in_the_requested_language():
    scores = sft.score_output("German", GERMAN, "Sieben mal acht ist 56.", "German", {"number": 56})
    assert scores == {"reasoning_language_detected": "German", "reasoning_language_match": True,
                      "reasoning_language_share": 1.0, "malformed": False, "answer_language_detected": "German",
                      "answer_language_match": True, "correct": True}


def test_reasoning_in_the_wrong_language():
    scores = sft.score_output("German", ENGLISH, "The capital is Sydney.", "English", {"accepted": ["Canberra"]})
    assert scores["reasoning_language_detected"] == "English"
    assert scores["reasoning_language_match"] is False and scores["reasoning_language_share"] == 0.0
    assert scores["answer_language_match"] is True and scores["correct"] is False


def test_mixed_reasoning_scores_the_share_by_characters():
    german, english = "Ich rechne zuerst sieben mal acht.", "Then I double check the multiplication carefully."
    scores = sft.score_output("German", f"{german} {english}", "56")
    assert scores["reasoning_language_share"] == round(len(german) / (len(german) + len(english)), 4)
    assert "answer_language_match" not in scores and "correct" not in scores  # nothing asked, nothing scored


def test_empty_reasoning_and_missing_final_answer():
    scores = sft.score_output("Chinese", "", None, "Chinese", {"accepted": ["堪培拉"]})
    assert scores == {"reasoning_language_detected": None, "reasoning_language_match": False,
                      "reasoning_language_share": 0.0, "malformed": True, "answer_language_detected": None,
                      "answer_language_match": False, "correct": False}


def test_an_answer_without_letters_has_no_language_to_judge():
    scores = sft.score_output("Chinese", CHINESE, "7 × 8 = 56", "Chinese", {"number": 56})
    assert scores["answer_language_detected"] is None and scores["answer_language_match"] is None
    assert scores["correct"] is True


def test_stopped_thinking_is_reasoning_empty_or_a_few_tokens_long():
    """The column users look for after LoRA on gpt-oss: the model answers without an analysis channel."""
    assert sft.stopped_thinking("", 0) and sft.stopped_thinking("Okay.", 2) and sft.stopped_thinking(None, None)
    assert not sft.stopped_thinking(GERMAN, 20) and not sft.stopped_thinking(CHINESE, 8)
    assert sft.stopped_thinking("Also, 56.", None) and not sft.stopped_thinking(GERMAN, None)  # uncounted: characters
    rows = sft.summarize_scores([{"model": "m", "reasoning_language": "German", "reasoning_language_match": False,
                                  "reasoning_language_share": 0.0, "malformed": False, "stopped_thinking": stopped}
                                 for stopped in (True, False, False, False)])
    assert rows[0]["stopped_thinking"] == 0.25
    assert "| reasoning tokens | stopped thinking | no final answer |" in sft.summary_table(rows).splitlines()[0]


@pytest.mark.parametrize("text, values", [
    ("1.000 Meter", {1000.0, 1.0}),            # thousands in German, a decimal in English: both readings count
    ("It is 2,5 km.", {2.5}),
    ("1 000 000 de personnes", {1000000.0, 1.0, 0.0}),
    ("Temperatur: -3 °C", {-3.0}),
    ("2024-02-29", {2024.0, 2.0, 29.0}),     # a dash between digits is not a minus sign
    ("答案是５６。", {56.0}),                 # full-width digits
    ("no numbers here", set()),
])
def test_number_readings(text, values):
    assert sft.number_readings(text) == values


@pytest.mark.parametrize("final, expected, correct", [
    ("Die Hauptstadt ist Canberra.", {"accepted": ["Canberra"]}, True),
    ("Canberras Parlament", {"accepted": ["Canberra"]}, False),  # a spelling must stand as a word
    ("La capital es Berlín.", {"accepted": ["Berlin"]}, True),   # accents folded
    ("首都是堪培拉。", {"accepted": ["Canberra", "堪培拉"]}, True),
    ("Es sind 2,5 Stunden.", {"number": 2.5}, True),
    ("The result is 56.", {"number": 65}, False),
    (None, {"number": 56}, False),
])
def test_answer_is_correct(final, expected, correct):
    assert sft.answer_is_correct(final, expected) is correct


def test_detector_accuracy_on_the_labelled_check_set():
    """The stated threshold (README): >= 97% overall and >= 90% in every language; lingua measured 98.1%."""
    rows = [json.loads(line) for line in (ROOT / "data" / "langid_check.jsonl").read_text().splitlines()]
    assert len(rows) == 320 and collections.Counter(r["language"] for r in rows)["Chinese"] == 32
    hits, totals = collections.Counter(), collections.Counter()
    for row in rows:
        totals[row["language"]] += 1
        hits[row["language"]] += sft.detect_language(row["text"]) == row["language"]
    assert sum(hits.values()) / len(rows) >= 0.97, hits
    assert all(hits[lang] / totals[lang] >= 0.90 for lang in totals), hits


def test_bundled_questions():
    questions = sft.read_eval_questions(str(sft.EVAL_QUESTIONS))
    assert len(questions) >= 60 and len({q["id"] for q in questions}) == len(questions)
    assert all(len(q["question"]) >= 4 for q in questions)
    assert set(questions[0]["question"]) == {"English", "French", "German", "Spanish", "Chinese"}
    assert {q["category"] for q in questions} == {"arithmetic", "unit_conversion", "capitals", "dates", "logic"}
    assert all(q["expected"] and set(q["expected"]) in ({"number"}, {"accepted"}) for q in questions)


def test_eval_plan_rotates_languages_and_keeps_the_questions_per_reasoning_language():
    questions = sft.read_eval_questions(str(sft.EVAL_QUESTIONS))
    plan = sft.eval_plan(questions, ["German", "Chinese"], ["English", "French"], [None], limit=3)
    assert [(p["reasoning_language"], p["id"], p["question_language"]) for p in plan] == [
        ("German", "arithmetic-01", "English"), ("German", "arithmetic-02", "French"),
        ("German", "arithmetic-03", "English"), ("Chinese", "arithmetic-01", "English"),
        ("Chinese", "arithmetic-02", "French"), ("Chinese", "arithmetic-03", "English")]
    assert all(p["answer_language"] == p["question_language"] and not p["answer_language_instructed"] for p in plan)
    assert plan[1]["prompt"] == questions[1]["question"]["French"]
    grid = sft.eval_plan(questions, ["German"], ["English", "French"], ["Italian", "Japanese"], limit=2, full_grid=True)
    assert len(grid) == 2 * 2 * 2 and {p["answer_language"] for p in grid} == {"Italian", "Japanese"}
    with pytest.raises(sft.UsageError, match="has no Korean version"):
        sft.eval_plan(questions, ["German"], ["Korean"], [None])


def test_eval_defaults(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text('{"base_model_name_or_path": "some/base"}')
    cfg = resolve("--mode", "eval", "--adapter", str(tmp_path / "a"))
    assert (cfg.temperature, cfg.max_new_tokens, cfg.eval_batch_size) == (0.0, 1024, 32)
    assert (cfg.output_dir, cfg.model) == (str(tmp_path / "a" / "eval"), "some/base")  # next to it; its base
    cfg = resolve("--mode", "eval", "--demo")
    assert cfg.compare_base and cfg.output_dir == "demo_output/eval" and cfg.max_new_tokens == 224
    assert resolve("--mode", "eval", "--temperature", "0.7").temperature == 0.7  # sampling by flag
    assert resolve("--mode", "infer").temperature == 0.6


def test_batched_generation_equals_one_at_a_time(demo_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    chats = [sft.build_chat("What is 7 times 8?", "German"),
             sft.build_chat("Quelle est la capitale de l'Australie ? Réponds en une phrase.", "Chinese", "French"),
             sft.build_chat("Hi", "English")]
    alone = [sft.generate(model, tokenizer, [chat], "medium", 24, 0.0)[0] for chat in chats]
    assert sft.generate(model, tokenizer, chats, "medium", 24, 0.0, batch_size=3) == alone  # left padding is exact


SCORE_LINES = [
    {"model": "vllm", "reasoning_language": "German", "analysis": GERMAN, "final": "Die Antwort ist 56.",
     "answer_language": "German", "expected": 56, "reasoning_tokens": 12},
    {"model": "vllm", "reasoning_language": "german", "analysis": ENGLISH, "final": "The answer is 54.",
     "answer_language": "English", "expected": 56, "reasoning_tokens": 20},
    {"model": "vllm", "reasoning_language": "Chinese", "analysis": CHINESE, "final": None,
     "expected": ["Canberra", "堪培拉"], "reasoning_tokens": 30},
    {"model": "vllm", "reasoning_language": "Korean", "analysis": KOREAN, "final": "캔버라입니다.",
     "answer_language": "Korean", "expected": ["캔버라"], "reasoning_tokens": 8},
]


@pytest.mark.slow
def test_a_score_file_that_is_a_folder_is_named_as_one(tmp_path):
    with pytest.raises(sft.UsageError, match=f"^--score-file {tmp_path} is a folder: name a .jsonl file$"):
        sft.read_score_file(str(tmp_path))


def test_score_file_gives_the_expected_numbers(tmp_path):
    scored = tmp_path / "outputs.jsonl"
    scored.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in SCORE_LINES))
    result = run_cli("--mode", "eval", "--score-file", str(scored), "--output_dir", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "report" / "eval_results.json").read_text())
    items = report["items"]
    assert [i["reasoning_language_match"] for i in items] == [True, False, True, True]
    assert [i["reasoning_language_detected"] for i in items] == ["German", "English", "Chinese", "Korean"]
    assert [i["correct"] for i in items] == [True, False, False, True]
    assert [i.get("answer_language_match") for i in items] == [True, True, None, True]
    overall = next(r for r in report["summary"] if r["reasoning_language"] == "all")
    assert overall == {"model": "vllm", "reasoning_language": "all", "n": 4, "reasoning_language_match": 0.75,
                       "reasoning_language_share": 0.75, "answer_language_match": 1.0, "accuracy": 0.5,
                       "reasoning_tokens": 17.5, "stopped_thinking": 0.0, "malformed": 0.25}
    german = next(r for r in report["summary"] if r["reasoning_language"] == "German")
    assert (german["n"], german["reasoning_language_match"]) == (2, 0.5)
    table = (tmp_path / "report" / "eval_summary.md").read_text()
    assert "| Korean * | vllm | 1 | 100% | 100% | 100% | 100% | 8 | 0% | 0% |" in table
    assert "| all | vllm | 4 | 75% | 75% | 100% | 50% | 18 | 0% | 25% |" in table and table.splitlines()[0] in result.stdout
    assert (tmp_path / "report" / "eval_summary.png").stat().st_size > 10_000


def test_score_file_counts_reasoning_tokens_with_the_models_tokenizer(tmp_path, real_tokenizer):
    scored = tmp_path / "outputs.jsonl"
    scored.write_text(json.dumps({"reasoning_language": "Chinese", "analysis": CHINESE}, ensure_ascii=False) + "\n")
    result = sft.run_eval(resolve("--mode", "eval", "--score-file", str(scored), "--model", str(SHARED),
                                  "--output_dir", str(tmp_path / "report")))
    assert result["items"][0]["reasoning_tokens"] == len(real_tokenizer(CHINESE, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("lines, argv, needle", [
    ([{"reasoning_language": "German", "analysis": GERMAN}, {"reasoning_language": "Klingon", "analysis": "x"}], [],
     "outputs.jsonl line 2: unknown language 'Klingon'"),
    ([{"reasoning_language": "German", "analysis": GERMAN}, "{not json"], [], "outputs.jsonl line 2 is not valid JSON"),
    ([{"reasoning_language": "German"}], [], "outputs.jsonl line 1: needs a string 'analysis'"),
    ([{"reasoning_language": "German", "analysis": "x", "expected": {"answer": 3}}], [],
     "outputs.jsonl line 1: 'expected' must be a number"),
    ([{"reasoning_language": "German", "analysis": "x", "final": "4", "expected": {"accepted": "42"}}], [],
     "outputs.jsonl line 1: 'expected' must be a number"),  # a string would be read letter by letter: "4" correct
    ([{"reasoning_language": "German", "analysis": "x", "final": "4", "expected": {"number": "four"}}], [],
     "outputs.jsonl line 1: 'expected' must be a number"),
    ([{"reasoning_language": "German", "analysis": "x", "reasoning_language_x": 1}, {"reasoning_language": 3,
                                                                                    "analysis": "x"}], [],
     "outputs.jsonl line 2: needs a string 'reasoning_language'"),
])
def test_bad_score_files_are_one_line_exit_2(tmp_path, lines, argv, needle):
    scored = tmp_path / "outputs.jsonl"
    scored.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    result = run_cli("--mode", "eval", "--score-file", str(scored), *argv, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["outputs.jsonl"]


@pytest.mark.parametrize("argv, needle", [
    (["--mode", "eval", "--reasoning-languages", "Chinese,Elvish"], "--reasoning-languages: unknown language 'Elvish'"),
    (["--mode", "eval", "--answer-language", "Dothraki"], "--answer-language: unknown language 'Dothraki'"),
    (["--mode", "eval", "--compare-base"], "--compare-base needs --adapter"),
    (["--mode", "train", "--score-file", "x.jsonl"], "--score-file is an eval setting; --mode train does not read it"),
    (["--mode", "eval", "--score-file", "missing.jsonl"], "--score-file missing.jsonl does not exist"),
    (["--mode", "eval", "--limit", "0"], "--max_questions (--limit, --max_samples) must be a positive integer, got 0"),
])
def test_bad_eval_flags_are_one_line_exit_2(tmp_path, argv, needle):
    result = run_cli(*argv, "--model", str(tmp_path), cwd=tmp_path)  # a local model: no GPU note on stdout
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_eval_demo_end_to_end(demo_folder):
    result = run_cli("--mode", "eval", "--demo", "--limit", "4", cwd=demo_folder)
    assert result.returncode == 0, result.stderr[-2000:]
    out = demo_folder / "demo_output" / "eval"
    assert {p.name for p in out.iterdir()} == {"eval_results.json", "eval_summary.md", "eval_summary.png", sft.OWNER_FILE}
    report = json.loads((out / "eval_results.json").read_text())
    items = report["items"]
    assert len(items) == 2 * 5 * 4 and [i["model"] for i in items[::20]] == ["base", "tuned"]
    assert [i["reasoning_language"] for i in items[:20:4]] == list(sft.TRAINED_LANGUAGES)  # the demo's five
    assert all(isinstance(i["reasoning_language_match"], bool) and "reasoning_language_detected" in i for i in items)
    assert all(i["tokens"] <= 224 and isinstance(i["reasoning_tokens"], int) for i in items)
    assert "| all | tuned | 20 |" in result.stdout and (out / "eval_summary.md").read_text() in result.stdout + "\n"


def test_score_file_offline_without_a_tokenizer(tmp_path, capsys):
    # the default model is a hub id this offline machine has never downloaded: scoring goes on, tokens uncounted
    scored = tmp_path / "outputs.jsonl"
    scored.write_text(json.dumps({"reasoning_language": "German", "analysis": GERMAN, "final": "56"}) + "\n")
    result = sft.run_eval(resolve("--mode", "eval", "--score-file", str(scored), "--output_dir", str(tmp_path / "r")))
    assert result["items"][0]["reasoning_tokens"] is None and result["items"][0]["reasoning_language_match"] is True
    assert "note: reasoning tokens not counted: the tokenizer of openai/gpt-oss-20b is not on this machine" \
        in capsys.readouterr().out
    assert "| German | outputs | 1 | 100% | 100% | – | – | – | 0% | 0% |" in (tmp_path / "r" / "eval_summary.md").read_text()


def random_lora(folder, model_dir, seed):
    """A real LoRA adapter of the demo model with random A and B (PEFT's init_lora_weights=False), saved as PEFT
    saves it: an adapter whose outputs differ from the base's and from another seed's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_compare_adapter_puts_two_adapters_and_the_base_in_one_table(tmp_path, demo_model):
    """--adapter A --compare-adapter B --compare-base: one table, and each model's rows are what eval gives for it
    alone (greedy, the same prompts)."""
    a, b = (random_lora(tmp_path / name, demo_model, seed) for name, seed in (("a", 1), ("b", 2)))
    common = ["--mode", "eval", "--model", str(demo_model), "--eval-file", str(ROOT / "data" / "demo_eval_questions.jsonl"),
              "--reasoning-languages", "German", "--limit", "3", "--max_new_tokens", "24"]
    both = sft.run_eval(resolve(*common, "--adapter", a, "--compare-adapter", b, "--compare-base",
                                "--output_dir", str(tmp_path / "both")))
    assert [i["model"] for i in both["items"][::3]] == ["base", b, a]
    table = (tmp_path / "both" / "eval_summary.md").read_text()
    assert all(f"| German | {label} | 3 |" in table for label in ("base", a, b))
    for adapter in (a, b):
        alone = sft.run_eval(resolve(*common, "--adapter", adapter, "--compare-base",
                                     "--output_dir", str(tmp_path / f"alone-{Path(adapter).name}")))
        for label in ("base", "tuned"):
            mine = [(i["analysis"], i["final"]) for i in alone["items"] if i["model"] == label]
            assert mine == [(i["analysis"], i["final"]) for i in both["items"]
                            if i["model"] == (adapter if label == "tuned" else "base")]
    assert [i["analysis"] for i in both["items"] if i["model"] == a] != \
        [i["analysis"] for i in both["items"] if i["model"] == b]  # two adapters, two outputs: the switch happened


def test_bad_compare_adapters_are_one_line(tmp_path, demo_model):
    a = random_lora(tmp_path / "a", demo_model, 1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    for argv, needle in [(["--compare-adapter", a], "--compare-adapter needs --adapter"),
                         (["--adapter", a, "--compare-adapter", str(tmp_path / "a")],
                          f"--compare-adapter {tmp_path / 'a'} is --adapter itself"),
                         (["--adapter", a, "--compare-adapter", str(tmp_path / "full")],
                          f"--compare-adapter {tmp_path / 'full'} is a IA3 adapter"),
                         (["--adapter", a, "--compare-adapter", str(tmp_path / "missing")],
                          f"--compare-adapter {tmp_path / 'missing'} does not exist")]:
        with pytest.raises(sft.UsageError) as refused:
            resolve("--mode", "eval", "--model", str(demo_model), *argv)
        assert needle in str(refused.value) and "\n" not in str(refused.value), refused.value
