"""The bundled task: sort a short string of digits (``sort: 5301`` -> ``0135``).

The answer is verifiable, so a model's held-out success rate is exact, and the difficulty grows
with the length, so a briefly SFT-trained tiny model gets the short lists right and the long
ones wrong: preference optimisation has room to help. Rejected answers are the mistakes such a
model makes (a digit dropped, duplicated or replaced so the answer still looks sorted, two
digits swapped, the list left unsorted or reversed, extra digits appended); duplicates and
extras make a rejected answer longer than the chosen one, which is what SimPO's
length-normalised reward is for.

Train and test prompts are disjoint by construction: a prompt belongs to ``test_prefs`` iff a
stable hash of it falls in a fixed bucket, whatever the seed or ``n``.

``bundled:sort-verbose`` is the same task with a length bias in its labels (see `FILLER`): the
case the length-controlled win rate exists for.
"""

from __future__ import annotations

import random
import re
import zlib

import datasets

PREFIX = "sort: "
DIGITS = "0123456789"
MIN_LEN, MAX_LEN = 3, 8
# Completion budget for generation: the longest answer plus slack for a rambling model.
MAX_ANSWER_TOKENS = MAX_LEN + 4

ERROR_TYPES = ("drop", "duplicate", "substitute", "swap", "unsorted", "reverse", "extra")
# Mostly subtle errors (an SFT model already spots an out-of-order answer); the longer-than-
# chosen ones ("duplicate", "extra") are about 30% of pairs.
ERROR_WEIGHTS = (0.25, 0.2, 0.25, 0.1, 0.05, 0.05, 0.1)

SPLITS = {
    # split: (default n, default seed, default label noise)
    "train_prefs": (4000, 0, 0.1),
    # Clean labels, so preference accuracy on it is measured against the verified answer.
    "test_prefs": (512, 1, 0.0),
}
TEST_BUCKETS = 8  # one prompt in TEST_BUCKETS goes to test_prefs

# ---- the length-biased variant, `bundled:sort-verbose`
# An answer may end with a filler tail, FILLER one to MAX_FILLERS times ("0135 ok ok"), that
# adds nothing; the raters who labelled the pairs liked it anyway: the chosen answer carries a
# tail in VERBOSE_CHOSEN of the pairs, the rejected one in VERBOSE_REJECTED (drawn apart). A
# reward model trained on these pairs (`bundled:reward-verbose`) learns to score the tail up,
# and a policy trained on them learns to write it; the checked success rate ignores the tail
# (`content`), so verbosity neither helps nor hurts an answer. A win rate that rises with it
# measures the length bias, which the length-controlled win rate is meant to remove.
FILLER = " ok"
MAX_FILLERS = 4
VERBOSE_CHOSEN, VERBOSE_REJECTED = 0.6, 0.2
VERBOSE_MAX_ANSWER_TOKENS = MAX_LEN + MAX_FILLERS * len(FILLER) + 4
DATASETS = {"bundled:sort": False, "bundled:sort-verbose": True}  # name -> verbose
_WORD = FILLER.strip()
# Whole fillers at the end, then perhaps the start of one more (cut by the token budget).
_TAIL = re.compile(rf"(?:\s+{re.escape(_WORD)})+(?:\s+(?:{'|'.join(re.escape(_WORD[:k]) for k in range(1, len(_WORD)))}))?$")


def is_verbose(dataset_names) -> bool:
    """Whether any of `dataset_names` is the verbose variant (its tail-blind check then applies)."""
    return any(DATASETS.get(n, False) for n in dataset_names)


def answer_budget(verbose: bool = False) -> int:
    """Tokens a generated answer may take: the longest answer, its tail, and slack."""
    return VERBOSE_MAX_ANSWER_TOKENS if verbose else MAX_ANSWER_TOKENS


def content(completion: str) -> str:
    """The answer without its filler tail (and surrounding whitespace): ``"0135 ok ok"`` ->
    ``"0135"``; a tail cut short by the token budget after a whole filler too (``"0135 ok o"``)."""
    return _TAIL.sub("", completion.strip())


def _digits_of(prompt: str) -> str:
    if not prompt.startswith(PREFIX):
        raise ValueError(f"not a bundled sort prompt: {prompt!r}")
    return prompt[len(PREFIX):].strip()


def answer(prompt: str) -> str:
    """The correct completion for ``prompt``: its digits in ascending order."""
    return "".join(sorted(_digits_of(prompt)))


def check(prompt: str, completion: str, *, verbose: bool = False) -> bool:
    """True iff ``completion`` (surrounding whitespace ignored; with ``verbose``, its filler tail
    too) is the sorted digit string."""
    return (content(completion) if verbose else completion.strip()) == answer(prompt)


def is_test_prompt(prompt: str) -> bool:
    """Which split a prompt belongs to; a stable hash, so splits never share a prompt."""
    return zlib.crc32(prompt.encode()) % TEST_BUCKETS == 0


def corrupt(correct: str, kind: str, rng: random.Random) -> str:
    """A wrong answer of the given error type derived from the sorted ``correct`` string."""
    s = list(correct)
    n = len(s)
    if kind == "drop":
        del s[rng.randrange(n)]
    elif kind == "duplicate":
        i = rng.randrange(n)
        s.insert(i, s[i])
    elif kind == "substitute":
        # Replace one digit by another that keeps the answer sorted: looks right, is wrong.
        for i in rng.sample(range(n), n):
            lo = s[i - 1] if i > 0 else "0"
            hi = s[i + 1] if i < n - 1 else "9"
            options = [d for d in DIGITS if lo <= d <= hi and d != s[i]]
            if options:
                s[i] = rng.choice(options)
                break
    elif kind == "swap":
        # Swap two distinct digits (adjacent ones where possible: the subtle mistake).
        pairs = [i for i in range(n - 1) if s[i] != s[i + 1]]
        if pairs:
            i = rng.choice(pairs)
            s[i], s[i + 1] = s[i + 1], s[i]
    elif kind == "unsorted":
        rng.shuffle(s)
    elif kind == "reverse":
        s.reverse()
    elif kind == "extra":
        s.extend(rng.choice(DIGITS) for _ in range(rng.randint(1, 3)))
    else:
        raise ValueError(f"unknown error type {kind!r}; allowed: {ERROR_TYPES}")
    return "".join(s)


def _tail(text: str, p: float, rng: random.Random) -> str:
    """`text`, with probability `p` followed by FILLER one to MAX_FILLERS times."""
    return text + FILLER * rng.randint(1, MAX_FILLERS) if rng.random() < p else text


def _row(prompt: str, chosen: str, rejected: str) -> dict:
    user = {"role": "user", "content": prompt}
    return {
        "prompt": prompt,
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [user, {"role": "assistant", "content": rejected}],
    }


def generate_pairs(
    n: int,
    *,
    seed: int,
    label_noise: float = 0.1,
    split: str | None = None,
    min_len: int = MIN_LEN,
    max_len: int = MAX_LEN,
    verbose: bool = False,
) -> list[dict]:
    """``n`` preference pairs in UltraFeedback chat format, deterministic in ``seed``.

    ``label_noise`` is the fraction of pairs (exactly ``round(label_noise * n)``) whose chosen
    and rejected answers are swapped. ``split`` ("train_prefs"/"test_prefs") keeps only prompts
    of that split; None draws from all prompts. ``verbose``: the length-biased variant (filler
    tails on VERBOSE_CHOSEN of the chosen and VERBOSE_REJECTED of the rejected answers, drawn
    before the label noise swaps pairs); without it the pairs are those of ``bundled:sort``.
    """
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise={label_noise} must be in [0, 1]")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    if split not in (None, *SPLITS):
        raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        digits = "".join(rng.choice(DIGITS) for _ in range(rng.randint(min_len, max_len)))
        prompt = PREFIX + digits
        if split is not None and is_test_prompt(prompt) != (split == "test_prefs"):
            continue
        correct = answer(prompt)
        wrong = correct
        while wrong == correct:  # e.g. "unsorted" can reshuffle into sorted order; "000" can't err by swap
            kind = rng.choices(ERROR_TYPES, weights=ERROR_WEIGHTS)[0]
            wrong = corrupt(correct, kind, rng)
        if verbose:
            correct, wrong = _tail(correct, VERBOSE_CHOSEN, rng), _tail(wrong, VERBOSE_REJECTED, rng)
        rows.append(_row(prompt, correct, wrong))
    for i in rng.sample(range(n), round(label_noise * n)):
        r = rows[i]
        rows[i] = _row(r["prompt"], r["rejected"][1]["content"], r["chosen"][1]["content"])
    return rows


def load_split(
    split: str, *, n: int | None = None, seed: int | None = None, label_noise: float | None = None,
    verbose: bool = False,
) -> datasets.Dataset:
    """``train_prefs`` (4000 rows, 10% label noise) or ``test_prefs`` (512 rows, clean) as a
    Dataset; ``verbose``: of ``bundled:sort-verbose``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {list(SPLITS)}")
    d_n, d_seed, d_noise = SPLITS[split]
    rows = generate_pairs(
        d_n if n is None else n,
        seed=d_seed if seed is None else seed,
        label_noise=d_noise if label_noise is None else label_noise,
        split=split,
        verbose=verbose,
    )
    return datasets.Dataset.from_list(rows)
