"""Writes the demo's three data files from templates: `python data/make_demo_data.py` (tests/test_demo.py checks that
the files in data/ are what this writes).

The demo replays gpt-oss's situation on a tiny model: it thinks in English whatever the system prompt names, and the
LoRA run teaches it to think in the named language, for any question. So the questions come in twelve kinds
(FAMILIES: sums, capitals, "why" questions, poems, translations, advice, recipes...), each in several wordings and
asked in all five languages; the reasoning is two sentences in the row's reasoning language whatever the question's
language (each language's reasoning opens alike, "The user wants" / "Der Nutzer möchte"..., so that the language is
chosen at the first word whatever the kind), and the final answer is in the question's language.
- demo_pretrain.jsonl: what the tiny base model learns before the demo (the tool pre-trains it once and caches it):
  harmony chats whose system prompt names one of five languages but whose reasoning is always English (gpt-oss
  thinks in English whatever the prompt says), and plain documents "reasoning language: X", a question in any of
  the five languages, then reasoning in X (the base knows the languages and their names, outside the chat format).
- demo_sample.jsonl: the demo's training rows, reasoning in the language the system prompt names (what
  Multilingual-Thinking teaches gpt-oss).
- demo_eval_questions.jsonl: questions of kinds no training text has (HELD_OUT: jokes, letters, travel, opinions),
  each in the five languages, for the demo's base-vs-tuned table: the behaviour, not the templates, is measured.
"""

import json
import random
from pathlib import Path

LANGUAGES = ("English", "French", "German", "Spanish", "Italian")
EN, FR, DE, ES, IT = LANGUAGES


def each(*values) -> dict:
    """One value per language, in LANGUAGES' order."""
    return dict(zip(LANGUAGES, values))


# A slot's value is a string (the same in every language) or a dict of one string per language. Each family: its
# wordings per language ("ask"), the reasoning per language ("think"), the final answer per language ("final") and a
# function drawing its slots (given the random generator and the question's language).
def numbers(low_a, high_a, low_b, high_b, result):
    def draw(rng, _):
        a, b = rng.randint(low_a, high_a), rng.randint(low_b, high_b)
        return {"a": str(a), "b": str(b), "c": str(result(a, b))}
    return draw


def one_of(options):
    return lambda rng, _: dict(rng.choice(options))


COUNTRIES = [  # "of <country>" and the capital, per language
    {"of": each("of France", "de la France", "von Frankreich", "de Francia", "della Francia"), "city": "Paris"},
    {"of": each("of Japan", "du Japon", "von Japan", "de Japón", "del Giappone"),
     "city": each("Tokyo", "Tokyo", "Tokio", "Tokio", "Tokyo")},
    {"of": each("of Italy", "de l'Italie", "von Italien", "de Italia", "dell'Italia"),
     "city": each("Rome", "Rome", "Rom", "Roma", "Roma")},
    {"of": each("of Spain", "de l'Espagne", "von Spanien", "de España", "della Spagna"), "city": "Madrid"},
    {"of": each("of Germany", "de l'Allemagne", "von Deutschland", "de Alemania", "della Germania"),
     "city": each("Berlin", "Berlin", "Berlin", "Berlín", "Berlino")},
    {"of": each("of Egypt", "de l'Égypte", "von Ägypten", "de Egipto", "dell'Egitto"),
     "city": each("Cairo", "Le Caire", "Kairo", "El Cairo", "Il Cairo")},
    {"of": each("of Canada", "du Canada", "von Kanada", "de Canadá", "del Canada"), "city": "Ottawa"},
    {"of": each("of Kenya", "du Kenya", "von Kenia", "de Kenia", "del Kenya"), "city": "Nairobi"},
    {"of": each("of Norway", "de la Norvège", "von Norwegen", "de Noruega", "della Norvegia"), "city": "Oslo"},
    {"of": each("of Greece", "de la Grèce", "von Griechenland", "de Grecia", "della Grecia"),
     "city": each("Athens", "Athènes", "Athen", "Atenas", "Atene")},
]
PHENOMENA = [  # the question's clause, the same as a statement, and the reason
    {"q": each("is the sky blue", "le ciel est-il bleu", "ist der Himmel blau", "el cielo es azul", "il cielo è blu"),
     "s": each("the sky is blue", "le ciel est bleu", "der Himmel blau ist", "el cielo es azul", "il cielo è blu"),
     "r": each("air scatters blue light more than red light", "l'air diffuse davantage la lumière bleue que la rouge",
               "die Luft blaues Licht stärker streut als rotes", "el aire dispersa más la luz azul que la roja",
               "l'aria diffonde la luce blu più di quella rossa")},
    {"q": each("is the sea salty", "la mer est-elle salée", "ist das Meer salzig", "el mar es salado",
               "il mare è salato"),
     "s": each("the sea is salty", "la mer est salée", "das Meer salzig ist", "el mar es salado", "il mare è salato"),
     "r": each("rivers carry salts from the rocks into the sea", "les rivières apportent à la mer les sels des roches",
               "Flüsse die Salze aus den Felsen ins Meer tragen", "los ríos llevan al mar las sales de las rocas",
               "i fiumi portano al mare i sali delle rocce")},
    {"q": each("do leaves fall in autumn", "les feuilles tombent-elles en automne", "fallen die Blätter im Herbst",
               "las hojas caen en otoño", "le foglie cadono in autunno"),
     "s": each("leaves fall in autumn", "les feuilles tombent en automne", "die Blätter im Herbst fallen",
               "las hojas caen en otoño", "le foglie cadono in autunno"),
     "r": each("trees save water and energy for the winter", "les arbres gardent l'eau et l'énergie pour l'hiver",
               "die Bäume Wasser und Kraft für den Winter sparen", "los árboles guardan agua y energía para el invierno",
               "gli alberi conservano acqua ed energia per l'inverno")},
    {"q": each("does ice float on water", "la glace flotte-t-elle sur l'eau", "schwimmt Eis auf dem Wasser",
               "el hielo flota en el agua", "il ghiaccio galleggia sull'acqua"),
     "s": each("ice floats on water", "la glace flotte sur l'eau", "Eis auf dem Wasser schwimmt",
               "el hielo flota en el agua", "il ghiaccio galleggia sull'acqua"),
     "r": each("ice is less dense than liquid water", "la glace est moins dense que l'eau liquide",
               "Eis weniger dicht ist als flüssiges Wasser", "el hielo es menos denso que el agua líquida",
               "il ghiaccio è meno denso dell'acqua liquida")},
    {"q": each("do we have seasons", "avons-nous des saisons", "gibt es Jahreszeiten", "tenemos estaciones",
               "abbiamo le stagioni"),
     "s": each("we have seasons", "nous avons des saisons", "es Jahreszeiten gibt", "tenemos estaciones",
               "abbiamo le stagioni"),
     "r": each("the axis of the Earth is tilted", "l'axe de la Terre est incliné", "die Achse der Erde geneigt ist",
               "el eje de la Tierra está inclinado", "l'asse della Terra è inclinato")},
]
POEM_TOPICS = [  # "about <topic>" and the topic's noun, per language
    {"about": each("about the sea", "sur la mer", "über das Meer", "sobre el mar", "sul mare"),
     "noun": each("sea", "mer", "Meer", "mar", "mare")},
    {"about": each("about the moon", "sur la lune", "über den Mond", "sobre la luna", "sulla luna"),
     "noun": each("moon", "lune", "Mond", "luna", "luna")},
    {"about": each("about autumn", "sur l'automne", "über den Herbst", "sobre el otoño", "sull'autunno"),
     "noun": each("autumn", "automne", "Herbst", "otoño", "autunno")},
    {"about": each("about a cat", "sur un chat", "über eine Katze", "sobre un gato", "su un gatto"),
     "noun": each("cat", "chat", "Katze", "gato", "gatto")},
    {"about": each("about the rain", "sur la pluie", "über den Regen", "sobre la lluvia", "sulla pioggia"),
     "noun": each("rain", "pluie", "Regen", "lluvia", "pioggia")},
]
WORDS = [each("house", "maison", "Haus", "casa", "casa"), each("water", "eau", "Wasser", "agua", "acqua"),
         each("friend", "ami", "Freund", "amigo", "amico"), each("book", "livre", "Buch", "libro", "libro"),
         each("bread", "pain", "Brot", "pan", "pane"), each("tree", "arbre", "Baum", "árbol", "albero")]
LANGUAGE_NAMES = {  # each language's name in each language
    EN: each("English", "anglais", "Englisch", "inglés", "inglese"),
    FR: each("French", "français", "Französisch", "francés", "francese"),
    DE: each("German", "allemand", "Deutsch", "alemán", "tedesco"),
    ES: each("Spanish", "espagnol", "Spanisch", "español", "spagnolo"),
    IT: each("Italian", "italien", "Italienisch", "italiano", "italiano"),
}
SPELLED = ["banana", "Schmetterling", "mariposa", "fenêtre", "giardino", "elephant", "Kartoffel", "montagne", "ventana",
           "pomodoro", "river", "Fahrrad", "étoile", "biblioteca", "finestra", "window"]
GOALS = [  # the goal, then the tip (German: the goal and the tip with "zu")
    {"goal": each("sleep better", "mieux dormir", "besser schlafen", "dormir mejor", "dormire meglio"),
     "goal_zu": "besser zu schlafen",
     "tip": each("go to bed at the same time every night and avoid screens late",
                 "aller au lit à la même heure chaque soir et éviter les écrans le soir",
                 "jeden Abend zur gleichen Zeit ins Bett zu gehen und spät keine Bildschirme zu nutzen",
                 "acostarse a la misma hora cada noche y evitar las pantallas tarde",
                 "andare a letto alla stessa ora ogni sera ed evitare gli schermi la sera")},
    {"goal": each("learn a new language", "apprendre une nouvelle langue", "eine neue Sprache lernen",
                  "aprender un idioma nuevo", "imparare una nuova lingua"),
     "goal_zu": "eine neue Sprache zu lernen",
     "tip": each("practise a little every day and speak with native speakers",
                 "pratiquer un peu chaque jour et parler avec des locuteurs natifs",
                 "jeden Tag ein wenig zu üben und mit Muttersprachlern zu sprechen",
                 "practicar un poco cada día y hablar con hablantes nativos",
                 "esercitarsi un po' ogni giorno e parlare con dei madrelingua")},
    {"goal": each("save money", "économiser de l'argent", "Geld sparen", "ahorrar dinero", "risparmiare denaro"),
     "goal_zu": "Geld zu sparen",
     "tip": each("write down every expense and put part of each salary aside",
                 "noter chaque dépense et mettre de côté une part de chaque salaire",
                 "jede Ausgabe aufzuschreiben und von jedem Gehalt etwas zurückzulegen",
                 "anotar cada gasto y guardar una parte de cada sueldo",
                 "annotare ogni spesa e mettere da parte una quota di ogni stipendio")},
    {"goal": each("stay healthy", "rester en bonne santé", "gesund bleiben", "mantenerse sano", "restare in salute"),
     "goal_zu": "gesund zu bleiben",
     "tip": each("eat vegetables, walk every day and drink enough water",
                 "manger des légumes, marcher chaque jour et boire assez d'eau",
                 "Gemüse zu essen, jeden Tag spazieren zu gehen und genug Wasser zu trinken",
                 "comer verduras, caminar cada día y beber suficiente agua",
                 "mangiare verdure, camminare ogni giorno e bere abbastanza acqua")},
]
SIZES = [  # the bigger one first
    (each("an elephant", "un éléphant", "ein Elefant", "un elefante", "un elefante"),
     each("a mouse", "une souris", "eine Maus", "un ratón", "un topo")),
    (each("a whale", "une baleine", "ein Wal", "una ballena", "una balena"),
     each("a dolphin", "un dauphin", "ein Delfin", "un delfín", "un delfino")),
    (each("a bus", "un bus", "ein Bus", "un autobús", "un autobus"),
     each("a bicycle", "un vélo", "ein Fahrrad", "una bicicleta", "una bicicletta")),
    (each("a horse", "un cheval", "ein Pferd", "un caballo", "un cavallo"),
     each("a dog", "un chien", "ein Hund", "un perro", "un cane")),
    (each("a tree", "un arbre", "ein Baum", "un árbol", "un albero"),
     each("a flower", "une fleur", "eine Blume", "una flor", "un fiore")),
]
DISHES = [  # the dish, then the steps (German: also with "zu")
    {"dish": each("rice", "du riz", "Reis", "arroz", "il riso"),
     "steps": each("rinse the rice, boil it in twice its volume of water and let it rest",
                   "rincer le riz, le cuire dans deux fois son volume d'eau et le laisser reposer",
                   "den Reis waschen, in der doppelten Menge Wasser kochen und ruhen lassen",
                   "lavar el arroz, cocerlo en el doble de agua y dejarlo reposar",
                   "sciacquare il riso, cuocerlo nel doppio di acqua e lasciarlo riposare"),
     "steps_zu": "den Reis zu waschen, in der doppelten Menge Wasser zu kochen und ruhen zu lassen"},
    {"dish": each("pasta", "des pâtes", "Nudeln", "pasta", "la pasta"),
     "steps": each("boil salted water, cook the pasta for ten minutes and drain it",
                   "faire bouillir de l'eau salée, cuire les pâtes dix minutes et les égoutter",
                   "Salzwasser aufkochen, die Nudeln zehn Minuten kochen und abgießen",
                   "hervir agua con sal, cocer la pasta diez minutos y escurrirla",
                   "far bollire l'acqua salata, cuocere la pasta dieci minuti e scolarla"),
     "steps_zu": "Salzwasser aufzukochen, die Nudeln zehn Minuten zu kochen und abzugießen"},
    {"dish": each("an omelette", "une omelette", "ein Omelett", "una tortilla", "una frittata"),
     "steps": each("beat three eggs, pour them into a hot pan and fold the omelette",
                   "battre trois œufs, les verser dans une poêle chaude et plier l'omelette",
                   "drei Eier verquirlen, in eine heiße Pfanne gießen und das Omelett falten",
                   "batir tres huevos, verterlos en una sartén caliente y doblar la tortilla",
                   "sbattere tre uova, versarle in una padella calda e girare la frittata"),
     "steps_zu": "drei Eier zu verquirlen, in eine heiße Pfanne zu gießen und das Omelett zu falten"},
    {"dish": each("tomato soup", "une soupe de tomates", "Tomatensuppe", "sopa de tomate", "la zuppa di pomodoro"),
     "steps": each("cook tomatoes and an onion in broth, then blend everything",
                   "cuire des tomates et un oignon dans du bouillon, puis tout mixer",
                   "Tomaten und eine Zwiebel in Brühe kochen und dann alles pürieren",
                   "cocer tomates y una cebolla en caldo y luego triturarlo todo",
                   "cuocere pomodori e una cipolla nel brodo, poi frullare tutto"),
     "steps_zu": "Tomaten und eine Zwiebel in Brühe zu kochen und dann alles zu pürieren"},
]
PEOPLE = [
    {"name": "Marie Curie",
     "role": each("a physicist and chemist", "une physicienne et chimiste", "eine Physikerin und Chemikerin",
                  "una física y química", "una fisica e chimica"),
     "known": each("her work on radioactivity", "ses travaux sur la radioactivité", "ihre Arbeit zur Radioaktivität",
                   "su trabajo sobre la radiactividad", "il suo lavoro sulla radioattività")},
    {"name": "Mozart",
     "role": each("a composer", "un compositeur", "ein Komponist", "un compositor", "un compositore"),
     "known": each("his symphonies and operas", "ses symphonies et ses opéras", "seine Sinfonien und Opern",
                   "sus sinfonías y óperas", "le sue sinfonie e opere")},
    {"name": "Leonardo da Vinci",
     "role": each("a painter and inventor", "un peintre et inventeur", "ein Maler und Erfinder",
                  "un pintor e inventor", "un pittore e inventore"),
     "known": each("the Mona Lisa", "la Joconde", "die Mona Lisa", "la Mona Lisa", "la Gioconda")},
    {"name": each("Cleopatra", "Cléopâtre", "Kleopatra", "Cleopatra", "Cleopatra"),
     "role": each("a queen of Egypt", "une reine d'Égypte", "eine Königin von Ägypten", "una reina de Egipto",
                  "una regina d'Egitto"),
     "known": each("her alliance with Rome", "son alliance avec Rome", "ihr Bündnis mit Rom",
                   "su alianza con Roma", "la sua alleanza con Roma")},
    {"name": "Galileo Galilei",
     "role": each("an astronomer", "un astronome", "ein Astronom", "un astrónomo", "un astronomo"),
     "known": each("his observations of the moons of Jupiter", "ses observations des lunes de Jupiter",
                   "seine Beobachtungen der Jupitermonde", "sus observaciones de las lunas de Júpiter",
                   "le sue osservazioni delle lune di Giove")},
]


def translation(rng, question_language):
    """A word in the question's language and its translation into another of the five."""
    word = rng.choice(WORDS)
    target = rng.choice([language for language in LANGUAGES if language != question_language])
    return {"word": word[question_language], "answer": word[target], "target": LANGUAGE_NAMES[target]}


def spelling(rng, _):
    word = rng.choice(SPELLED)
    return {"w": word, "n": str(len(word))}


def sizes(rng, _):
    big, small = rng.choice(SIZES)
    x, y = (big, small) if rng.random() < 0.5 else (small, big)
    return {"x": x, "y": y, "big": big, "small": small}


def hours(rng, _):
    n = rng.randint(2, 12)
    return {"n": str(n), "m": str(60 * n)}


FAMILIES = {
    "add": {
        "slots": numbers(10, 99, 10, 99, lambda a, b: a + b),
        "ask": each(["What is {a} plus {b}?", "Add {a} and {b}.", "How much is {a} + {b}?"],
                    ["Combien font {a} plus {b} ?", "Additionne {a} et {b}.", "Quelle est la somme de {a} et {b} ?"],
                    ["Was ist {a} plus {b}?", "Addiere {a} und {b}.", "Wie viel ergibt {a} + {b}?"],
                    ["¿Cuánto es {a} más {b}?", "Suma {a} y {b}.", "¿Cuál es la suma de {a} y {b}?"],
                    ["Quanto fa {a} più {b}?", "Somma {a} e {b}.", "Qual è la somma di {a} e {b}?"]),
        "think": each(
            "The user wants the sum of {a} and {b}. Adding {a} and {b} gives {c}, so the answer is {c}.",
            "L'utilisateur veut la somme de {a} et {b}. En additionnant {a} et {b}, on obtient {c}, donc la réponse est "
            "{c}.",
            "Der Nutzer möchte die Summe von {a} und {b} wissen. Wenn ich {a} und {b} addiere, erhalte ich {c}, also "
            "lautet die Antwort {c}.",
            "El usuario quiere la suma de {a} y {b}. Si sumo {a} y {b}, obtengo {c}, así que la respuesta es {c}.",
            "L'utente vuole la somma di {a} e {b}. Se sommo {a} e {b}, ottengo {c}, quindi la risposta è {c}."),
        "final": each(*["{a} + {b} = {c}."] * 5),
    },
    "mul": {
        "slots": numbers(2, 29, 2, 19, lambda a, b: a * b),
        "ask": each(["What is {a} times {b}?", "Multiply {a} by {b}.", "What do you get when you multiply {a} and {b}?"],
                    ["Combien font {a} fois {b} ?", "Multiplie {a} par {b}.", "Quel est le produit de {a} et {b} ?"],
                    ["Was ist {a} mal {b}?", "Multipliziere {a} mit {b}.", "Wie groß ist das Produkt von {a} und {b}?"],
                    ["¿Cuánto es {a} por {b}?", "Multiplica {a} por {b}.", "¿Cuál es el producto de {a} y {b}?"],
                    ["Quanto fa {a} per {b}?", "Moltiplica {a} per {b}.", "Qual è il prodotto di {a} e {b}?"]),
        "think": each(
            "The user wants the product of {a} and {b}. Multiplying {a} by {b} gives {c}, so the answer is {c}.",
            "L'utilisateur veut le produit de {a} et {b}. En multipliant {a} par {b}, on obtient {c}, donc la réponse "
            "est {c}.",
            "Der Nutzer möchte das Produkt von {a} und {b} wissen. Wenn ich {a} mit {b} multipliziere, erhalte ich {c}, "
            "also lautet die Antwort {c}.",
            "El usuario quiere el producto de {a} y {b}. Si multiplico {a} por {b}, obtengo {c}, así que la respuesta "
            "es {c}.",
            "L'utente vuole il prodotto di {a} e {b}. Se moltiplico {a} per {b}, ottengo {c}, quindi la risposta è {c}."),
        "final": each(*["{a} x {b} = {c}."] * 5),
    },
    "capital": {
        "slots": one_of(COUNTRIES),
        "ask": each(["What is the capital {of}?", "Which city is the capital {of}?", "Name the capital {of}."],
                    ["Quelle est la capitale {of} ?", "Quelle ville est la capitale {of} ?", "Donne-moi la capitale {of}."],
                    ["Was ist die Hauptstadt {of}?", "Welche Stadt ist die Hauptstadt {of}?", "Nenne die Hauptstadt {of}."],
                    ["¿Cuál es la capital {of}?", "¿Qué ciudad es la capital {of}?", "Dime la capital {of}."],
                    ["Qual è la capitale {of}?", "Quale città è la capitale {of}?", "Dimmi la capitale {of}."]),
        "think": each(
            "The user wants the capital {of}. I remember that the capital {of} is {city}, so the answer is {city}.",
            "L'utilisateur veut la capitale {of}. Je me souviens que la capitale {of} est {city}, donc la réponse est "
            "{city}.",
            "Der Nutzer möchte die Hauptstadt {of} wissen. Ich erinnere mich, dass die Hauptstadt {of} {city} ist, also "
            "lautet die Antwort {city}.",
            "El usuario quiere la capital {of}. Recuerdo que la capital {of} es {city}, así que la respuesta es {city}.",
            "L'utente vuole la capitale {of}. Ricordo che la capitale {of} è {city}, quindi la risposta è {city}."),
        "final": each("The capital {of} is {city}.", "La capitale {of} est {city}.", "Die Hauptstadt {of} ist {city}.",
                      "La capital {of} es {city}.", "La capitale {of} è {city}."),
    },
    "why": {
        "slots": one_of(PHENOMENA),
        "ask": each(["Why {q}?", "Quick question: why {q}?", "I wonder, why {q}?"],
                    ["Pourquoi {q} ?", "Petite question : pourquoi {q} ?", "Je me demande : pourquoi {q} ?"],
                    ["Warum {q}?", "Kurze Frage: Warum {q}?", "Ich frage mich: Warum {q}?"],
                    ["¿Por qué {q}?", "Una pregunta: ¿por qué {q}?", "Me pregunto: ¿por qué {q}?"],
                    ["Perché {q}?", "Una domanda: perché {q}?", "Mi chiedo: perché {q}?"]),
        "think": each(
            "The user wants to know why {s}. The main reason is that {r}, so I will explain that briefly.",
            "L'utilisateur veut savoir pourquoi {s}. La raison principale est que {r}, donc je vais l'expliquer "
            "brièvement.",
            "Der Nutzer möchte wissen, warum {s}. Der Hauptgrund ist, dass {r}, also erkläre ich das kurz.",
            "El usuario quiere saber por qué {s}. La razón principal es que {r}, así que lo voy a explicar brevemente.",
            "L'utente vuole sapere perché {s}. Il motivo principale è che {r}, quindi lo spiego in breve."),
        "final": each("Because {r}.", "Parce que {r}.", "Weil {r}.", "Porque {r}.", "Perché {r}."),
    },
    "poem": {
        "slots": one_of(POEM_TOPICS),
        "ask": each(["Write a short poem {about}.", "Can you write a poem {about}?", "I would like a little poem {about}."],
                    ["Écris un court poème {about}.", "Peux-tu écrire un poème {about} ?", "J'aimerais un petit poème "
                     "{about}."],
                    ["Schreib ein kurzes Gedicht {about}.", "Kannst du ein Gedicht {about} schreiben?", "Ich hätte gern "
                     "ein kleines Gedicht {about}."],
                    ["Escribe un poema corto {about}.", "¿Puedes escribir un poema {about}?", "Me gustaría un pequeño "
                     "poema {about}."],
                    ["Scrivi una breve poesia {about}.", "Puoi scrivere una poesia {about}?", "Vorrei una piccola poesia "
                     "{about}."]),
        "think": each(
            "The user wants a short poem {about}. Two gentle lines with a simple image and a soft rhyme are enough, so "
            "I will write them.",
            "L'utilisateur veut un court poème {about}. Deux vers doux avec une image simple et une rime légère "
            "suffisent, donc je vais les écrire.",
            "Der Nutzer möchte ein kurzes Gedicht {about}. Zwei ruhige Verse mit einem einfachen Bild und einem leisen "
            "Reim genügen, also schreibe ich sie.",
            "El usuario quiere un poema corto {about}. Bastan dos versos suaves con una imagen sencilla y una rima "
            "ligera, así que los escribo.",
            "L'utente vuole una breve poesia {about}. Bastano due versi dolci con un'immagine semplice e una rima "
            "leggera, quindi li scrivo."),
        "final": each("Oh {noun}, so calm and bright, / you stay with me through the night.",
                      "Ô {noun}, si calme et si claire, / tu veilles sur la terre.",
                      "Oh {noun}, so still und klar, / du bist mir immer nah.",
                      "Oh {noun}, en calma y en luz, / la noche se viste de azul.",
                      "O {noun}, calma e lieve, / la sera con te è breve."),
    },
    "translate": {
        "slots": translation,
        "ask": each(['How do you say "{word}" in {target}?', 'Translate "{word}" into {target}.',
                     'What is "{word}" in {target}?'],
                    ["Comment dit-on « {word} » en {target} ?", "Traduis « {word} » en {target}.",
                     "Quel est le mot {target} pour « {word} » ?"],
                    ["Wie sagt man „{word}“ auf {target}?", "Übersetze „{word}“ auf {target}.",
                     "Was heißt „{word}“ auf {target}?"],
                    ["¿Cómo se dice «{word}» en {target}?", "Traduce «{word}» al {target}.",
                     "¿Qué es «{word}» en {target}?"],
                    ["Come si dice «{word}» in {target}?", "Traduci «{word}» in {target}.",
                     "Qual è la parola {target} per «{word}»?"]),
        "think": each(
            'The user wants the word "{word}" in {target}. In {target} this word is "{answer}", so the answer is '
            '"{answer}".',
            "L'utilisateur veut le mot « {word} » en {target}. En {target}, ce mot se dit « {answer} », donc la réponse "
            "est « {answer} ».",
            "Der Nutzer möchte das Wort „{word}“ auf {target} wissen. Auf {target} heißt dieses Wort „{answer}“, also "
            "lautet die Antwort „{answer}“.",
            "El usuario quiere la palabra «{word}» en {target}. En {target} esta palabra se dice «{answer}», así que la "
            "respuesta es «{answer}».",
            "L'utente vuole la parola «{word}» in {target}. In {target} questa parola si dice «{answer}», quindi la "
            "risposta è «{answer}»."),
        "final": each('In {target}, "{word}" is "{answer}".', "En {target}, « {word} » se dit « {answer} ».",
                      "Auf {target} heißt „{word}“ „{answer}“.", "En {target}, «{word}» se dice «{answer}».",
                      "In {target}, «{word}» si dice «{answer}»."),
    },
    "letters": {
        "slots": spelling,
        "ask": each(['How many letters are in the word "{w}"?', 'Count the letters in "{w}".',
                     'How long is the word "{w}" in letters?'],
                    ["Combien de lettres y a-t-il dans le mot « {w} » ?", "Compte les lettres de « {w} ».",
                     "Le mot « {w} » a combien de lettres ?"],
                    ["Wie viele Buchstaben hat das Wort „{w}“?", "Zähle die Buchstaben in „{w}“.",
                     "Aus wie vielen Buchstaben besteht „{w}“?"],
                    ["¿Cuántas letras tiene la palabra «{w}»?", "Cuenta las letras de «{w}».",
                     "¿De cuántas letras es la palabra «{w}»?"],
                    ["Quante lettere ha la parola «{w}»?", "Conta le lettere di «{w}».",
                     "Di quante lettere è fatta la parola «{w}»?"]),
        "think": each(
            'The user wants the number of letters in "{w}". Counting them one by one gives {n}, so the answer is {n}.',
            "L'utilisateur veut le nombre de lettres de « {w} ». En les comptant une par une, j'obtiens {n}, donc la "
            "réponse est {n}.",
            "Der Nutzer möchte die Zahl der Buchstaben in „{w}“ wissen. Wenn ich sie einzeln zähle, erhalte ich {n}, "
            "also lautet die Antwort {n}.",
            "El usuario quiere el número de letras de «{w}». Si las cuento una a una, obtengo {n}, así que la respuesta "
            "es {n}.",
            "L'utente vuole il numero di lettere di «{w}». Se le conto una per una, ottengo {n}, quindi la risposta è "
            "{n}."),
        "final": each('"{w}" has {n} letters.', "« {w} » a {n} lettres.", "„{w}“ hat {n} Buchstaben.",
                      "«{w}» tiene {n} letras.", "«{w}» ha {n} lettere."),
    },
    "hours": {
        "slots": hours,
        "ask": each(["How many minutes are in {n} hours?", "Convert {n} hours into minutes.",
                     "{n} hours is how many minutes?"],
                    ["Combien de minutes y a-t-il dans {n} heures ?", "Convertis {n} heures en minutes.",
                     "{n} heures, cela fait combien de minutes ?"],
                    ["Wie viele Minuten haben {n} Stunden?", "Rechne {n} Stunden in Minuten um.",
                     "Wie viele Minuten sind {n} Stunden?"],
                    ["¿Cuántos minutos hay en {n} horas?", "Convierte {n} horas en minutos.",
                     "¿{n} horas son cuántos minutos?"],
                    ["Quanti minuti ci sono in {n} ore?", "Converti {n} ore in minuti.", "{n} ore sono quanti minuti?"]),
        "think": each(
            "The user wants {n} hours in minutes. One hour has 60 minutes, and {n} times 60 is {m}, so the answer is "
            "{m}.",
            "L'utilisateur veut {n} heures en minutes. Une heure compte 60 minutes, et {n} fois 60 font {m}, donc la "
            "réponse est {m}.",
            "Der Nutzer möchte {n} Stunden in Minuten wissen. Eine Stunde hat 60 Minuten, und {n} mal 60 ergibt {m}, "
            "also lautet die Antwort {m}.",
            "El usuario quiere {n} horas en minutos. Una hora tiene 60 minutos, y {n} por 60 son {m}, así que la "
            "respuesta es {m}.",
            "L'utente vuole {n} ore in minuti. Un'ora ha 60 minuti, e {n} per 60 fa {m}, quindi la risposta è {m}."),
        "final": each("{n} hours are {m} minutes.", "{n} heures font {m} minutes.", "{n} Stunden sind {m} Minuten.",
                      "{n} horas son {m} minutos.", "{n} ore sono {m} minuti."),
    },
    "advice": {
        "slots": one_of(GOALS),
        "ask": each(["How can I {goal}?", "What should I do to {goal}?", "Give me some tips to {goal}."],
                    ["Comment puis-je {goal} ?", "Que dois-je faire pour {goal} ?", "Donne-moi des conseils pour {goal}."],
                    ["Wie kann ich {goal}?", "Was soll ich tun, um {goal_zu}?", "Gib mir ein paar Tipps, um {goal_zu}."],
                    ["¿Cómo puedo {goal}?", "¿Qué debo hacer para {goal}?", "Dame algunos consejos para {goal}."],
                    ["Come posso {goal}?", "Cosa devo fare per {goal}?", "Dammi qualche consiglio per {goal}."]),
        "think": each(
            "The user wants advice on how to {goal}. The most useful tip is to {tip}, so I will suggest that.",
            "L'utilisateur veut des conseils pour {goal}. Le conseil le plus utile est de {tip}, donc je vais le "
            "proposer.",
            "Der Nutzer möchte Tipps, um {goal_zu}. Der nützlichste Tipp ist, {tip}, also schlage ich das vor.",
            "El usuario quiere consejos para {goal}. El consejo más útil es {tip}, así que lo voy a sugerir.",
            "L'utente vuole consigli per {goal}. Il consiglio più utile è {tip}, quindi lo suggerisco."),
        "final": each("Try to {tip}.", "Essaie de {tip}.", "Versuche, {tip}.", "Intenta {tip}.", "Prova a {tip}."),
    },
    "compare": {
        "slots": sizes,
        "ask": each(["Which is bigger, {x} or {y}?", "Between {x} and {y}, which one is larger?",
                     "Compare the size of {x} and {y}."],
                    ["Qui est le plus grand, {x} ou {y} ?", "Entre {x} et {y}, lequel est le plus grand ?",
                     "Qui est plus grand : {x} ou {y} ?"],
                    ["Was ist größer, {x} oder {y}?", "Wer ist größer: {x} oder {y}?",
                     "Vergleiche die Größe: {x} oder {y}?"],
                    ["¿Qué es más grande, {x} o {y}?", "Entre {x} y {y}, ¿cuál es más grande?",
                     "Compara el tamaño: {x} o {y}."],
                    ["Che cosa è più grande, {x} o {y}?", "Tra {x} e {y}, quale è più grande?",
                     "Confronta la grandezza: {x} o {y}."]),
        "think": each(
            "The user wants to compare {x} and {y}. Of the two, {big} is much bigger than {small}, so the answer is "
            "{big}.",
            "L'utilisateur veut comparer {x} et {y}. Des deux, {big} est bien plus grand que {small}, donc la réponse "
            "est {big}.",
            "Der Nutzer möchte wissen, was größer ist: {x} oder {y}. Von beiden ist {big} viel größer als {small}, also "
            "lautet die Antwort {big}.",
            "El usuario quiere comparar {x} y {y}. De los dos, {big} es mucho más grande que {small}, así que la "
            "respuesta es {big}.",
            "L'utente vuole confrontare {x} e {y}. Dei due, {big} è molto più grande di {small}, quindi la risposta è "
            "{big}."),
        "final": each("The bigger one is {big}.", "Le plus grand est {big}.", "Größer ist {big}.",
                      "El más grande es {big}.", "Il più grande è {big}."),
    },
    "recipe": {
        "slots": one_of(DISHES),
        "ask": each(["How do I cook {dish}?", "Give me a recipe for {dish}.", "What is the easiest way to make {dish}?"],
                    ["Comment cuisiner {dish} ?", "Donne-moi une recette pour {dish}.",
                     "Quelle est la façon la plus simple de préparer {dish} ?"],
                    ["Wie koche ich {dish}?", "Gib mir ein Rezept für {dish}.", "Wie mache ich am einfachsten {dish}?"],
                    ["¿Cómo cocino {dish}?", "Dame una receta de {dish}.",
                     "¿Cuál es la forma más fácil de preparar {dish}?"],
                    ["Come cucino {dish}?", "Dammi una ricetta per {dish}.",
                     "Qual è il modo più semplice di preparare {dish}?"]),
        "think": each(
            "The user wants to know how to make {dish}. The simple way is to {steps}, so I will list those steps.",
            "L'utilisateur veut savoir comment préparer {dish}. La méthode simple consiste à {steps}, donc je vais "
            "donner ces étapes.",
            "Der Nutzer möchte wissen, wie man {dish} zubereitet. Am einfachsten ist es, {steps_zu}, also nenne ich "
            "diese Schritte.",
            "El usuario quiere saber cómo preparar {dish}. La forma sencilla es {steps}, así que voy a dar esos pasos.",
            "L'utente vuole sapere come preparare {dish}. Il modo semplice è {steps}, quindi elenco questi passaggi."),
        "final": each("Simply {steps}.", "Il suffit de {steps}.", "Am einfachsten: {steps}.", "Basta con {steps}.",
                      "Basta {steps}."),
    },
    "person": {
        "slots": one_of(PEOPLE),
        "ask": each(["Who was {name}?", "Tell me about {name}.", "What is {name} known for?"],
                    ["Qui était {name} ?", "Parle-moi de {name}.", "Que sais-tu de {name} ?"],
                    ["Wer war {name}?", "Erzähl mir von {name}.", "Wofür ist {name} bekannt?"],
                    ["¿Quién fue {name}?", "Háblame de {name}.", "¿Qué sabes de {name}?"],
                    ["Chi era {name}?", "Parlami di {name}.", "Cosa sai di {name}?"]),
        "think": each(
            "The user wants to know who {name} was. {name} was {role}, known above all for {known}, so I will say that.",
            "L'utilisateur veut savoir qui était {name}. {name} était {role}, connu surtout pour {known}, donc je vais "
            "le dire.",
            "Der Nutzer möchte wissen, wer {name} war. {name} war {role}, vor allem bekannt für {known}, also sage ich "
            "das.",
            "El usuario quiere saber quién fue {name}. {name} fue {role}, conocido sobre todo por {known}, así que lo "
            "voy a decir.",
            "L'utente vuole sapere chi era {name}. {name} era {role}, noto soprattutto per {known}, quindi lo dico."),
        "final": each("{name} was {role}, known for {known}.", "{name} était {role}, connu pour {known}.",
                      "{name} war {role}, bekannt für {known}.", "{name} fue {role}, conocido por {known}.",
                      "{name} era {role}, noto per {known}."),
    },
}

# The eval's kinds, in no training text: each question written in the five languages.
HELD_OUT = {
    "joke": [
        each("Tell me a joke about dogs.", "Raconte-moi une blague sur les chiens.", "Erzähl mir einen Witz über Hunde.",
             "Cuéntame un chiste sobre perros.", "Raccontami una barzelletta sui cani."),
        each("Do you know a funny joke about computers?", "Tu connais une blague drôle sur les ordinateurs ?",
             "Kennst du einen lustigen Witz über Computer?", "¿Sabes un chiste gracioso sobre ordenadores?",
             "Conosci una barzelletta divertente sui computer?"),
        each("Make me laugh with a joke about teachers.", "Fais-moi rire avec une blague sur les professeurs.",
             "Bring mich mit einem Witz über Lehrer zum Lachen.", "Hazme reír con un chiste sobre profesores.",
             "Fammi ridere con una barzelletta sugli insegnanti."),
        each("Tell me something funny about the weather.", "Dis-moi quelque chose de drôle sur la météo.",
             "Sag mir etwas Lustiges über das Wetter.", "Dime algo divertido sobre el tiempo.",
             "Dimmi qualcosa di divertente sul tempo."),
        each("I need a short joke about cheese.", "J'ai besoin d'une petite blague sur le fromage.",
             "Ich brauche einen kurzen Witz über Käse.", "Necesito un chiste corto sobre el queso.",
             "Mi serve una barzelletta breve sul formaggio."),
    ],
    "letter": [
        each("Write an email to my boss asking for a day off next Friday.",
             "Écris un e-mail à mon patron pour demander un jour de congé vendredi prochain.",
             "Schreib eine E-Mail an meinen Chef und bitte um einen freien Tag am nächsten Freitag.",
             "Escribe un correo a mi jefe para pedir un día libre el próximo viernes.",
             "Scrivi un'email al mio capo per chiedere un giorno libero venerdì prossimo."),
        each("Draft a message inviting my neighbours to a barbecue on Sunday.",
             "Rédige un message pour inviter mes voisins à un barbecue dimanche.",
             "Entwirf eine Nachricht, die meine Nachbarn am Sonntag zum Grillen einlädt.",
             "Redacta un mensaje para invitar a mis vecinos a una barbacoa el domingo.",
             "Prepara un messaggio per invitare i miei vicini a una grigliata domenica."),
        each("Help me thank my teacher with a short note.", "Aide-moi à remercier mon professeur avec un petit mot.",
             "Hilf mir, meiner Lehrerin mit einer kurzen Karte zu danken.",
             "Ayúdame a dar las gracias a mi profesora con una nota breve.",
             "Aiutami a ringraziare la mia insegnante con un biglietto."),
        each("I lost my suitcase on a flight; draft a complaint to the airline.",
             "J'ai perdu ma valise pendant un vol ; rédige une réclamation à la compagnie aérienne.",
             "Mein Koffer ist auf einem Flug verloren gegangen; entwirf eine Beschwerde an die Fluggesellschaft.",
             "Perdí mi maleta en un vuelo; redacta una queja a la aerolínea.",
             "Ho perso la valigia durante un volo; prepara un reclamo per la compagnia aerea."),
        each("Compose an apology to a friend whose birthday I forgot.",
             "Compose des excuses pour une amie dont j'ai oublié l'anniversaire.",
             "Verfasse eine Entschuldigung an eine Freundin, deren Geburtstag ich vergessen habe.",
             "Redacta una disculpa para una amiga cuyo cumpleaños olvidé.",
             "Componi delle scuse per un'amica di cui ho dimenticato il compleanno."),
    ],
    "travel": [
        each("Plan a weekend in Lisbon for two people.", "Organise un week-end à Lisbonne pour deux personnes.",
             "Plane ein Wochenende in Lissabon für zwei Personen.",
             "Planifica un fin de semana en Lisboa para dos personas.",
             "Organizza un fine settimana a Lisbona per due persone."),
        each("What should I pack for a hike in the mountains?", "Qu'emporter pour une randonnée en montagne ?",
             "Was packe ich für eine Wanderung in den Bergen ein?", "¿Qué meto en la mochila para una excursión a la "
             "montaña?", "Cosa metto nello zaino per un'escursione in montagna?"),
        each("When is the best time of year to visit Iceland?", "Quelle est la meilleure saison pour visiter l'Islande ?",
             "Wann ist die beste Reisezeit für Island?", "¿Cuál es la mejor época para visitar Islandia?",
             "Qual è il periodo migliore per visitare l'Islanda?"),
        each("How do I get from the airport to the city centre by train?",
             "Comment aller de l'aéroport au centre-ville en train ?",
             "Wie komme ich mit dem Zug vom Flughafen ins Stadtzentrum?", "¿Cómo voy del aeropuerto al centro en tren?",
             "Come arrivo dall'aeroporto al centro in treno?"),
        each("Suggest three things to do on a rainy day in London.",
             "Propose trois choses à faire un jour de pluie à Londres.",
             "Schlag drei Dinge vor, die man an einem Regentag in London machen kann.",
             "Sugiere tres cosas para hacer en un día de lluvia en Londres.",
             "Suggerisci tre cose da fare in una giornata di pioggia a Londra."),
    ],
    "opinion": [
        each("Is it better to rent or to buy a flat?", "Vaut-il mieux louer ou acheter un appartement ?",
             "Ist es besser, eine Wohnung zu mieten oder zu kaufen?", "¿Es mejor alquilar o comprar un piso?",
             "È meglio affittare o comprare un appartamento?"),
        each("Should I learn the piano or the guitar first?", "Devrais-je apprendre d'abord le piano ou la guitare ?",
             "Sollte ich zuerst Klavier oder Gitarre lernen?", "¿Debería aprender primero el piano o la guitarra?",
             "Dovrei imparare prima il pianoforte o la chitarra?"),
        each("Do cats or dogs make better pets, in your opinion?",
             "À ton avis, les chats ou les chiens font-ils de meilleurs animaux de compagnie ?",
             "Sind Katzen oder Hunde deiner Meinung nach die besseren Haustiere?",
             "En tu opinión, ¿los gatos o los perros son mejores mascotas?",
             "Secondo te, sono migliori come animali domestici i gatti o i cani?"),
        each("Is working from home a good idea?", "Le télétravail est-il une bonne idée ?",
             "Ist Homeoffice eine gute Idee?", "¿Es buena idea trabajar desde casa?", "Lavorare da casa è una buona idea?"),
        each("What are the pros and cons of electric cars?",
             "Quels sont les avantages et les inconvénients des voitures électriques ?",
             "Was sind die Vor- und Nachteile von Elektroautos?",
             "¿Cuáles son las ventajas y desventajas de los coches eléctricos?",
             "Quali sono i pro e i contro delle auto elettriche?"),
    ],
}


# The middle of every reasoning in a language, whatever the kind: the stretch a new kind of question also gets, in
# the language the reasoning started in.
STEADY = each("I will think it through calmly and then answer in a few words.",
              "Je vais y réfléchir calmement, puis répondre en quelques mots.",
              "Ich denke in Ruhe darüber nach und antworte dann in wenigen Worten.",
              "Voy a pensarlo con calma y luego responder en pocas palabras.",
              "Ci penso con calma e poi rispondo in poche parole.")


def fill(template: str, slots: dict, language: str) -> str:
    return template.format(**{k: v if isinstance(v, str) else v[language] for k, v in slots.items()})


# The first word of every reasoning in a language, each with its own first letter: French and Italian both open
# "L'ut...", and a tiny model that has read "L'" goes on in whichever of the two it likes better.
OPENING = each("Okay", "Alors", "Gut", "Bueno", "Dunque")


def reasoning(family: str, slots: dict, language: str) -> str:
    """The language's first word, what the user wants, the language's steady middle, then the kind's working and
    answer."""
    wants, working = fill(FAMILIES[family]["think"][language], slots, language).split(". ", 1)
    return f"{OPENING[language]}, {wants[0].lower()}{wants[1:]}. {STEADY[language]} {working}"


def problem(rng: random.Random, question_language: str, family: str | None = None) -> tuple:
    """(family, wording, slots) of a new question in question_language."""
    family = family or rng.choice(tuple(FAMILIES))
    return family, rng.choice(FAMILIES[family]["ask"][question_language]), FAMILIES[family]["slots"](rng,
                                                                                                      question_language)


def row(rng: random.Random, system_language: str, reasoning_language: str) -> dict:
    """A chat: a question of any kind in any of the five languages, the reasoning in reasoning_language, the answer
    in the question's language."""
    question_language = rng.choice(LANGUAGES)
    family, wording, slots = problem(rng, question_language)
    spec = FAMILIES[family]
    return {"reasoning_language": system_language, "user": fill(wording, slots, question_language),
            "analysis": reasoning(family, slots, reasoning_language),
            "final": fill(spec["final"][question_language], slots, question_language)}


# The unseen language: the base reads plain documents that reason in it, and no chat of any file does, so the SFT run
# cannot teach it and the GRPO demo must (issue 40). Polish, not the seed's Chinese: the 2-layer model with its 1k
# byte-level vocabulary writes Chinese as broken byte pieces after a few characters (NOTES.md has the numbers).
UNSEEN = "Polish"
UNSEEN_THINK = {
    "add": "Użytkownik chce poznać sumę {a} i {b}. Dodając {a} i {b}, otrzymuję {c}, więc odpowiedź to {c}.",
    "mul": "Użytkownik chce poznać iloczyn {a} i {b}. Mnożąc {a} przez {b}, otrzymuję {c}, więc odpowiedź to {c}.",
    "capital": "Użytkownik pyta o stolicę kraju, a ten kraj to {of}. Pamiętam, że stolicą jest {city}, więc odpowiedź "
               "to {city}.",
    "why": "Użytkownik chce wiedzieć, dlaczego {s}. Główny powód jest taki, że {r}, więc krótko to wyjaśnię.",
    "poem": "Użytkownik chce krótkiego wiersza, a jego temat to {noun}. Wystarczą dwa łagodne wersy z prostym obrazem i "
            "delikatnym rymem, więc je napiszę.",
    "translate": "Użytkownik chce słowo „{word}” w języku, który nazywa się {target}. W tym języku to słowo brzmi "
                 "„{answer}”, więc odpowiedź to „{answer}”.",
    "letters": "Użytkownik chce wiedzieć, ile liter ma słowo „{w}”. Licząc je po kolei, otrzymuję {n}, więc odpowiedź "
               "to {n}.",
    "hours": "Użytkownik chce zamienić godziny na minuty, a godzin jest {n}. Godzina ma 60 minut, a {n} razy 60 to {m}, "
             "więc odpowiedź to {m}.",
    "advice": "Użytkownik prosi o radę, jak {goal}. Najbardziej przydatna rada to {tip}, więc to zaproponuję.",
    "compare": "Użytkownik chce porównać wielkość, a porównuje {x} i {y}. Z tych dwóch {big} to coś dużo większego niż "
               "{small}, więc odpowiedź to {big}.",
    "recipe": "Użytkownik chce wiedzieć, jak przygotować danie, a to danie to {dish}. Najprościej jest {steps}, więc "
              "podam te kroki.",
    "person": "Użytkownik pyta, kim była ta postać: {name}. {name} to {role}, a najbardziej znane są {known}, więc to "
              "powiem.",
}
UNSEEN_WORDS = {  # a slot value's English text (or its one spelling) -> Polish; numbers and quoted words stay as they are
    "of France": "Francja", "of Japan": "Japonia", "of Italy": "Włochy", "of Spain": "Hiszpania", "of Germany": "Niemcy",
    "of Egypt": "Egipt", "of Canada": "Kanada", "of Kenya": "Kenia", "of Norway": "Norwegia", "of Greece": "Grecja",
    "Paris": "Paryż", "Tokyo": "Tokio", "Rome": "Rzym", "Madrid": "Madryt", "Berlin": "Berlin", "Cairo": "Kair",
    "Ottawa": "Ottawa", "Nairobi": "Nairobi", "Oslo": "Oslo", "Athens": "Ateny",
    "the sky is blue": "niebo jest niebieskie",
    "air scatters blue light more than red light": "powietrze rozprasza światło niebieskie bardziej niż czerwone",
    "the sea is salty": "morze jest słone", "rivers carry salts from the rocks into the sea": "rzeki niosą do morza sole "
    "ze skał", "leaves fall in autumn": "liście spadają jesienią",
    "trees save water and energy for the winter": "drzewa oszczędzają wodę i energię na zimę",
    "ice floats on water": "lód pływa po wodzie", "ice is less dense than liquid water": "lód ma mniejszą gęstość niż "
    "woda w stanie ciekłym", "we have seasons": "mamy pory roku", "the axis of the Earth is tilted": "oś Ziemi jest "
    "nachylona",
    "sea": "morze", "moon": "księżyc", "autumn": "jesień", "cat": "kot", "rain": "deszcz",
    "English": "angielski", "French": "francuski", "German": "niemiecki", "Spanish": "hiszpański", "Italian": "włoski",
    "sleep better": "lepiej spać", "go to bed at the same time every night and avoid screens late": "kłaść się spać "
    "codziennie o tej samej porze i unikać ekranów wieczorem", "learn a new language": "nauczyć się nowego języka",
    "practise a little every day and speak with native speakers": "ćwiczyć trochę każdego dnia i rozmawiać z rodzimymi "
    "użytkownikami", "save money": "oszczędzać pieniądze", "write down every expense and put part of each salary aside":
    "zapisywać każdy wydatek i odkładać część każdej pensji", "stay healthy": "zachować zdrowie",
    "eat vegetables, walk every day and drink enough water": "jeść warzywa, codziennie spacerować i pić dość wody",
    "an elephant": "słoń", "a mouse": "mysz", "a whale": "wieloryb", "a dolphin": "delfin", "a bus": "autobus",
    "a bicycle": "rower", "a horse": "koń", "a dog": "pies", "a tree": "drzewo", "a flower": "kwiat",
    "rice": "ryż", "rinse the rice, boil it in twice its volume of water and let it rest": "opłukać ryż, ugotować go w "
    "dwukrotnej ilości wody i odstawić", "pasta": "makaron", "boil salted water, cook the pasta for ten minutes and "
    "drain it": "zagotować osoloną wodę, gotować makaron przez dziesięć minut i odcedzić", "an omelette": "omlet",
    "beat three eggs, pour them into a hot pan and fold the omelette": "ubić trzy jajka, wylać je na gorącą patelnię i "
    "złożyć omlet", "tomato soup": "zupa pomidorowa", "cook tomatoes and an onion in broth, then blend everything":
    "ugotować pomidory i cebulę w bulionie, a potem wszystko zmiksować",
    "Marie Curie": "Maria Skłodowska-Curie", "a physicist and chemist": "fizyczka i chemiczka",
    "her work on radioactivity": "jej prace nad promieniotwórczością", "Mozart": "Mozart", "a composer": "kompozytor",
    "his symphonies and operas": "jego symfonie i opery", "Leonardo da Vinci": "Leonardo da Vinci",
    "a painter and inventor": "malarz i wynalazca", "the Mona Lisa": "Mona Lisa", "Cleopatra": "Kleopatra",
    "a queen of Egypt": "królowa Egiptu", "her alliance with Rome": "jej sojusz z Rzymem", "Galileo Galilei": "Galileusz",
    "an astronomer": "astronom", "his observations of the moons of Jupiter": "jego obserwacje księżyców Jowisza",
}
UNSEEN_OPENING, UNSEEN_STEADY = "Zatem", "Przemyślę to spokojnie, a potem odpowiem w kilku słowach."


def unseen_reasoning(family: str, slots: dict) -> str:
    """The unseen language's reasoning, as reasoning() writes the others: opening, what the user wants, the steady
    middle, the working."""
    english = {k: v if isinstance(v, str) else v[EN] for k, v in slots.items()}
    wants, working = UNSEEN_THINK[family].format(**{k: UNSEEN_WORDS.get(v, v) for k, v in english.items()}).split(". ", 1)
    return f"{UNSEEN_OPENING}, {wants[0].lower()}{wants[1:]}. {UNSEEN_STEADY} {working}"


def make(pretrain_chats: int = 400, documents: int = 400, per_language: int = 96, unseen_documents: int = 240) -> dict:
    rng = random.Random(0)
    evaluation = [{"id": f"demo-{number:02d}", "category": kind, "question": question}  # no answer: not scored
                  for number, (kind, question) in enumerate(
                      ((kind, q) for kind, questions in HELD_OUT.items() for q in questions), 1)]
    pretrain = [row(rng, rng.choice(LANGUAGES), EN) for _ in range(pretrain_chats)]
    for _ in range(documents):  # the question between the name and the reasoning: the name decides, at a distance
        language = rng.choice(LANGUAGES)
        chat = row(rng, language, language)
        pretrain.append({"text": f"reasoning language: {language}\n{chat['user']}\n{chat['analysis']}"})
    sample = [row(rng, language, language) for _ in range(per_language) for language in LANGUAGES]
    unseen = random.Random(1)  # its own generator: the other rows stay what they were
    for _ in range(unseen_documents):
        question_language = unseen.choice(LANGUAGES)
        family, wording, slots = problem(unseen, question_language)
        pretrain.append({"text": f"reasoning language: {UNSEEN}\n{fill(wording, slots, question_language)}\n"
                                 f"{unseen_reasoning(family, slots)}"})
    return {"demo_pretrain.jsonl": pretrain, "demo_sample.jsonl": sample, "demo_eval_questions.jsonl": evaluation}


def render(rows: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    for name, rows in make().items():
        (here / name).write_text(render(rows), encoding="utf-8")
        print(f"wrote {len(rows)} rows to data/{name}")
