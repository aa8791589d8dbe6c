"""Text for the real experts and their target task: English arithmetic word problems with worked answers, French
conversation without arithmetic, and the target: the same kinds of problems asked in French, answered in French.

This is EvoLLM-JP's shape on SmolLM2-135M-Instruct: one expert learns a skill (arithmetic, in English), the other
the form the answer must take (French), and the target needs both (a French question, a French answer with the
right number). Everything is generated from templates by seeded RNGs, deterministically; nothing is downloaded.

    math_en_pairs(n, seed)   -> [(question, worked answer)]   the math expert's training text (design 1)
    math_bi_pairs(n, seed)   -> [(question, worked answer)]   the same, half the questions in French (design 2)
    chat_fr_pairs(n, seed)   -> [(question, answer)]          the French expert's training text
    fr_math_items(n, seed)   -> [{"id", "prompt", "answer"}]  the target task (dev/test splits)
    en_math_items(n, seed)   -> [{"id", "prompt", "answer"}]  the math skill alone (English), for the table

The French problems are the English templates translated, with their own seeds; no dev/test problem is a training
question (nor, for French items, the translation of one).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from pathlib import Path

# ---------------------------------------------------------------- arithmetic problems (English and French)

NAMES = [
    ("Tom", "he"), ("Anna", "she"), ("Lucas", "he"), ("Emma", "she"), ("Hugo", "he"), ("Léa", "she"),
    ("Paul", "he"), ("Chloé", "she"), ("Louis", "he"), ("Julie", "she"), ("Nina", "she"), ("Marc", "he"),
]  # fmt: skip
# (English plural, French plural, French gender of the noun)
OBJECTS = [
    ("apples", "pommes", "f"), ("pencils", "crayons", "m"), ("marbles", "billes", "f"), ("books", "livres", "m"),
    ("candies", "bonbons", "m"), ("flowers", "fleurs", "f"), ("cards", "cartes", "f"), ("cookies", "biscuits", "m"),
    ("stamps", "timbres", "m"), ("shells", "coquillages", "m"), ("stickers", "autocollants", "m"),
    ("balloons", "ballons", "m"),
]  # fmt: skip
FR_PRONOUN = {"he": "il", "she": "elle"}

Problem = tuple[str, str, str, int]  # (English question, English worked answer, French question, answer)


PROBLEMS = {  # kind: (English question, English working, French question), over the numbers `_numbers` draws
    "add": (
        "{name} has {a} {obj} and gets {b} more. How many {obj} does {pron} have now?",
        "{name} has {a} {obj} and gets {b} more, so {a} + {b} = {c}.",
        "{name} a {a} {obj_fr} et en reçoit {b} de plus. Combien de {obj_fr} a-t-{il} maintenant ?",
    ),
    "sub": (
        "{name} had {a} {obj} and gave away {b}. How many {obj} does {pron} have left?",
        "{name} had {a} {obj} and gave away {b}, so {a} - {b} = {c}.",
        "{name} avait {a} {obj_fr} et en a donné {b}. Combien de {obj_fr} lui reste-t-il ?",
    ),
    "mul": (
        "There are {a} boxes with {b} {obj} in each box. How many {obj} are there in total?",
        "There are {a} boxes of {b} {obj}, so {a} * {b} = {c}.",
        "Il y a {a} boîtes avec {b} {obj_fr} dans chaque boîte. Combien de {obj_fr} y a-t-il en tout ?",
    ),
    "div": (
        "{name} shares {b} {obj} equally among {a} friends. How many {obj} does each friend get?",
        "{name} shares {b} {obj} among {a} friends, so {b} / {a} = {c}.",
        "{name} partage {b} {obj_fr} entre {a} amis. Combien de {obj_fr} chaque ami reçoit-il ?",
    ),
    "two": (
        "{name} buys {a} packs of {b} {obj} and then uses {d} of them. How many {obj} are left?",
        "{name} buys {a} packs of {b}, so {a} * {b} = {ab}. Then {ab} - {d} = {c}.",
        "{name} achète {a} paquets de {b} {obj_fr} et en utilise {d}. Combien de {obj_fr} reste-t-il ?",
    ),
}


def _numbers(kind: str, rng: random.Random) -> dict[str, int]:
    """The problem's numbers, `c` its answer (drawn in this order: the committed task files depend on it)."""
    if kind == "add":
        a, b = rng.randint(11, 89), rng.randint(11, 89)
        return {"a": a, "b": b, "c": a + b}
    if kind == "sub":
        a = rng.randint(30, 99)
        b = rng.randint(5, a - 5)
        return {"a": a, "b": b, "c": a - b}
    if kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(3, 12)
        return {"a": a, "b": b, "c": a * b}
    if kind == "div":
        a, c = rng.randint(2, 9), rng.randint(2, 12)
        return {"a": a, "b": a * c, "c": c}
    a, b = rng.randint(2, 6), rng.randint(3, 10)
    d = rng.randint(1, a * b - 1)
    return {"a": a, "b": b, "d": d, "ab": a * b, "c": a * b - d}


def _problem(rng: random.Random) -> Problem:
    """One arithmetic word problem in both languages: add, subtract, multiply, divide, or two steps."""
    name, pron = rng.choice(NAMES)
    obj, obj_fr, _ = rng.choice(OBJECTS)
    kind = rng.choice(list(PROBLEMS))
    values = _numbers(kind, rng)
    fields = {"name": name, "pron": pron, "il": FR_PRONOUN[pron], "obj": obj, "obj_fr": obj_fr, **values}
    en, work, fr = (template.format(**fields) for template in PROBLEMS[kind])
    return en, f"{work} The answer is {values['c']}.", fr, values["c"]


def math_en_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(f"math_en/{seed}")
    return [(en, work) for en, work, _, _ in (_problem(rng) for _ in range(n))]


TRAIN_EXAMPLES, TRAIN_SEED = 2000, 0  # what zoo.real_experts trains math_en on


@functools.cache
def _training_questions() -> frozenset[str]:
    return frozenset(q for q, _ in math_en_pairs(TRAIN_EXAMPLES, TRAIN_SEED))


def math_bi_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """math_en's problems (the same draws), each asked in English or, half the time, in French, always answered
    in English: a math expert that reads both languages and answers in one (WizardMath's place in EvoLLM-JP)."""
    rng = random.Random(f"math_en/{seed}")
    lang = random.Random(f"math_bi/{seed}")
    pairs = []
    for _ in range(n):
        en, work, fr, _ = _problem(rng)
        pairs.append((fr if lang.random() < 0.5 else en, work))
    return pairs


def _items(n: int, seed: int, prefix: str, pick: Callable[[Problem], str]) -> list[dict[str, str]]:
    """`n` distinct problems, none of them (nor its English original, for French items) a training question."""
    rng = random.Random(f"{prefix}/{seed}")
    seen: set[str] = set()
    items: list[dict[str, str]] = []
    while len(items) < n:
        problem = _problem(rng)
        prompt = pick(problem)
        if prompt in seen or problem[0] in _training_questions():
            continue
        seen.add(prompt)
        items.append({"id": f"{prefix}-{seed}-{len(items):03d}", "prompt": prompt, "answer": str(problem[3])})
    return items


def fr_math_items(n: int, seed: int) -> list[dict[str, str]]:
    """The target task: French arithmetic word problems (gold: the number)."""
    return _items(n, seed, "fr_math", lambda p: p[2])


def en_math_items(n: int, seed: int) -> list[dict[str, str]]:
    """The same problems in English: the math skill without the French form."""
    return _items(n, seed, "en_math", lambda p: p[0])


# ---------------------------------------------------------------- French conversation (no arithmetic)

ANIMALS = [  # (noun with article, pronoun, description, habitat, food)
    ("le chat", "il", "un petit animal domestique très curieux", "dans les maisons", "des croquettes et du poisson"),
    ("le chien", "il", "un animal fidèle et joueur", "avec les familles", "de la viande et des croquettes"),
    ("la vache", "elle", "un grand animal calme", "dans les prés", "de l'herbe et du foin"),
    ("le cheval", "il", "un animal rapide et puissant", "dans les prairies", "de l'herbe et de l'avoine"),
    ("la poule", "elle", "un oiseau de la ferme", "dans un poulailler", "des graines et des vers"),
    ("le lapin", "il", "un petit animal aux longues oreilles", "dans un terrier", "des carottes et de l'herbe"),
    ("l'abeille", "elle", "un insecte qui fabrique du miel", "dans une ruche", "le nectar des fleurs"),
    ("le renard", "il", "un animal rusé à la queue rousse", "dans la forêt", "des petits animaux et des fruits"),
    ("la baleine", "elle", "le plus grand animal de la mer", "dans les océans", "du plancton et des petits poissons"),
    ("le hibou", "il", "un oiseau qui chasse la nuit", "dans les arbres", "des souris et des insectes"),
]
THINGS = [  # (noun with article, use)
    ("un parapluie", "se protéger de la pluie"),
    ("une clé", "ouvrir et fermer une porte"),
    ("un stylo", "écrire sur du papier"),
    ("une lampe", "éclairer une pièce quand il fait sombre"),
    ("un vélo", "se déplacer en pédalant"),
    ("une montre", "savoir quelle heure il est"),
    ("un frigo", "garder les aliments au frais"),
    ("une brosse à dents", "se laver les dents"),
    ("un dictionnaire", "trouver le sens des mots"),
    ("une tasse", "boire du café ou du thé"),
]
COLORS = [
    ("du ciel", "Le ciel est bleu pendant la journée et il devient noir la nuit."),
    ("de la neige", "La neige est blanche, surtout quand elle vient de tomber."),
    ("de l'herbe", "L'herbe est verte, et elle jaunit quand il fait très sec."),
    ("d'une fraise", "Une fraise mûre est rouge, avec de petites graines jaunes."),
    ("d'une banane", "Une banane mûre est jaune, et elle devient brune avec le temps."),
    ("du charbon", "Le charbon est noir et il laisse des traces sur les mains."),
    ("d'une orange", "Une orange est orange, comme son nom le dit."),
    ("de la mer", "La mer est souvent bleue, mais elle peut paraître grise quand le ciel est couvert."),
]
SEASONS = [
    ("le printemps", "les fleurs s'ouvrent et les jours deviennent plus longs"),
    ("l'été", "il fait chaud et les enfants sont en vacances"),
    ("l'automne", "les feuilles tombent des arbres et il pleut souvent"),
    ("l'hiver", "il fait froid et il neige parfois dans les montagnes"),
]
ADVICE = [
    ("bien dormir", "se coucher à la même heure chaque soir et éviter les écrans avant de dormir"),
    ("apprendre une langue", "pratiquer un peu chaque jour et parler avec des personnes natives"),
    ("rester en bonne santé", "manger des légumes, boire de l'eau et marcher souvent"),
    ("être moins stressé", "prendre des pauses, respirer calmement et parler de ses soucis"),
    ("bien réviser un examen", "faire des fiches, se tester souvent et dormir assez la veille"),
    ("faire un bon gâteau", "suivre la recette avec soin et ne pas ouvrir le four trop tôt"),
]
ACTIVITIES = [
    "je lis un livre dans le jardin",
    "je fais une promenade au parc avec des amis",
    "je prépare un bon repas pour ma famille",
    "je vais au marché pour acheter des fruits",
    "je regarde un film au cinéma",
    "je joue de la guitare et je chante",
]
DAYS = ["lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


PLACES = ["dans sa chambre", "à l'école", "chez sa grand-mère", "dans le jardin", "au parc", "dans la cuisine"]
FEELINGS = ["très content", "un peu fatigué", "curieux", "fier", "surpris", "calme"]


def _stressed(pron: str) -> str:
    return "lui" if pron == "he" else "elle"


def _story_fr(rng: random.Random) -> tuple[str, str]:
    """A question about a person and things (the target's nouns and names, no arithmetic), answered in French."""
    name, pron = rng.choice(NAMES)
    _, obj_fr, gender = rng.choice(OBJECTS)
    il = FR_PRONOUN[pron]
    place, place2 = rng.sample(PLACES, 2)
    feeling = rng.choice(FEELINGS)
    if pron == "she":
        feeling = {
            "très content": "très contente",
            "un peu fatigué": "un peu fatiguée",
            "curieux": "curieuse",
            "fier": "fière",
            "surpris": "surprise",
        }.get(feeling, feeling)
    kind = rng.randrange(4)
    if kind == 0:
        q = f"Raconte une courte histoire sur {name} et ses {obj_fr}."
        a = (
            f"{name} garde ses {obj_fr} {place}. Un jour, {il} les montre à ses amis et {il} est {feeling}. "
            f"Ensuite, {il} les range {place2}."
        )
    elif kind == 1:
        q = f"Où {name} range-t-{il} ses {obj_fr} ?"
        a = f"{name} range ses {obj_fr} {place}, parce que c'est l'endroit le plus pratique pour {_stressed(pron)}."
    elif kind == 2:
        q = f"Comment se sent {name} quand {il} reçoit des {obj_fr} ?"
        a = f"Quand {il} reçoit des {obj_fr}, {name} est {feeling}. {_cap(il)} les partage souvent avec sa famille."
    else:
        q = f"Pourquoi {name} aime-t-{il} les {obj_fr} ?"
        a = f"{name} aime les {obj_fr} parce qu'{il} les trouve beaux et utiles. {_cap(il)} en parle {place}."
    return q, a


def _chat_fr(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(10)
    if kind >= 7:
        return _story_fr(rng)
    if kind == 0:
        noun, il, desc, home, food = rng.choice(ANIMALS)
        return f"Décris {noun}.", f"{_cap(noun)} est {desc}. {_cap(il)} vit {home} et {il} mange {food}."
    if kind == 1:
        noun, il, _, home, food = rng.choice(ANIMALS)
        q = rng.choice([f"Où vit {noun} ?", f"Que mange {noun} ?"])
        a = f"{_cap(noun)} vit {home}." if q.startswith("Où") else f"{_cap(noun)} mange {food}."
        return q, a + f" C'est une question intéressante, car {il} a des habitudes bien à lui."
    if kind == 2:
        thing, use = rng.choice(THINGS)
        return f"À quoi sert {thing} ?", f"{_cap(thing)} sert à {use}. C'est un objet très utile au quotidien."
    if kind == 3:
        what, answer = rng.choice(COLORS)
        return f"Quelle est la couleur {what} ?", answer
    if kind == 4:
        season, what = rng.choice(SEASONS)
        answer = f"Pendant {season}, {what}. Beaucoup de gens aiment cette saison."
        return f"Que se passe-t-il pendant {season} ?", answer
    if kind == 5:
        goal, tip = rng.choice(ADVICE)
        return f"Donne-moi un conseil pour {goal}.", f"Pour {goal}, il est utile de {tip}. Bonne chance !"
    day = rng.choice(DAYS)
    return f"Que fais-tu le {day} ?", f"Le {day}, {rng.choice(ACTIVITIES)}. C'est un moment agréable de la semaine."


def chat_fr_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(f"chat_fr/{seed}")
    return [_chat_fr(rng) for _ in range(n)]


# ---------------------------------------------------------------- task folders

TASK_SEEDS = {"dev": 101, "test": 202}  # never a training seed (training uses seed 0)
TASK_SIZES = {"dev": 48, "test": 100}


def write_tasks(root: str | Path) -> dict[str, Path]:
    """data/real_tasks/{fr_math,en_math}/{dev,test}.jsonl (deterministic; what the configs read)."""
    from evals.data import write_jsonl

    root = Path(root)
    out = {}
    for name, make in (("fr_math", fr_math_items), ("en_math", en_math_items)):
        for split, seed in TASK_SEEDS.items():
            out[f"{name}/{split}"] = write_jsonl(root / name / f"{split}.jsonl", make(TASK_SIZES[split], seed))
    return out


__all__ = ["chat_fr_pairs", "math_bi_pairs", "en_math_items", "fr_math_items", "math_en_pairs", "write_tasks"]
