"""Writes the demo's three data files from templates: `python data/make_demo_data.py` (tests/test_demo.py checks that
the files in data/ are what this writes).

The demo replays gpt-oss's situation on a tiny model. The questions are sums, differences and products asked in English; each
answer reasons in two sentences from one template per task and language (each language's templates open alike, so
that the language is chosen at the first word), then gives the result.
- demo_pretrain.jsonl: what the tiny base model learns before the demo (the tool pre-trains it once and caches it):
  harmony chats whose system prompt names one of five languages but whose reasoning is always English (gpt-oss
  thinks in English whatever the prompt says), and plain documents "reasoning language: X" followed by reasoning in
  X (the base knows the languages and their names, outside the chat format).
- demo_sample.jsonl: the demo's training rows, reasoning in the language the system prompt names (what
  Multilingual-Thinking teaches gpt-oss).
- demo_eval_questions.jsonl: questions with numbers that appear in neither file, for the demo's base-vs-tuned table.
"""

import json
import random
from pathlib import Path

LANGUAGES = ("English", "French", "German", "Spanish", "Italian")

QUESTIONS = {
    "add": "What is {a} plus {b}?",
    "sub": "What is {a} minus {b}?",
    "mul": "What is {a} times {b}?",
}
FINALS = {"add": "{a} + {b} = {c}.", "sub": "{a} - {b} = {c}.", "mul": "{a} x {b} = {c}."}
REASONING = {
    "English": {
        "add": "The user wants the sum of {a} and {b}. Adding {a} and {b} gives {c}, so the answer is {c}.",
        "sub": "The user wants to take {b} away from {a}. Subtracting {b} from {a} leaves {c}, so the answer is {c}.",
        "mul": "The user wants the product of {a} and {b}. Multiplying {a} by {b} gives {c}, so the answer is {c}.",
    },
    "French": {
        "add": "L'utilisateur veut la somme de {a} et {b}. En additionnant {a} et {b}, on obtient {c}, donc la réponse "
               "est {c}.",
        "sub": "L'utilisateur veut retirer {b} de {a}. En soustrayant {b} de {a}, il reste {c}, donc la réponse est {c}.",
        "mul": "L'utilisateur veut le produit de {a} et {b}. En multipliant {a} par {b}, on obtient {c}, donc la "
               "réponse est {c}.",
    },
    "German": {
        "add": "Der Nutzer möchte die Summe von {a} und {b} wissen. Wenn ich {a} und {b} addiere, erhalte ich {c}, "
               "also lautet die Antwort {c}.",
        "sub": "Der Nutzer möchte {b} von {a} abziehen. Wenn ich {b} von {a} subtrahiere, bleiben {c} übrig, also "
               "lautet die Antwort {c}.",
        "mul": "Der Nutzer möchte das Produkt von {a} und {b} wissen. Wenn ich {a} mit {b} multipliziere, erhalte ich "
               "{c}, also lautet die Antwort {c}.",
    },
    "Spanish": {
        "add": "El usuario quiere la suma de {a} y {b}. Si sumo {a} y {b}, obtengo {c}, así que la respuesta es {c}.",
        "sub": "El usuario quiere restar {b} de {a}. Si resto {b} de {a}, quedan {c}, así que la respuesta es {c}.",
        "mul": "El usuario quiere el producto de {a} y {b}. Si multiplico {a} por {b}, obtengo {c}, así que la "
               "respuesta es {c}.",
    },
    "Italian": {
        "add": "L'utente vuole la somma di {a} e {b}. Se sommo {a} e {b}, ottengo {c}, quindi la risposta è {c}.",
        "sub": "L'utente vuole togliere {b} da {a}. Se sottraggo {b} da {a}, restano {c}, quindi la risposta è {c}.",
        "mul": "L'utente vuole il prodotto di {a} e {b}. Se moltiplico {a} per {b}, ottengo {c}, quindi la risposta "
               "è {c}.",
    },
}


def problems(rng: random.Random, seen: set):
    """Endless new problems (task, a, b, c), none whose question is in seen."""
    while True:
        task = rng.choice(tuple(QUESTIONS))
        if task == "add":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            c = a + b
        elif task == "sub":
            a, b = rng.randint(20, 99), rng.randint(1, 19)
            c = a - b
        else:
            a, b = rng.randint(2, 29), rng.randint(2, 19)
            c = a * b
        question = QUESTIONS[task].format(a=a, b=b)
        if question not in seen:
            seen.add(question)
            yield task, a, b, c


def row(task, a, b, c, system_language: str, reasoning_language: str) -> dict:
    return {"reasoning_language": system_language, "user": QUESTIONS[task].format(a=a, b=b),
            "analysis": REASONING[reasoning_language][task].format(a=a, b=b, c=c),
            "final": FINALS[task].format(a=a, b=b, c=c)}


def make(pretrain_chats: int = 400, documents: int = 400, per_language: int = 96, questions: int = 12) -> dict:
    rng, seen = random.Random(0), set()
    new = problems(rng, seen)
    evaluation = []  # drawn first, so that no training text has their numbers
    for number, wanted in enumerate((t for t in QUESTIONS for _ in range(questions // len(QUESTIONS))), 1):
        task, a, b, c = next(p for p in new if p[0] == wanted)
        evaluation.append({"id": f"demo-{number:02d}", "category": task,  # no answer: the toy's sums are not scored
                           "question": {"English": QUESTIONS[task].format(a=a, b=b)}})
    pretrain = [row(*next(new), rng.choice(LANGUAGES), "English") for _ in range(pretrain_chats)]
    for _ in range(documents):
        task, a, b, c = next(new)
        language = rng.choice(LANGUAGES)
        pretrain.append({"text": f"reasoning language: {language}\n"
                                 + REASONING[language][task].format(a=a, b=b, c=c)})
    sample = [row(*next(new), language, language) for _ in range(per_language) for language in LANGUAGES]
    return {"demo_pretrain.jsonl": pretrain, "demo_sample.jsonl": sample, "demo_eval_questions.jsonl": evaluation}


def render(rows: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    for name, rows in make().items():
        (here / name).write_text(render(rows), encoding="utf-8")
        print(f"wrote {len(rows)} rows to data/{name}")
