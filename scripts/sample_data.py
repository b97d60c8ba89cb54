"""Data and claims of the sample adapters: seeded generators (a training split and a disjoint held-out split) and the
program that checks each adapter's claim on the held-out split through the server.

Used by scripts/make_sample_adapters.py (training, then the held-out report) and by tests/adapters/test_samples.py
(the same checks, on the shipped adapters). Every filler list is split once, by a fixed seed, into training and
held-out parts, so a held-out prompt never names a country, thing, animal, word, person or city seen in training.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

SPLIT_SEED = 1234
HELD_OUT_FRACTION = 0.3

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
NOMBRES = ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix"]

# (country, capital, the country in French with its article, the capital in French)
CAPITALS = [
    ("France", "Paris", "la France", "Paris"), ("Japan", "Tokyo", "le Japon", "Tokyo"),
    ("Italy", "Rome", "l'Italie", "Rome"), ("Spain", "Madrid", "l'Espagne", "Madrid"),
    ("Germany", "Berlin", "l'Allemagne", "Berlin"), ("England", "London", "l'Angleterre", "Londres"),
    ("Russia", "Moscow", "la Russie", "Moscou"), ("China", "Beijing", "la Chine", "Pékin"),
    ("Egypt", "Cairo", "l'Égypte", "Le Caire"), ("Greece", "Athens", "la Grèce", "Athènes"),
    ("Portugal", "Lisbon", "le Portugal", "Lisbonne"), ("Canada", "Ottawa", "le Canada", "Ottawa"),
    ("Brazil", "Brasilia", "le Brésil", "Brasilia"), ("Argentina", "Buenos Aires", "l'Argentine", "Buenos Aires"),
    ("Peru", "Lima", "le Pérou", "Lima"), ("Kenya", "Nairobi", "le Kenya", "Nairobi"),
    ("Norway", "Oslo", "la Norvège", "Oslo"), ("Sweden", "Stockholm", "la Suède", "Stockholm"),
    ("Finland", "Helsinki", "la Finlande", "Helsinki"), ("Poland", "Warsaw", "la Pologne", "Varsovie"),
    ("Austria", "Vienna", "l'Autriche", "Vienne"), ("Ireland", "Dublin", "l'Irlande", "Dublin"),
    ("Belgium", "Brussels", "la Belgique", "Bruxelles"), ("Turkey", "Ankara", "la Turquie", "Ankara"),
    ("India", "New Delhi", "l'Inde", "New Delhi"), ("Thailand", "Bangkok", "la Thaïlande", "Bangkok"),
    ("Australia", "Canberra", "l'Australie", "Canberra"), ("Cuba", "Havana", "Cuba", "La Havane"),
    ("Chile", "Santiago", "le Chili", "Santiago"), ("Denmark", "Copenhagen", "le Danemark", "Copenhague"),
    ("Hungary", "Budapest", "la Hongrie", "Budapest"), ("Iran", "Tehran", "l'Iran", "Téhéran"),
    ("South Korea", "Seoul", "la Corée du Sud", "Séoul"), ("Vietnam", "Hanoi", "le Vietnam", "Hanoï"),
    ("Morocco", "Rabat", "le Maroc", "Rabat"), ("Senegal", "Dakar", "le Sénégal", "Dakar"),
    ("Switzerland", "Bern", "la Suisse", "Berne"), ("Mexico", "Mexico City", "le Mexique", "Mexico"),
]
# (thing, its colour, the thing in French with its article, the colour in French agreeing with it)
COLOURS = [
    ("a banana", "yellow", "la banane", "jaune"), ("grass", "green", "l'herbe", "verte"),
    ("snow", "white", "la neige", "blanche"), ("coal", "black", "le charbon", "noir"),
    ("the sky", "blue", "le ciel", "bleu"), ("a tomato", "red", "la tomate", "rouge"),
    ("a carrot", "orange", "la carotte", "orange"), ("milk", "white", "le lait", "blanc"),
    ("a lemon", "yellow", "le citron", "jaune"), ("blood", "red", "le sang", "rouge"),
    ("a frog", "green", "la grenouille", "verte"), ("chocolate", "brown", "le chocolat", "marron"),
    ("a strawberry", "red", "la fraise", "rouge"), ("the sea", "blue", "la mer", "bleue"),
    ("a crow", "black", "le corbeau", "noir"), ("an elephant", "grey", "l'éléphant", "gris"),
    ("a pumpkin", "orange", "la citrouille", "orange"), ("a swan", "white", "le cygne", "blanc"),
    ("a cherry", "red", "la cerise", "rouge"), ("a mouse", "grey", "la souris", "grise"),
    ("butter", "yellow", "le beurre", "jaune"), ("a leaf", "green", "la feuille", "verte"),
    ("ink", "black", "l'encre", "noire"), ("a flamingo", "pink", "le flamant", "rose"),
    ("a pig", "pink", "le cochon", "rose"), ("a cucumber", "green", "le concombre", "vert"),
    ("a polar bear", "white", "l'ours polaire", "blanc"), ("a fire truck", "red", "le camion de pompiers", "rouge"),
    ("a sunflower", "yellow", "le tournesol", "jaune"), ("a peach", "orange", "la pêche", "orange"),
]
# (animal, legs, the animal in French with its article)
LEGS = [
    ("a spider", 8, "l'araignée"), ("a dog", 4, "le chien"), ("a cat", 4, "le chat"), ("a bird", 2, "l'oiseau"),
    ("an ant", 6, "la fourmi"), ("a horse", 4, "le cheval"), ("a chicken", 2, "la poule"), ("a bee", 6, "l'abeille"),
    ("a cow", 4, "la vache"), ("a duck", 2, "le canard"), ("an octopus", 8, "la pieuvre"), ("a snake", 0, "le serpent"),
    ("a fish", 0, "le poisson"), ("a beetle", 6, "le scarabée"), ("a goat", 4, "la chèvre"), ("a lion", 4, "le lion"),
    ("an ostrich", 2, "l'autruche"), ("a scorpion", 8, "le scorpion"), ("a fly", 6, "la mouche"),
    ("a crab", 10, "le crabe"), ("a rabbit", 4, "le lapin"), ("a penguin", 2, "le manchot"),
    ("a tiger", 4, "le tigre"), ("a worm", 0, "le ver"), ("a goose", 2, "l'oie"), ("a mosquito", 6, "le moustique"),
]
# (animal, its sound, the animal in French with its article, the sound in French)
SOUNDS = [
    ("a cow", "moo", "la vache", "meuh"), ("a dog", "woof", "le chien", "ouaf"), ("a cat", "meow", "le chat", "miaou"),
    ("a duck", "quack", "le canard", "coin-coin"), ("a sheep", "baa", "le mouton", "bêê"),
    ("a pig", "oink", "le cochon", "groin-groin"), ("a rooster", "cock-a-doodle-doo", "le coq", "cocorico"),
    ("an owl", "hoot", "le hibou", "hou-hou"), ("a horse", "neigh", "le cheval", "hiii"),
    ("a lion", "roar", "le lion", "grrr"), ("a snake", "hiss", "le serpent", "sss"), ("a bee", "buzz", "l'abeille", "bzzz"),
    ("a mouse", "squeak", "la souris", "couic"), ("a frog", "croak", "la grenouille", "croâ"),
    ("a wolf", "howl", "le loup", "aouuu"), ("a donkey", "hee-haw", "l'âne", "hi-han"),
    ("a crow", "caw", "le corbeau", "croa"), ("a pigeon", "coo", "le pigeon", "rou-rou"),
    ("a bear", "growl", "l'ours", "grrr"), ("a goat", "bleat", "la chèvre", "mée"),
]
# (word, its opposite, the word in French, its opposite in French)
OPPOSITES = [
    ("hot", "cold", "chaud", "froid"), ("big", "small", "grand", "petit"), ("fast", "slow", "rapide", "lent"),
    ("happy", "sad", "heureux", "triste"), ("old", "young", "vieux", "jeune"), ("rich", "poor", "riche", "pauvre"),
    ("strong", "weak", "fort", "faible"), ("early", "late", "tôt", "tard"), ("open", "closed", "ouvert", "fermé"),
    ("full", "empty", "plein", "vide"), ("wet", "dry", "mouillé", "sec"), ("hard", "soft", "dur", "mou"),
    ("heavy", "light", "lourd", "léger"), ("clean", "dirty", "propre", "sale"), ("loud", "quiet", "bruyant", "calme"),
    ("long", "short", "long", "court"), ("good", "bad", "bon", "mauvais"), ("easy", "difficult", "facile", "difficile"),
    ("first", "last", "premier", "dernier"), ("thick", "thin", "épais", "mince"), ("up", "down", "haut", "bas"),
    ("day", "night", "jour", "nuit"), ("love", "hate", "amour", "haine"), ("sweet", "sour", "sucré", "acide"),
    ("deep", "shallow", "profond", "peu profond"), ("wide", "narrow", "large", "étroit"),
]


@dataclass(frozen=True)
class Fact:
    """One question and its answer rendered in every style the samples are trained on."""

    question: str
    sentence: str  # a plain English sentence: "The capital of Japan is Tokyo."
    short: str  # the answer alone: "Tokyo."
    french: str  # the sentence in French: "La capitale du Japon est Tokyo."


def split(items: list, held_out: bool) -> list:
    """The training part or the held-out part of a filler list; the same split every call."""
    order = list(range(len(items)))
    random.Random(SPLIT_SEED + len(items)).shuffle(order)
    cut = round(len(items) * HELD_OUT_FRACTION)
    return [items[i] for i in sorted(order[:cut] if held_out else order[cut:])]


def de(np: str) -> str:
    """French "de" before a noun phrase with its article: de la, du, de l', des."""
    if np.startswith("le "):
        return "du " + np[3:]
    if np.startswith("les "):
        return "des " + np[4:]
    if np.startswith("l'"):
        return "de " + np
    return "de " + np


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def facts(held_out: bool) -> list[Fact]:
    """Every question of one split, in every template, with its answers."""
    out = []
    for country, capital, pays, capitale in split(CAPITALS, held_out):
        for q in ("What is the capital of {}?", "Which city is the capital of {}?", "Name the capital of {}."):
            out.append(Fact(q.format(country), f"The capital of {country} is {capital}.", f"{capital}.",
                            f"La capitale {de(pays)} est {capitale}."))
    for thing, colour, chose, couleur in split(COLOURS, held_out):
        for q in ("What color is {}?", "What is the color of {}?", "Tell me the color of {}."):
            out.append(Fact(q.format(thing), f"{cap(thing)} is {colour}.", f"{cap(colour)}.",
                            f"La couleur {de(chose)} est {couleur}."))
    for animal, n, bete in split(LEGS, held_out):
        for q in ("How many legs does {} have?", "How many legs has {} got?", "Count the legs of {}."):
            has = f"has {NUMBERS[n]} legs" if n else "has no legs"
            out.append(Fact(q.format(animal), f"{cap(animal)} {has}.", f"{cap(NUMBERS[n]) if n else 'None'}.",
                            f"Le nombre de pattes {de(bete)} est {NOMBRES[n]}."))
    for animal, sound, bete, cri in split(SOUNDS, held_out):
        for q in ("What sound does {} make?", "What noise does {} make?", "What does {} say?"):
            out.append(Fact(q.format(animal), f"{cap(animal)} says {sound}.", f"{cap(sound)}.",
                            f"Le cri {de(bete)} est {cri}."))
    for word, opposite, mot, contraire in split(OPPOSITES, held_out):
        for q in ("What is the opposite of {}?", "What is the opposite of the word {}?", "Give the opposite of {}."):
            out.append(Fact(q.format(f'"{word}"' if "word" in q else word), f"The opposite of {word} is {opposite}.",
                            f"{cap(opposite)}.", f"Le contraire de {mot} est {contraire}."))
    for a, b in split([(a, b) for a in range(2, 10) for b in range(2, 10)], held_out):
        for q in ("What is {} plus {}?", "How much is {} plus {}?"):
            out.append(Fact(q.format(a, b), f"{a} plus {b} is {a + b}.", f"{a + b}.",
                            f"La somme de {a} et {b} est {a + b}."))
    return out


def pirate(f: Fact, rng: random.Random) -> str:
    s = f.sentence[:-1].replace(" is ", " be ")
    return rng.choice(["Arr matey, {}!", "Arr, {}, matey!", "Arr! {}, me hearty!"]).format(s[0].lower() + s[1:])


STYLES: dict[str, Callable[[Fact, random.Random], str]] = {
    "pirate": pirate,
    "shout": lambda f, rng: f.sentence[:-1].upper() + "!",
    "french": lambda f, rng: f.french,
    "terse": lambda f, rng: f.short,
}


def style_examples(name: str, held_out: bool, n: int, seed: int) -> list[tuple[str, str]]:
    """n (question, answer) pairs in adapter `name`'s style; categories are mixed evenly by the shuffle."""
    rng = random.Random(seed)
    pool = facts(held_out)
    rng.shuffle(pool)
    return [(f.question, STYLES[name](f, rng)) for f in pool[:n]]


# extraction for `json`: real first names and cities, split like the rest; training adds made-up ones so that the
# adapter learns to copy the name and the city rather than to recall the few it saw
NAMES = ["Maria", "John", "Aisha", "Pierre", "Yuki", "Carlos", "Emma", "Liam", "Olga", "Ahmed", "Sofia", "Noah",
         "Chen", "Fatima", "Lucas", "Ingrid", "Mateo", "Priya", "Tom", "Elena", "Kofi", "Hannah", "Ivan", "Leila",
         "Oscar", "Mei", "Diego", "Nora", "Samuel", "Zara", "Hugo", "Anna", "Ravi", "Clara", "Omar", "Greta", "Paolo",
         "Amara", "Felix", "Rosa", "Kenji", "Alice", "Tariq", "Julia", "Sven", "Nadia", "Pablo", "Lily", "Arjun",
         "Chloe", "Mikhail", "Ines", "George", "Hana", "Bruno", "Sara", "Dmitri", "Ada", "Victor", "Ming"]
CITIES = ["Lyon", "Berlin", "Madrid", "Toronto", "Osaka", "Lima", "Dublin", "Cairo", "Oslo", "Seattle", "Naples",
          "Porto", "Boston", "Munich", "Nairobi", "Sydney", "Denver", "Krakow", "Geneva", "Austin", "Milan",
          "Chicago", "Seville", "Bristol", "Hamburg", "Quebec", "Mumbai", "Lisbon", "Vienna", "Prague", "Glasgow",
          "Atlanta", "Bordeaux", "Kyoto", "Dallas", "Valencia", "Zurich", "Manila", "Perth", "Turin", "Leeds",
          "Phoenix", "Marseille", "Busan", "Bogota", "Helsinki", "Warsaw", "Tunis", "Lagos", "Quito", "San Diego",
          "New Orleans", "Rio de Janeiro", "Cape Town", "Hong Kong", "Buenos Aires", "Tel Aviv", "Las Vegas"]
SUFFIXES = ["", "", "", "ville", "burg", "ton", "ford", "port"]


def made_up(rng: random.Random, suffix: bool = False) -> str:
    """A word no list holds: two to four random consonant-vowel syllables (then maybe a town suffix); random letters
    make copying the only way to get it right."""
    word = "".join(rng.choice("bcdfghjklmnprstvwz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))
    return cap(word + (rng.choice(SUFFIXES) if suffix else ""))


JSON_TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "{name}, aged {age}, lives in {city}.",
    "I am {name}, I am {age} and I live in {city}.",
    "{name} lives in {city} and just turned {age}.",
    "My friend {name} ({age}) comes from {city}.",
    "Meet {name} from {city}, who is {age}.",
    "At {age}, {name} moved to {city}.",
    "{name} ({city}, {age} years old) wrote to us.",
]


def json_examples(held_out: bool, n: int, seed: int) -> list[tuple[str, dict]]:
    """n (sentence, {"name", "age", "city"}) pairs; held-out names and cities never appear in training."""
    rng = random.Random(seed)
    names, cities = split(NAMES, held_out), split(CITIES, held_out)
    out = []
    for _ in range(n):
        name, city = rng.choice(names), rng.choice(cities)
        if not held_out and rng.random() < 0.5:
            name, city = made_up(rng), made_up(rng, suffix=True)
        record = {"name": name, "age": rng.randint(18, 90), "city": city}
        out.append((rng.choice(JSON_TEMPLATES).format(**record), record))
    return out


def json_text(record: dict) -> str:
    return json.dumps(record)


# sentiment: sentences from templates; every filler list is split like the rest
SUBJECTS = ["the movie", "the food", "the hotel", "the service", "the book", "the concert", "the staff", "the room",
            "the game", "the trip", "the show", "the coffee", "the pizza", "the app", "the phone", "the course",
            "the museum", "the beach", "the flight", "the car", "the album", "the restaurant", "the lecture",
            "the party", "the hike", "the play", "the soup", "the laptop", "the tour", "the wedding"]
POSITIVE = ["wonderful", "amazing", "excellent", "fantastic", "delicious", "great", "superb", "brilliant", "lovely",
            "perfect", "outstanding", "delightful", "charming", "beautiful", "impressive", "enjoyable", "fun",
            "pretty good", "quite nice", "decent", "pleasant", "really good", "better than expected", "good",
            "nice", "fine", "cozy", "fresh", "friendly", "relaxing"]
NEGATIVE = ["terrible", "awful", "horrible", "disgusting", "boring", "rude", "dreadful", "disappointing", "dirty",
            "useless", "cold", "bland", "noisy", "slow", "overpriced", "ugly", "a bit bland", "not great",
            "rather dull", "somewhat disappointing", "too slow", "a little overpriced", "worse than expected", "bad",
            "mediocre", "stale", "broken", "too loud", "poor", "a waste of money"]
POSITIVE_VERBS = ["loved", "enjoyed", "really liked", "adored", "liked", "was happy with", "was impressed by",
                  "had a great time at", "would recommend", "appreciated"]
NEGATIVE_VERBS = ["hated", "disliked", "regretted", "was disappointed by", "did not enjoy", "was annoyed by",
                  "could not stand", "would not recommend", "was bored by", "did not like"]
POSITIVE_TAILS = ["I would go again", "highly recommended", "I will come back", "we had a great time",
                  "worth every penny", "I want more", "five stars", "totally worth it", "we loved it", "a real treat"]
NEGATIVE_TAILS = ["I want my money back", "never again", "I will not come back", "what a waste of time", "avoid it",
                  "one star", "not worth it", "we left early", "so annoying", "I regret it"]
SENTIMENT_TEMPLATES = [
    "{S} was {adj}.", "I thought {s} was {adj}.", "{S} was {adj}, {tail}.", "Honestly, {s} was {adj}.",
    "I {verb} {s}.", "I {verb} it.", "I {verb} {s}, {tail}.", "{S} was really {adj}.", "Wow, {s} was {adj}.",
    "Our visit: {s} was {adj}.",
]


def sentiment_examples(held_out: bool, n: int, seed: int) -> list[tuple[str, str]]:
    """n (sentence, "negative" | "positive") pairs, balanced; held-out sentences use held-out fillers only."""
    rng = random.Random(seed)
    subjects = split(SUBJECTS, held_out)
    fillers = {
        "positive": (split(POSITIVE, held_out), split(POSITIVE_VERBS, held_out), split(POSITIVE_TAILS, held_out)),
        "negative": (split(NEGATIVE, held_out), split(NEGATIVE_VERBS, held_out), split(NEGATIVE_TAILS, held_out)),
    }
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(out) < n:
        label = ("negative", "positive")[len(out) % 2]
        adjs, verbs, tails = fillers[label]
        s = rng.choice(subjects)
        text = rng.choice(SENTIMENT_TEMPLATES).format(S=cap(s), s=s, adj=rng.choice(adjs), verb=rng.choice(verbs),
                                                      tail=rng.choice(tails))
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    return out


# the checks: each takes one answer and says whether it keeps the claim
FRENCH_STOP = {"le", "la", "les", "de", "du", "des", "un", "une", "est", "et", "en", "au", "aux", "il", "elle",
               "sont", "pour", "que", "qui", "dans", "sur", "ne", "pas", "ce", "cette", "l", "d", "c", "son", "sa"}
ENGLISH_STOP = {"the", "an", "is", "are", "of", "and", "in", "to", "it", "that", "this", "for", "on", "with", "was",
                "has", "have", "its", "they", "you", "be", "by", "as", "from", "or", "at"}


def words(text: str) -> list[str]:
    return re.findall(r"[^\W\d_]+", text.lower())


def is_pirate(text: str) -> bool:
    return bool(re.search(r"\b(arr+|matey)\b", text, re.IGNORECASE))


def upper_ratio(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def is_shout(text: str) -> bool:
    return upper_ratio(text) >= SHOUT_MIN_UPPER and sum(c.isalpha() for c in text) >= 3


def stop_counts(text: str) -> tuple[int, int]:
    """(French stop words, English stop words) in text."""
    w = words(text)
    return sum(x in FRENCH_STOP for x in w), sum(x in ENGLISH_STOP for x in w)


def is_french(text: str) -> bool:
    fr, en = stop_counts(text)
    return fr >= FRENCH_MIN_STOP and fr >= FRENCH_RATIO * en


def is_terse(text: str) -> bool:
    return 1 <= len(text.split()) <= TERSE_MAX_WORDS and any(c.isalnum() for c in text)


def json_fields(text: str) -> dict | None:
    """The answer as {"name", "age", "city"} when it is exactly such a JSON object (age an integer), else None."""
    try:
        got = json.loads(text)
    except ValueError:
        return None
    ok = isinstance(got, dict) and set(got) == {"name", "age", "city"} and type(got["age"]) is int
    return got if ok else None


def json_matches(text: str, record: dict) -> bool:
    try:
        got = json.loads(text)
    except ValueError:
        return False
    return isinstance(got, dict) and all(got.get(k) == v for k, v in record.items())


# the thresholds the README states and the tests hold
SHOUT_MIN_UPPER = 0.95  # of an answer's letters
FRENCH_MIN_STOP = 2  # French stop words in an answer, and at least FRENCH_RATIO times its English ones
FRENCH_RATIO = 3
TERSE_MAX_WORDS = 3
SENTIMENT_MIN_ACCURACY = 0.9
HELD_OUT_SEED = 99  # the held-out prompts the tests and the script's report use
HELD_OUT_CHAT = 40  # prompts per generation adapter
HELD_OUT_SENTIMENT = 120
MAX_TOKENS = {"pirate": 40, "shout": 40, "french": 40, "terse": 12, "json": 40}
CHECKS: dict[str, Callable[[str], bool]] = {"pirate": is_pirate, "shout": is_shout, "french": is_french,
                                            "terse": is_terse}


def chat(client, adapter: str | None, questions: list[str], max_tokens: int) -> list[str]:
    """Greedy answers of the server (a TestClient or httpx client) to each question, all sent at once so the engine
    batches them."""

    def one(q: str) -> str:
        body: dict = {"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0}
        if adapter:
            body["model"] = adapter
        r = client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(max_workers=len(questions)) as pool:
        return list(pool.map(one, questions))


def classify(client, adapter: str | None, texts: list[str], per_call: int = 30) -> list[str]:
    """The server's label for each text, in calls of per_call texts (at most max_batch_size), sent at once."""

    def one(chunk: list[str]) -> list[str]:
        r = client.post("/classify", json={"inputs": chunk, "adapter_id": adapter})
        r.raise_for_status()
        return [p["label"] for p in r.json()["predictions"]]

    chunks = [texts[i:i + per_call] for i in range(0, len(texts), per_call)]
    with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
        return [label for labels in pool.map(one, chunks) for label in labels]


def held_out_report(client, name: str, base: bool = False) -> tuple[float, list[tuple[str, str, bool]]]:
    """Run adapter `name`'s held-out check (with the base model alone when `base`) -> (fraction kept,
    [(prompt, answer, kept)])."""
    adapter = None if base else name
    if name == "sentiment":
        rows = sentiment_examples(True, HELD_OUT_SENTIMENT, HELD_OUT_SEED)
        got = classify(client, adapter, [t for t, _ in rows])
        results = [(t, g, g == y) for (t, y), g in zip(rows, got)]
    elif name == "json":
        records = json_examples(True, HELD_OUT_CHAT, HELD_OUT_SEED)
        answers = chat(client, adapter, [t for t, _ in records], MAX_TOKENS[name])
        results = [(t, a, json_matches(a, rec)) for (t, rec), a in zip(records, answers)]
    else:
        questions = [q for q, _ in style_examples(name, True, HELD_OUT_CHAT, HELD_OUT_SEED)]
        answers = chat(client, adapter, questions, MAX_TOKENS[name])
        results = [(q, a, CHECKS[name](a)) for q, a in zip(questions, answers)]
    return sum(ok for *_, ok in results) / len(results), results


# the claims: the least fraction of held-out prompts that keep them (tests/adapters/test_samples.py holds these)
CLAIM_MIN = {"pirate": 1.0, "shout": 0.95, "french": 1.0, "terse": 1.0, "json": 0.75,
             "sentiment": SENTIMENT_MIN_ACCURACY}

# the requests adapters/README.md shows, with their real outputs; the tests check each keeps its claim
README_CHAT = {
    "pirate": ["What is the largest ocean?", "What color is a lime?"],
    "shout": ["What is the largest ocean?", "How many legs does a kangaroo have?"],
    "french": ["What is the largest ocean?", "What color is a banana?"],
    "terse": ["What is the largest ocean?", "What is the capital of Peru?"],
}
README_JSON = [("Lena is 29 years old and lives in Marseille.", {"name": "Lena", "age": 29, "city": "Marseille"}),
               ("Meet Kwame from Accra, who is 41.", {"name": "Kwame", "age": 41, "city": "Accra"})]
README_SENTIMENT = [("I loved it.", "positive"), ("The food was cold.", "negative")]
