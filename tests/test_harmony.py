"""The real gpt-oss tokenizer: labelled tokens, and agreement with openai-harmony (OpenAI's own renderer/parser)."""

import pytest

import gpt_oss_20b_sft as sft

ROW = {"reasoning_language": "German", "developer": "You are a concise assistant.", "user": "What is 6 times 7?",
       "analysis": "Sechs mal sieben ist 42.", "final": "6 × 7 = 42."}


@pytest.fixture(scope="module")
def harmony():
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def harmony_training_tokens(harmony, row, date):
    from openai_harmony import (Conversation, DeveloperContent, Message, ReasoningEffort, RenderConversationConfig,
                                Role, SystemContent)

    system = SystemContent.new().with_conversation_start_date(date).with_reasoning_effort(ReasoningEffort.MEDIUM)
    developer = DeveloperContent.new().with_instructions(f"reasoning language: {row['reasoning_language']}\n\n"
                                                         f"{row['developer']}")
    conversation = Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, system),
        Message.from_role_and_content(Role.DEVELOPER, developer),
        Message.from_role_and_content(Role.USER, row["user"]),
        Message.from_role_and_content(Role.ASSISTANT, row["analysis"]).with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, row["final"]).with_channel("final"),
    ])
    return harmony.render_conversation_for_training(conversation, RenderConversationConfig(auto_drop_analysis=False))


def test_exact_labelled_tokens_of_a_row(real_tokenizer, pinned_date):
    example = sft.tokenize_chat(real_tokenizer, sft.row_to_messages(ROW))
    ids, labels = example["input_ids"], example["labels"]
    labelled = [i for i, label in enumerate(labels) if label != -100]
    assert labelled == list(range(92, 120)) and len(ids) == 120  # one contiguous span: the assistant's turn, to the end
    assert [labels[i] for i in labelled] == [
        200006, 173781, 200005, 35644, 200008,  # <|start|>assistant<|channel|>analysis<|message|>
        1584, 39549, 3849, 102540, 2496, 220, 4689, 13,  # Sechs mal sieben ist 42.
        200007, 200006, 173781, 200005, 17196, 200008,  # <|end|><|start|>assistant<|channel|>final<|message|>
        21, 33839, 220, 22, 314, 220, 4689, 13,  # 6 × 7 = 42.
        200002]  # <|return|>
    assert real_tokenizer.decode(ids[:92]).endswith("<|start|>user<|message|>What is 6 times 7?<|end|>")
    assert "Current date: 2025-06-28" in real_tokenizer.decode(ids[:92])  # the dated preamble gets no loss


def test_train_on_all_tokens_labels_everything(real_tokenizer, pinned_date):
    example = sft.tokenize_chat(real_tokenizer, sft.row_to_messages(ROW), train_on_all_tokens=True)
    assert example["labels"] == example["input_ids"]


def test_truncation_is_counted(real_tokenizer, pinned_date):
    chats = [sft.row_to_messages(ROW), sft.row_to_messages({**ROW, "analysis": "Ja. " * 200})]
    examples, stats = sft.tokenize_chats(real_tokenizer, chats, max_length=150)
    assert stats["rows_truncated"] == 1 and stats["rows_used"] == 2
    assert [len(e["input_ids"]) for e in examples] == [120, 150]
    _, stats = sft.tokenize_chats(real_tokenizer, chats, max_length=60)  # both lose every assistant token
    assert stats["rows_used"] == 0 and stats["rows_dropped_no_labels_left"] == 2


def only_difference(theirs, ours):
    """The single non-equal stretch between two token lists, as (their tokens, our tokens, our end index)."""
    from difflib import SequenceMatcher

    ops = [op for op in SequenceMatcher(a=theirs, b=ours, autojunk=False).get_opcodes() if op[0] != "equal"]
    assert len(ops) == 1, ops
    _, i1, i2, j1, j2 = ops[0]
    return theirs[i1:i2], ours[j1:j2], j2


@pytest.mark.parametrize("developer, their_tokens, our_tokens", [
    ("You are a concise assistant", [], [279]),  # one extra "\n\n" token
    ("You are a concise assistant.", [13], [364]),  # "." + "\n\n" merge into one token ".\n\n"
])
def test_training_render_matches_harmony_but_for_the_known_newlines(real_tokenizer, harmony, pinned_date, developer,
                                                                   their_tokens, our_tokens):
    row = {**ROW, "developer": developer}
    ours = sft.tokenize_chat(real_tokenizer, sft.row_to_messages(row))["input_ids"]
    theirs = harmony_training_tokens(harmony, row, pinned_date)
    # The hub template writes "\n\n" after the developer instructions, before <|end|>; harmony does not
    # (../shared/gpt-oss-20b/README.md). Everything else, system preamble to <|return|>, is identical.
    theirs_part, ours_part, end = only_difference(theirs, ours)
    assert (theirs_part, ours_part) == (their_tokens, our_tokens)
    assert real_tokenizer.decode(ours_part) == real_tokenizer.decode(theirs_part) + "\n\n"
    assert ours[end] == 200007 and real_tokenizer.decode(ours[:end]).endswith(developer + "\n\n")


def test_inference_prompt_matches_harmony_but_for_the_same_newlines(real_tokenizer, harmony, pinned_date):
    from openai_harmony import Conversation, DeveloperContent, Message, ReasoningEffort, Role, SystemContent

    chat = sft.build_chat("¿Cuál es la capital de Australia?", "German", "Spanish")
    assert chat[0]["content"] == "reasoning language: German\n\nAlways write the final answer in Spanish."
    ours = list(real_tokenizer.apply_chat_template(chat, add_generation_prompt=True, reasoning_effort="high",
                                                   return_dict=True)["input_ids"])
    system = SystemContent.new().with_conversation_start_date(pinned_date).with_reasoning_effort(ReasoningEffort.HIGH)
    theirs = harmony.render_conversation_for_completion(Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, system),
        Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(chat[0]["content"])),
        Message.from_role_and_content(Role.USER, chat[1]["content"])]), Role.ASSISTANT)
    theirs_part, ours_part, end = only_difference(theirs, ours)
    assert (theirs_part, ours_part, ours[end]) == ([13], [364], 200007)
    assert ours[-2:] == theirs[-2:] == [200006, 173781]  # both end on the generation prompt <|start|>assistant


@pytest.mark.parametrize("analysis, final, end", [
    ("Okay, der Benutzer fragt nach Canberra.", "Canberra.", "<|return|>"),
    ("Mehrere\nZeilen: 3 < 4 und 5 > 2.", "Sí: **Canberra**.", "<|return|>"),
    ("Nur Analyse, abgeschnitten", None, ""),
])
def test_channel_split_matches_harmony_parser(real_tokenizer, harmony, analysis, final, end):
    from openai_harmony import Role

    text = f"<|channel|>analysis<|message|>{analysis}"
    text += "<|end|>" if final is not None else ""
    if final is not None:
        text += f"<|start|>assistant<|channel|>final<|message|>{final}{end}"
    ids = real_tokenizer.encode(text, add_special_tokens=False)
    ours = sft.split_channels(ids, real_tokenizer)
    if final is None:  # harmony refuses an unfinished message; we return what was generated
        assert ours == {"analysis": analysis, "final": None, "complete": False}
        return
    theirs = harmony.parse_messages_from_completion_tokens(ids, Role.ASSISTANT)
    by_channel = {m.channel: "".join(c.text for c in m.content) for m in theirs}
    assert ours == {"analysis": by_channel["analysis"], "final": by_channel["final"], "complete": True}
    assert by_channel == {"analysis": analysis, "final": final}


def test_a_repeated_header_is_no_text_and_leaves_the_answer_incomplete(real_tokenizer):
    text = ("<|channel|>analysis<|message|>Denken.<|end|><|start|>assistant<|channel|>final<|message|>Canberra"
            "<|start|>assistant<|channel|>final<|message|>Canberra.<|return|>")
    ids = real_tokenizer.encode(text, add_special_tokens=False)
    assert sft.split_channels(ids, real_tokenizer) == {"analysis": "Denken.", "final": "Canberra\nCanberra.",
                                                       "complete": False}
    closed = real_tokenizer.encode("<|channel|>final<|message|>Ja.<|return|>", add_special_tokens=False)
    assert sft.split_channels(closed, real_tokenizer) == {"analysis": "", "final": "Ja.", "complete": True}


CONTROL_ROW = {"reasoning_language": "German", "developer": "Never print <|return|> yourself",
               "user": "What does <|end|> mean, and <|channel|>?",
               "analysis": "Das Token <|end|> schließt eine Nachricht; <|channel|>final<|message|> ist ein Kopf.",
               "final": "It closes a message, as <|return|> closes the answer."}


def test_control_token_strings_in_text_are_text_as_in_harmony(real_tokenizer, harmony, pinned_date):
    example = sft.tokenize_chat(real_tokenizer, sft.row_to_messages(CONTROL_ROW))
    ours, theirs = example["input_ids"], harmony_training_tokens(harmony, CONTROL_ROW, pinned_date)
    theirs_part, ours_part, _ = only_difference(theirs, ours)
    assert (theirs_part, ours_part) == ([], [279])  # the known "\n\n" after the developer text, nothing else
    # the template's own control tokens only: system, developer, user and analysis end in <|end|>, the final answer
    # in <|return|>
    assert ours.count(200007) == 4 and ours.count(200002) == 1 and ours[-1] == 200002
    labelled = [t for t in example["labels"] if t != -100]
    assert real_tokenizer.decode(labelled).endswith("<|message|>It closes a message, as <|return|> closes the answer."
                                                    "<|return|>")
    assert labelled.count(200002) == 1  # the quoted <|return|> is text: the answer is not taught to stop there


def test_the_question_about_a_token_is_the_harmony_tokens(real_tokenizer, harmony, pinned_date):
    from openai_harmony import Conversation, Message, Role

    chat = sft.build_chat("What does <|end|> mean", "German")
    ours = sft.encode_chat(real_tokenizer, chat, add_generation_prompt=True, reasoning_effort="medium")["input_ids"]
    user = harmony.render_conversation(Conversation.from_messages([
        Message.from_role_and_content(Role.USER, "What does <|end|> mean")]))
    assert user[3:] == [4827, 2226, 464, 91, 419, 91, 29, 4774, 200007]  # " <|end|>" as text: " <|", "end", "|>"...
    assert ours[-len(user) - 2:-2] == user and 200007 not in ours[-len(user) - 2:-3]


def test_training_renders_the_reasoning_effort_asked_for(real_tokenizer, pinned_date):
    medium = sft.tokenize_chat(real_tokenizer, sft.row_to_messages(ROW))["input_ids"]
    high = sft.tokenize_chat(real_tokenizer, sft.row_to_messages(ROW), reasoning_effort="high")["input_ids"]
    assert "Reasoning: medium" in real_tokenizer.decode(medium) and "Reasoning: high" in real_tokenizer.decode(high)
    assert len(high) == len(medium) and sum(a != b for a, b in zip(high, medium)) == 1  # one word of the preamble


def test_empty_developer_text_renders_as_in_the_flat_columns(real_tokenizer, pinned_date):
    flat = {**ROW, "developer": ""}
    hub = {"messages": [{"role": "system", "content": "reasoning language: German\n\n"},
                        {"role": "user", "content": ROW["user"]},
                        {"role": "assistant", "content": ROW["final"], "thinking": ROW["analysis"]}]}
    ours = sft.tokenize_chat(real_tokenizer, sft.row_to_messages(hub))
    assert ours == sft.tokenize_chat(real_tokenizer, sft.row_to_messages(flat))
    assert "reasoning language: German\n\n<|end|>" in real_tokenizer.decode(ours["input_ids"])


def test_train_mode_renders_its_reasoning_effort(real_tokenizer, pinned_date):
    from conftest import resolve

    dataset, _, _ = sft.training_dataset(resolve("--reasoning_effort", "low"), real_tokenizer, [sft.row_to_messages(ROW)])
    assert "Reasoning: low" in real_tokenizer.decode(dataset[0]["input_ids"])
