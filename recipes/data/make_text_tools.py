"""Write the project's sample instruction data: text_tools_train.jsonl and text_tools_val.jsonl.

Seven small, deterministic text transformations in Alpaca format (instruction / input / output).
Each has exactly one right answer, so the effect of fine-tuning is measured by exact match instead of
by taste, and SmolLM2-135M-Instruct gets almost none of them right before training (see README.md).

Stdlib only and seeded: running it again rewrites byte-identical files.

    python recipes/data/make_text_tools.py
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

SEED = 20240611
TRAIN_PER_SKILL = 58  # 7 skills -> 406 training rows
VAL_PER_SKILL = 9  # 7 skills -> 63 held-out rows
OUT_DIR = Path(__file__).resolve().parent

# Word tables read best packed, not one word a line.
# fmt: off
ADJECTIVES = [
    "red", "small", "quiet", "old", "happy", "cold", "bright", "lazy", "brave", "green", "tall", "soft",
    "dark", "quick", "calm", "round", "wild", "young", "warm", "shy"
]
NOUNS = [
    "dog", "cat", "river", "tree", "house", "bird", "garden", "lamp", "boat", "horse", "cloud", "road",
    "apple", "window", "teacher", "child", "forest", "train", "city", "book"
]
VERBS = [
    "sleeps", "waits", "sings", "runs", "rests", "shines", "falls", "grows", "jumps", "stays", "turns",
    "moves"
]
PREPOSITIONS = ["near", "under", "behind", "beside", "above", "inside", "past", "by"]
WORDS = [
    "apple", "banana", "cherry", "grape", "lemon", "mango", "olive", "peach", "pear", "plum", "kiwi", "melon",
    "orange", "tomato", "carrot", "onion", "pepper", "rice", "bread", "honey", "salt", "sugar", "butter",
    "cheese", "garlic", "basil", "yogurt", "walnut", "almond", "raisin"
]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December"
]
DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
NAMES = [
    "Ana", "Ben", "Carla", "David", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kemal", "Lina",
    "Marco", "Nadia", "Omar", "Paula", "Quinn", "Rosa", "Sven", "Tara"
]
CITIES = [
    "Lima", "Oslo", "Porto", "Cairo", "Quito", "Riga", "Dakar", "Hanoi", "Lyon", "Perth", "Turin", "Accra",
    "Bern", "Kyiv", "Seoul", "Tunis"
]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "purple", "gray"]
ITEMS = ["apples", "books", "coins", "pens", "cups", "stamps", "shells", "cards", "eggs", "marbles"]
ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"
]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
# fmt: on

# A skill draws one example from the rng: (dedup key, instruction, input, output).
Example = tuple[str, str, str, str]


def sentence(rng: random.Random) -> str:
    words = ["the", rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS)]
    if rng.random() < 0.6:
        words += [rng.choice(PREPOSITIONS), "the", rng.choice(NOUNS)]
    return " ".join(words)


def reverse_words(rng: random.Random) -> Example:
    text = sentence(rng)
    instruction = rng.choice(
        [
            "Reverse the order of the words in this sentence.",
            "Write the words of the sentence in reverse order.",
            "Reverse the word order.",
        ]
    )
    return text, instruction, text, " ".join(reversed(text.split()))


def title_dashes(rng: random.Random) -> Example:
    text = " ".join([rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS)][: rng.choice([2, 3])])
    if rng.random() < 0.5:
        text = f"{rng.choice(ADJECTIVES)} {text}"
    instruction = rng.choice(
        [
            "Capitalize each word and join the words with dashes.",
            "Convert the phrase to title case with dashes between the words.",
            "Turn this phrase into Title-Case-With-Dashes.",
        ]
    )
    return text, instruction, text, "-".join(word.capitalize() for word in text.split())


def sort_words(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.choice([3, 4, 5]))
    text = ", ".join(words)
    instruction = rng.choice(
        [
            "Sort these words alphabetically.",
            "Put the words in alphabetical order.",
            "Arrange the list in alphabetical order.",
        ]
    )
    return text, instruction, text, ", ".join(sorted(words))


def iso_date(rng: random.Random) -> Example:
    month = rng.randrange(12)
    day = rng.randint(1, DAYS_IN_MONTH[month])
    year = rng.randint(1950, 2035)
    text = f"{MONTHS[month]} {day}, {year}"
    output = f"{year:04d}-{month + 1:02d}-{day:02d}"
    style = rng.randrange(3)
    if style == 0:  # the date sits in the input field
        return text, "Convert the date to ISO 8601 format (YYYY-MM-DD).", text, output
    if style == 1:
        return text, f"Write the date {text} in ISO format.", "", output
    return text, f"What is {text} as YYYY-MM-DD?", "", output


def number_in_words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS[tens] + (f"-{ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{ONES[hundreds]} hundred" + (f" {number_in_words(rest)}" if rest else "")


def number_words(rng: random.Random) -> Example:
    n = rng.randint(21, 99) if rng.random() < 0.4 else rng.randint(100, 999)
    instruction = rng.choice(
        [
            f"Write the number {n} in words.",
            f"Spell out {n} in English words.",
            f"How is {n} written in words?",
        ]
    )
    return str(n), instruction, "", number_in_words(n)


def sum_numbers(rng: random.Random) -> Example:
    name = rng.choice(NAMES)
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    item = rng.choice(ITEMS)
    if rng.random() < 0.5:
        text = f"{name} has {a} {item} and finds {b} more."
        numbers = [a, b]
    else:
        c = rng.randint(2, 20)
        text = f"{name} bought {a} {item}, then {b} {item}, then {c} {item}."
        numbers = [a, b, c]
    instruction = rng.choice(
        [
            "Extract all the numbers from the text and add them up.",
            "What is the sum of the numbers in this text?",
            "Add up every number that appears in the text.",
        ]
    )
    return text, instruction, text, str(sum(numbers))


def key_values_to_json(rng: random.Random) -> Example:
    fields = {
        "name": rng.choice(NAMES),
        "city": rng.choice(CITIES),
        "age": rng.randint(18, 90),
        "color": rng.choice(COLORS),
    }
    keys = rng.sample(list(fields), rng.choice([2, 3]))
    text = "\n".join(f"{key}: {fields[key]}" for key in keys)
    instruction = rng.choice(
        [
            "Convert these key: value lines into a JSON object.",
            "Turn the lines into a JSON object.",
            "Rewrite the key: value pairs as JSON.",
        ]
    )
    return text, instruction, text, json.dumps({key: fields[key] for key in keys})


SKILLS: dict[str, Callable[[random.Random], Example]] = {
    "reverse_words": reverse_words,
    "title_dashes": title_dashes,
    "sort_words": sort_words,
    "iso_date": iso_date,
    "number_words": number_words,
    "sum_numbers": sum_numbers,
    "key_values_to_json": key_values_to_json,
}


def make_rows(rng: random.Random) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    train: list[dict[str, str]] = []
    val: list[dict[str, str]] = []
    for skill, draw in SKILLS.items():
        seen: set[str] = set()  # val and train never share an input, so val measures generalization
        examples: list[Example] = []
        while len(examples) < TRAIN_PER_SKILL + VAL_PER_SKILL:
            example = draw(rng)
            if example[0] not in seen:
                seen.add(example[0])
                examples.append(example)
        for i, (_, instruction, input_text, output) in enumerate(examples):
            row = {"instruction": instruction, "input": input_text, "output": output, "skill": skill}
            (val if i < VAL_PER_SKILL else train).append(row)
    # Interleave skills so any prefix of the file (e.g. data.max_samples) holds every skill.
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    train, val = make_rows(random.Random(SEED))
    write_jsonl(OUT_DIR / "text_tools_train.jsonl", train)
    write_jsonl(OUT_DIR / "text_tools_val.jsonl", val)
    print(f"wrote {len(train)} training rows and {len(val)} validation rows to {OUT_DIR}")


if __name__ == "__main__":
    main()
