"""A deterministic synthetic English corpus with learnable structure, for the tiny CPU run.

Each document is one line of lower-case text built from a few templates a small model can learn:

- scenes: objects with colours, shapes, sizes, positions and counts, referred back to consistently;
- arithmetic facts: ``seven plus two is nine.`` (always correct);
- stories: named people passing coloured objects around, with the state tracked correctly;
- ordered lists: days, months, counting up or down, the alphabet, from a random start;
- animal facts (legs, sound, home: the same in every document) with a sum of legs;
- calendar facts: the day/month before or after another.

Most documents are short (tens of tokens) and a few are long (several paragraphs, up to ~300 tokens)
so that packing, splitting and padding are all exercised. Everything is drawn from one
``numpy.random.Generator`` seeded by the caller, so a seed always gives the same corpus.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_ONES = _words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
)
_TENS = _words("_ _ twenty thirty forty fifty sixty seventy eighty ninety")

COLOURS = _words(
    "red blue green yellow black white orange purple pink grey brown gold silver violet"
)
SHAPES = _words(
    "cube ball box cone ring star cup disk block pyramid cylinder triangle square circle "
    "button marble brick feather pencil bottle"
)
SIZES = _words("small big tiny large huge little")
POSITIONS = (
    "on the left", "on the right", "at the top", "at the bottom", "in the middle",
    "near the window", "under the table", "behind the chair",
)  # fmt: skip
NAMES = _words(
    "anna tom mia leo sara ben lily max nina sam eva omar julia pedro kenji fatima lucas "
    "chloe ivan priya hugo zara felix rosa"
)
PLACES = _words(
    "park kitchen garden school shop library beach forest museum market river village station "
    "harbour farm castle"
)
# (animal, legs, sound, home): facts stay consistent across documents.
ANIMALS = (
    ("cat", 4, "meows", "house"),
    ("dog", 4, "barks", "kennel"),
    ("cow", 4, "moos", "barn"),
    ("duck", 2, "quacks", "pond"),
    ("sheep", 4, "bleats", "field"),
    ("horse", 4, "neighs", "stable"),
    ("owl", 2, "hoots", "tree"),
    ("frog", 4, "croaks", "pond"),
    ("lion", 4, "roars", "savanna"),
    ("spider", 8, "is silent", "web"),
    ("bee", 6, "buzzes", "hive"),
    ("hen", 2, "clucks", "coop"),
    ("snake", 0, "hisses", "grass"),
    ("mouse", 4, "squeaks", "hole"),
    ("wolf", 4, "howls", "den"),
    ("crow", 2, "caws", "nest"),
    ("pig", 4, "oinks", "sty"),
    ("ant", 6, "is silent", "nest"),
)
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MONTHS = _words(
    "january february march april may june july august september october november december"
)
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")


def number_to_words(n: int) -> str:
    """Spell a number in ``[0, 999]`` in English words, e.g. ``42 -> "forty two"``."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_to_words supports 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    hundreds, rest = divmod(n, 100)
    head = _ONES[hundreds] + " hundred"
    return head if rest == 0 else f"{head} and {number_to_words(rest)}"


def _pick(rng: np.random.Generator, items: tuple[str, ...] | list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _plural(shape: str, count: int) -> str:
    if count == 1:
        return shape
    return shape + ("es" if shape.endswith("x") else "s")


def _scene(rng: np.random.Generator) -> str:
    """Objects with attributes, then questions about them answered from the same facts."""
    num_objects = int(rng.integers(1, 4))
    shapes = rng.choice(len(SHAPES), size=num_objects, replace=False)
    positions = rng.choice(len(POSITIONS), size=num_objects, replace=False)
    objects = []
    for shape_idx, pos_idx in zip(shapes, positions):
        objects.append(
            {
                "shape": SHAPES[int(shape_idx)],
                "colour": _pick(rng, COLOURS),
                "size": _pick(rng, SIZES),
                "position": POSITIONS[int(pos_idx)],
                "count": int(rng.integers(1, 10)),
            }
        )
    sentences = [
        (
            f"in this picture there {'is' if num_objects == 1 else 'are'} "
            f"{number_to_words(num_objects)} kind{'s' if num_objects > 1 else ''} of thing."
        )
    ]
    for obj in objects:
        verb = "is" if obj["count"] == 1 else "are"
        noun = _plural(obj["shape"], obj["count"])
        sentences.append(
            f"there {verb} {number_to_words(obj['count'])} {obj['size']} {obj['colour']} {noun} "
            f"{obj['position']}."
        )
    for obj_idx in rng.permutation(len(objects))[: int(rng.integers(0, 3))]:
        obj = objects[int(obj_idx)]
        question = int(rng.integers(3))
        if question == 0:
            plural = _plural(obj["shape"], 2)
            sentences.append(f"how many {plural} are there? {number_to_words(obj['count'])}.")
        elif question == 1:
            sentences.append(f"what colour is the {obj['shape']}? it is {obj['colour']}.")
        else:
            sentences.append(f"where is the {obj['shape']}? it is {obj['position']}.")
    if num_objects > 1:
        total = sum(o["count"] for o in objects)
        sentences.append(f"there are {number_to_words(total)} things in all.")
    return " ".join(sentences)


def _arithmetic(rng: np.random.Generator) -> str:
    """A handful of correct arithmetic facts."""
    facts = []
    for _ in range(int(rng.integers(1, 6))):
        op = int(rng.integers(3))
        if op == 0:
            a, b = (int(x) for x in rng.integers(0, 50, size=2))
            facts.append(
                f"{number_to_words(a)} plus {number_to_words(b)} is {number_to_words(a + b)}."
            )
        elif op == 1:
            a, b = sorted(int(x) for x in rng.integers(0, 50, size=2))
            facts.append(
                f"{number_to_words(b)} minus {number_to_words(a)} is {number_to_words(b - a)}."
            )
        else:
            a, b = (int(x) for x in rng.integers(1, 13, size=2))
            facts.append(
                f"{number_to_words(a)} times {number_to_words(b)} is {number_to_words(a * b)}."
            )
    return " ".join(facts)


def _story(rng: np.random.Generator) -> str:
    """People pass objects around; who has what is tracked and restated correctly."""
    num_people = 2 + int(rng.random() < 0.3)
    people = [NAMES[int(i)] for i in rng.choice(len(NAMES), size=num_people, replace=False)]
    colour, shape, place = _pick(rng, COLOURS), _pick(rng, SHAPES), _pick(rng, PLACES)
    day = _pick(rng, DAYS)
    holder = people[0]
    sentences = [
        f"on {day} {' and '.join(people)} went to the {place}.",
        f"{holder} had a {colour} {shape}.",
    ]
    for _ in range(int(rng.integers(1, 3))):
        receiver = _pick(rng, [p for p in people if p != holder])
        sentences.append(f"{holder} gave the {colour} {shape} to {receiver}.")
        sentences.append(f"now {receiver} has the {colour} {shape}.")
        holder = receiver
    if rng.random() < 0.5:
        sentences.append(f"who has the {shape} at the end? {holder} has it.")
    else:
        sentences.append(f"then they all went home from the {place}.")
    return " ".join(sentences)


def _sequence(rng: np.random.Generator) -> str:
    """An ordered list continued from a random start."""
    kind = int(rng.integers(4))
    length = int(rng.integers(3, 12))
    if kind == 0:
        start = int(rng.integers(7))
        items = [DAYS[(start + i) % 7] for i in range(length)]
        return f"the days in order: {', '.join(items)}."
    if kind == 1:
        start = int(rng.integers(12))
        items = [MONTHS[(start + i) % 12] for i in range(length)]
        return f"the months in order: {', '.join(items)}."
    if kind == 2:
        start, step = int(rng.integers(0, 60)), int(rng.integers(1, 4))
        down = rng.random() < 0.3 and start >= step * length
        nums = [start - step * i if down else start + step * i for i in range(length)]
        direction = "down" if down else "up"
        return (
            f"counting {direction} by {number_to_words(step)} from {number_to_words(start)}: "
            f"{', '.join(number_to_words(n) for n in nums)}."
        )
    start = int(rng.integers(0, 26 - min(length, 25)))
    return f"the letters in order: {' '.join(LETTERS[start : start + length])}."


def _animals(rng: np.random.Generator) -> str:
    """Fixed facts about a few animals, with a total count of legs."""
    chosen = rng.choice(len(ANIMALS), size=int(rng.integers(1, 4)), replace=False)
    sentences, total_legs = [], 0
    for idx in chosen:
        name, legs, sound, home = ANIMALS[int(idx)]
        count = int(rng.integers(1, 4))
        total_legs += count * legs
        sentences.append(
            f"a {name} has {number_to_words(legs)} legs. the {name} {sound}. "
            f"the {name} lives in a {home}."
        )
        sentences.append(f"we saw {number_to_words(count)} {name}{'s' if count > 1 else ''}.")
    sentences.append(f"together they have {number_to_words(total_legs)} legs.")
    return " ".join(sentences)


def _calendar(rng: np.random.Generator) -> str:
    """Before/after facts about days and months."""
    facts = []
    for _ in range(int(rng.integers(1, 6))):
        names = DAYS if rng.random() < 0.5 else MONTHS
        i = int(rng.integers(len(names)))
        if rng.random() < 0.5:
            facts.append(
                f"the {'day' if names is DAYS else 'month'} after {names[i]} is "
                f"{names[(i + 1) % len(names)]}."
            )
        else:
            facts.append(
                f"the {'day' if names is DAYS else 'month'} before {names[i]} is {names[i - 1]}."
            )
    return " ".join(facts)


_KINDS = (_scene, _arithmetic, _story, _sequence, _animals, _calendar)


def _paragraph(rng: np.random.Generator) -> str:
    return _KINDS[int(rng.integers(len(_KINDS)))](rng)


def _document(rng: np.random.Generator) -> str:
    # Most documents are one paragraph (~10-85 tokens). 5% are long: paragraphs are joined until
    # a target of 70-220 words (~100-300 tokens), so some exceed a 256-token sequence and get split.
    if rng.random() >= 0.05:
        return _paragraph(rng)
    target_words, paragraphs, num_words = int(rng.integers(70, 220)), [], 0
    while num_words < target_words:
        paragraphs.append(_paragraph(rng))
        num_words += len(paragraphs[-1].split())
    return " ".join(paragraphs)


def generate_corpus(num_docs: int, seed: int) -> list[str]:
    """Generate ``num_docs`` synthetic documents, one string each (no newlines inside).

    Args:
        num_docs: Number of documents.
        seed: Seed of the numpy generator; the same seed always gives the same corpus.

    Returns:
        The documents, in generation order.
    """
    rng = np.random.default_rng(seed)
    return [_document(rng) for _ in range(num_docs)]


def write_corpus(out_dir: str | Path, num_train: int, num_valid: int, seed: int) -> Path:
    """Write ``train.txt`` and ``valid.txt`` (one document per line) into ``out_dir``.

    The validation split is drawn with a different seed (``seed + 1_000_003``) and documents that
    occur in the training split (or earlier in validation) are dropped, since short list documents
    repeat by chance; every validation document is held out and unique.

    Args:
        out_dir: Directory to create or reuse.
        num_train: Number of training documents.
        num_valid: Number of validation documents.
        seed: Seed of the training split.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = generate_corpus(num_train, seed)
    seen, valid = set(train), []
    rng = np.random.default_rng(seed + 1_000_003)
    while len(valid) < num_valid:
        doc = _document(rng)
        if doc not in seen:
            seen.add(doc)
            valid.append(doc)
    for name, docs in (("train", train), ("valid", valid)):
        (out / f"{name}.txt").write_text("".join(d + "\n" for d in docs), encoding="utf-8")
    return out


def bundled_corpus_dir() -> Path:
    """The corpus shipped with the package (``data/assets/text``: ``train.txt``, ``valid.txt``)."""
    return Path(__file__).resolve().parent / "assets" / "text"
