"""One rule for language names in every mode: English names in any case and spacing, ISO codes and native names all
become the name the training rows use; anything else is one line naming close matches."""

import itertools
import string
import sys

import pytest

from conftest import ROOT, resolve, sft, write_jsonl


def language_table() -> str:
    """data/languages.tsv as lingua and langcodes give it: lingua's 75 languages (the names every mode writes), the
    codes langcodes reads as each (ISO 639-1, 639-2/B, 639-3, old aliases), their English and own names (CLDR). The
    script reads the file, so no mode but eval needs either library. `python tests/test_languages.py` rewrites it."""
    import langcodes
    from lingua import Language

    by_code = {}
    for language in Language.all():
        for code in (language.iso_code_639_1, language.iso_code_639_3):
            by_code[code.name.lower()] = language.name.title()
    codes = {name: set() for name in by_code.values()}
    for tag in map("".join, itertools.chain(*(itertools.product(string.ascii_lowercase, repeat=n) for n in (2, 3)))):
        if tag in by_code or langcodes.tag_is_valid(tag):
            read = langcodes.get(tag) if langcodes.tag_is_valid(tag) else None
            name = by_code.get(tag) or read and (by_code.get(read.language) or by_code.get(read.to_alpha3()))
            if name:
                codes[name].add(tag)
    lines = ["# name\tISO 639-1, 639-3, other codes\tEnglish and own names (written by tests/test_languages.py)"]
    for language in sorted(Language.all(), key=lambda l: l.name):
        name, code = language.name.title(), language.iso_code_639_1.name.lower()
        read = langcodes.Language.get(code)
        names = dict.fromkeys(n for n in (read.display_name("en"), read.autonym()) if n.casefold() != name.casefold())
        first = [code, language.iso_code_639_3.name.lower()]
        lines.append("\t".join([name, " ".join(first + sorted(codes[name] - set(first))), "|".join(names)]))
    return "\n".join(lines) + "\n"


def test_the_language_table_is_what_lingua_and_langcodes_say():
    assert (ROOT / "data" / "languages.tsv").read_text(encoding="utf-8") == language_table()


def test_the_table_reads_every_spelling_as_langcodes_did():
    """The rule before the table (langcodes + lingua, as the script ran it) and now agree on every English name,
    code, own name and tag, in any case and spacing, but for two of lingua's own languages it used to refuse."""
    import langcodes

    def before(text):
        text = " ".join(text.split())
        try:
            tag = langcodes.get(text) if langcodes.tag_is_valid(text) else langcodes.find(text)
        except (LookupError, ValueError):
            return None
        return sft.known_languages().get(tag.language) or sft.known_languages().get(tag.to_alpha3())

    def now(text):
        try:
            return sft.language_name(text, "--x")
        except sft.UsageError:
            return None

    spellings = sft.known_languages()
    typed = {form for spelling in spellings for form in (spelling, spelling.upper(), spelling.title(), f" {spelling} ")}
    typed |= {f"{code}{region}" for code in spellings if len(code) <= 3 for region in ("-US", "_Latn-RS")}
    typed |= {"Norwegian", "Klingon", "Germn", "Portuguese (Brazil)", "chinese (traditional)", "Deutsch (Schweiz)"}
    differ = {text: now(text) for text in typed if before(text) != now(text)}
    assert len(typed) > 1600 and set(differ.values()) == {"Bokmal", "Tagalog"}, differ
    assert {t for t in differ if "-" not in t and "_" not in t} == {
        form for spelling in ("bokmal", "tl", "tgl", "filipino")
        for form in (spelling, spelling.upper(), spelling.title(), f" {spelling} ")}


@pytest.mark.parametrize("typed, name", [
    ("German", "German"), ("german", "German"), (" GERMAN ", "German"), ("de", "German"), ("deu", "German"),
    ("Deutsch", "German"), ("zh", "Chinese"), ("中文", "Chinese"), ("日本語", "Japanese"), ("ja", "Japanese"),
    ("français", "French"), ("Español", "Spanish"), ("italiano", "Italian"), ("pt", "Portuguese"),
    ("pt-BR", "Portuguese"), ("zh_Hant", "Chinese"), ("Chinese (Traditional)", "Chinese"), ("русский", "Russian"), ("한국어", "Korean"), ("Swahili", "Swahili"),
])
def test_names_codes_and_native_names(typed, name):
    assert sft.language_name(typed, "--x") == name


def test_unknown_names_are_one_line_with_close_matches():
    with pytest.raises(sft.UsageError, match=r"--x: unknown language 'Germn'; did you mean German or Georgian\?"):
        sft.language_name("Germn", "--x")
    with pytest.raises(sft.UsageError, match=r"--x: unknown language 'Klingon' \(75 languages .* "
                                             r"--allow-any-language sends another name as typed\)"):
        sft.language_name("Klingon", "--x")
    with pytest.raises(sft.UsageError, match="--x is empty"):
        sft.language_name("  ", "--x")
    assert sft.language_name(" Klingon  ", "--x", any_language=True) == "Klingon"  # spaces normalised, name as typed


def test_infer_train_and_eval_share_the_rule():
    infer = resolve("--mode", "infer", "--reasoning-language", "deutsch", "--answer-language", "es", "--prompt", "hi")
    assert (infer.reasoning_language, infer.answer_languages) == ("German", ["Spanish"])
    train = resolve("--reasoning-languages", "fr,DE")
    assert train.reasoning_languages == ["French", "German"]
    eval_ = resolve("--mode", "eval", "--reasoning-languages", "zh,ja,pt", "--question-languages", "english",
                    "--answer-languages", "français")
    assert (eval_.eval_reasoning_languages, eval_.question_languages, eval_.answer_languages) == (
        ["Chinese", "Japanese", "Portuguese"], ["English"], ["French"])
    assert resolve("--mode", "infer", "--reasoning-language", "Klingon", "--allow-any-language").reasoning_language \
        == "Klingon"
    with pytest.raises(sft.UsageError, match="--reasoning-language: unknown language 'Klingon'"):
        resolve("--mode", "infer", "--reasoning-language", "Klingon")
    # eval scores the reasoning with the detector, which cannot score a language it does not know: the flag itself
    # is refused, not the name with advice to pass the flag that was passed
    for flag in ("--reasoning-languages", "--question-languages"):
        with pytest.raises(sft.UsageError, match="^--allow-any-language: eval scores the reasoning with the language "
                                                 "detector, which knows only its 75 languages; drop it$"):
            resolve("--mode", "eval", flag, "Klingon", "--allow-any-language")


def test_train_filter_reads_row_names_with_the_same_rule(tmp_path):
    rows = [{"reasoning_language": lang, "user": "q", "analysis": "a", "final": "f"}
            for lang in ("German", "german", "French", "Klingon")]
    assert len(sft.prepare_chats(rows, ["de"], any_language=True)) == 2
    assert len(sft.prepare_chats(rows, ["Klingon"], any_language=True)) == 1
    with pytest.raises(sft.UsageError, match="no rows with reasoning language Japanese; the data has French, German"):
        sft.prepare_chats(rows, ["Japanese"], any_language=True)


def test_rows_languages_follow_the_rule_of_the_flags():
    """german, de, Deutsch in the rows train as one system prompt, the name infer sends; an unknown one is refused
    (or kept as typed with --allow-any-language); a null one is one line naming the row."""
    rows = [{"reasoning_language": lang, "user": "q", "analysis": "a", "final": "f"}
            for lang in ("German", "german", "de", " Deutsch ")]
    rows.append({"messages": [{"role": "system", "content": "reasoning language: deu\n\nBe terse."},
                              {"role": "user", "content": "q"},
                              {"role": "assistant", "content": "f", "thinking": "a"}]})
    chats = sft.prepare_chats(rows)
    assert {chat[0]["content"] for chat in chats[:4]} == {"reasoning language: German"}
    assert chats[4][0]["content"] == "reasoning language: German\n\nBe terse."
    assert {sft.reasoning_language_of({}, chat) for chat in chats} == {"German"}  # what run_summary.json records
    klingon = [*rows, {**rows[0], "reasoning_language": "Klingon"}]
    with pytest.raises(sft.UsageError, match=r"^row 6: reasoning_language: unknown language 'Klingon' \(75 languages"):
        sft.prepare_chats(klingon)
    assert sft.prepare_chats(klingon, any_language=True)[5][0]["content"] == "reasoning language: Klingon"
    with pytest.raises(sft.UsageError, match="^row 2: column 'reasoning_language' must be a string, got null$"):
        sft.prepare_chats([rows[0], {**rows[0], "reasoning_language": None}])


def test_score_file_language_names(tmp_path):
    path = write_jsonl(tmp_path / "outs.jsonl", [{"reasoning_language": "de", "analysis": "Ich denke nach.",
                                                  "final": "4", "answer_language": "english"}])
    item = sft.read_score_file(path)[0]
    assert (item["reasoning_language"], item["answer_language"]) == ("German", "English")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"reasoning_language": "Elvish", "analysis": "..."}])
    with pytest.raises(sft.UsageError, match="line 1: unknown language 'Elvish'"):
        sft.read_score_file(bad)


@pytest.mark.real_tokenizer
def test_infer_sends_the_trained_token(real_tokenizer, pinned_date):
    # " german" (81862) is not the " German" (15913) every training row carries
    cfg = resolve("--mode", "infer", "--reasoning-language", "german", "--prompt", "hi")
    text = real_tokenizer.apply_chat_template(sft.build_chat("hi", cfg.reasoning_language), tokenize=False,
                                              add_generation_prompt=True)
    ids = real_tokenizer(text, add_special_tokens=False).input_ids
    assert 15913 in ids and 81862 not in ids


if __name__ == "__main__":
    sys.stdout.write(language_table())
