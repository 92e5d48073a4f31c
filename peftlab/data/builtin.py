"""Built-in tasks generated in code, so peftlab trains and evaluates with no data at all.

Each task maps a seeded ``random.Random`` to one ``(prompt, answer)`` pair with a single exact
answer, short enough (~10 tokens of prompt text) that a 135M model learns it in a few hundred
steps and exact match measures it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

Task = Callable[[random.Random], tuple[str, str]]


def _sort(rng: random.Random) -> tuple[str, str]:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    return f"Sort ascending: {' '.join(map(str, nums))}", " ".join(map(str, sorted(nums)))


def _reverse(rng: random.Random) -> tuple[str, str]:
    letters = rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 6))
    return f"Reverse: {' '.join(letters)}", " ".join(reversed(letters))


def _arith(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return f"Compute: {a} + {b}", str(a + b)
    a, b = max(a, b), min(a, b)  # keep answers non-negative
    return f"Compute: {a} - {b}", str(a - b)


def _max(rng: random.Random) -> tuple[str, str]:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    return f"Largest of: {' '.join(map(str, nums))}", str(max(nums))


def _upper(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, k=rng.randint(2, 3))
    return f"Uppercase: {' '.join(words)}", " ".join(words).upper()


_WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "music",
    "paper",
    "light",
    "table",
    "horse",
    "smile",
    "bread",
    "ocean",
    "winter",
    "tiger",
    "glass",
    "dream",
    "plant",
    "chair",
    "money",
]

TASKS: dict[str, Task] = {
    "sort": _sort,
    "reverse": _reverse,
    "arith": _arith,
    "max": _max,
    "upper": _upper,
}


def generate(task: str, n: int, seed: int) -> list[dict]:
    """``n`` examples of ``task`` as chat messages (user prompt, assistant answer).

    The same ``(task, n, seed)`` always gives the same examples, in the same order.
    """
    from peftlab.data.readers import DataError

    if task not in TASKS:
        raise DataError(
            f"data=builtin:{task} is not a built-in task; built-in tasks: "
            f"{', '.join('builtin:' + t for t in TASKS)}"
        )
    rng = random.Random(f"{task}:{seed}")  # string seeds hash deterministically across runs
    out = []
    for _ in range(n):
        prompt, answer = TASKS[task](rng)
        out.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return out
