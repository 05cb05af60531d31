"""Preference pairs as tokens: the reference SimPO tokenisation, the fingerprinted on-disk cache
of the tokenised splits, and the collator that pads them into batches.

Tokenisation follows princeton-nlp/SimPO (`run_simpo.py` `apply_chat_template` for the "simpo"
task + `simpo_trainer.py` `tokenize_row` / `build_tokenized_answer`): the ids of a pair are the
tokenizer's ids of the whole rendered conversation, encoded once (BOS in front if missing, EOS at
the end if missing), with the prompt part masked; the assistant header is part of the response,
and an empty system turn is inserted where the reference inserts one. See docs/design.md.
"""

from __future__ import annotations

import dataclasses
import logging

import datasets
from datasets import Dataset

from simpo_ray.data.prompts import keep_end
from simpo_ray.config import TrainConfig
from simpo_ray.data.sources import is_chat
from simpo_ray.errors import UserError, one_line
from simpo_ray.data.collate import IGNORE_INDEX

log = logging.getLogger(__name__)

TOKENISED_COLUMNS = ["prompt", "prompt_input_ids", "chosen_input_ids", "chosen_labels",
                     "rejected_input_ids", "rejected_labels"]
# Config keys that determine the tokenised data; anything else (learning_rate, beta, ...) does not.
DATA_KEYS = ("dataset_mixer", "dataset_splits", "max_length", "max_prompt_length",
             "max_train_samples", "max_eval_samples", "seed", "eval_holdout_fraction", "chat_template",
             "auto_insert_empty_system_msg", "mask_generation_prompt")
# Per-pair flags counted by `tokenize_split` (and dropped from its output).
_FLAGS = ("prompt_truncated", "response_truncated")
_IDS = datasets.List(datasets.Value("int64"))
_FEATURES = datasets.Features({"prompt": datasets.Value("string"), **{k: _IDS for k in TOKENISED_COLUMNS[1:]},
                               **{k: datasets.Value("bool") for k in _FLAGS}})


@dataclasses.dataclass(frozen=True)
class TokenizeOptions:
    """How chat rows are rendered (the `TrainConfig` keys of the same names)."""

    auto_insert_empty_system_msg: bool = True
    mask_generation_prompt: bool = False

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> TokenizeOptions:
        return cls(cfg.auto_insert_empty_system_msg, cfg.mask_generation_prompt)


# --------------------------------------------------------------------------- rendering


def _template_text(tokenizer) -> str:
    tpl = getattr(tokenizer, "chat_template", None) or ""
    return tpl.get("default", "") if isinstance(tpl, dict) else tpl


def inserts_system_turn(tokenizer) -> bool:
    """alignment-handbook's `maybe_insert_system_message` condition: the template mentions
    "system" or "<|im_start|>"."""
    tpl = _template_text(tokenizer)
    return "system" in tpl or "<|im_start|>" in tpl


def render_pair(row: dict, tokenizer, options: TokenizeOptions = TokenizeOptions()) -> tuple[str, str, str]:
    """(prompt, chosen answer, rejected answer) texts of one normalised row, so that prompt +
    answer is the whole rendered conversation.

    Chat rows, as the reference: the prompt turns are ``chosen[:-1]`` (an empty system turn in
    front when `inserts_system_turn` and ``auto_insert_empty_system_msg``), rendered without the
    generation prompt (with it if ``mask_generation_prompt``); each answer is the rest of the
    template's rendering of prompt turns + that answer's last turn. (The reference renders the
    last turn alone and strips a leading BOS: the same text for templates that render a turn the
    same wherever it stands; where the rest of the whole conversation does not start with the
    prompt text, that rendering is used.) String rows: the strings as they are.
    """
    if isinstance(row["chosen"], str):
        return row["prompt"], row["chosen"], row["rejected"]
    turns = list(row["chosen"][:-1])
    if (options.auto_insert_empty_system_msg and (not turns or turns[0]["role"] != "system")
            and inserts_system_turn(tokenizer)):
        turns = [{"role": "system", "content": ""}] + turns
    try:
        prompt = tokenizer.apply_chat_template(turns, tokenize=False,
                                               add_generation_prompt=options.mask_generation_prompt)
        answers = []
        for last in (row["chosen"][-1], row["rejected"][-1]):
            full = tokenizer.apply_chat_template(turns + [last], tokenize=False)
            if full.startswith(prompt):
                answers.append(full[len(prompt):])
            elif options.mask_generation_prompt:
                answers.append(last["content"])
            else:  # the reference's own rendering of the answer
                alone = tokenizer.apply_chat_template([last], tokenize=False)
                bos = tokenizer.bos_token
                answers.append(alone[len(bos):] if bos and alone.startswith(bos) else alone)
    except Exception as e:  # jinja2 errors, e.g. a template that forbids a system turn
        raise UserError(
            f"the tokenizer's chat template failed on the pair with prompt {row['prompt'][:60]!r}: {one_line(e, first=True, innermost=True)}"
        ) from None
    return prompt, answers[0], answers[1]


# --------------------------------------------------------------------------- token ids


def split_prompt(prompt_ids: list[int], full_ids: list[int]) -> int:
    """Where the answer starts in ``full_ids`` (the whole text, encoded once): after the prompt's
    own ids, one earlier when the prompt's last token merged with the answer's first
    (`build_tokenized_answer`)."""
    start = len(prompt_ids)
    if full_ids[:start] != prompt_ids:
        start -= 1
    return max(0, min(start, len(full_ids)))


def truncate_pair(
    prompts: list[list[int]], answers: list[list[int]], *, max_length: int, max_prompt_length: int,
    bos_token_id: int | None = None,
) -> tuple[list[list[int]], list[list[int]], bool, bool]:
    """The reference's truncation of one pair's sequences (``prompts``: each sequence's prompt
    part, e.g. chosen's, rejected's and the bare prompt; ``answers``: chosen's and rejected's).
    First each prompt whose length + the longer answer exceeds ``max_length`` keeps its last
    ``max_prompt_length`` tokens (keep-end; a leading BOS stays in front, where the reference
    drops it), then, where that is still too long, the answers keep their first
    ``max_length - max_prompt_length`` tokens. Returns (prompts, answers, a prompt was cut, an
    answer was cut)."""
    longer = max(len(a) for a in answers)
    prompt_cut = answer_cut = False
    out_prompts = []
    for p in prompts:
        if len(p) + longer > max_length and len(p) > max_prompt_length:
            p, prompt_cut = keep_end(p, max_prompt_length, bos_token_id), True
        out_prompts.append(p)
    out_answers = []
    for p, a in zip(out_prompts, answers):
        if len(p) + longer > max_length and len(a) > max_length - max_prompt_length:
            a, answer_cut = a[: max_length - max_prompt_length], True
        out_answers.append(a)
    return out_prompts, out_answers, prompt_cut, answer_cut


def tokenize_row(row: dict, tokenizer, max_length: int, max_prompt_length: int,
                 options: TokenizeOptions = TokenizeOptions()) -> dict | None:
    """One normalised row → the reference's token ids and labels (prompt positions = -100);
    None when the pair is dropped (a response with no labelled token)."""
    out = _tokenize_batch({k: [v] for k, v in row.items()}, tokenizer, max_length, max_prompt_length, options)
    return {k: out[k][0] for k in TOKENISED_COLUMNS} if out["prompt"] else None


def _tokenize_batch(batch: dict, tokenizer, max_length: int, max_prompt_length: int,
                    options: TokenizeOptions = TokenizeOptions()) -> dict:
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    texts = [render_pair(row, tokenizer, options) for row in rows]
    enc = lambda xs: tokenizer(xs, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt_ids = enc([p for p, _, _ in texts])
    chosen_ids = enc([p + c for p, c, _ in texts])
    rejected_ids = enc([p + r for p, _, r in texts])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = {k: [] for k in TOKENISED_COLUMNS + list(_FLAGS)}
    for row, p, fc, fr in zip(rows, prompt_ids, chosen_ids, rejected_ids):
        prompts, answers = [], []
        for full in (fc, fr):
            start = split_prompt(p, full)
            prompts.append(full[:start])
            answers.append(full[start:])
        prompts.append(p[: min(len(prompts[0]), len(prompts[1]))])  # the bare prompt (reference)
        if bos is not None:
            prompts = [x if x[:1] == [bos] else [bos] + x for x in prompts]
        answers = [a if a[-1:] == [eos] else a + [eos] for a in answers]
        prompts, answers, prompt_cut, answer_cut = truncate_pair(
            prompts, answers, max_length=max_length, max_prompt_length=max_prompt_length, bos_token_id=bos)
        labels = [[IGNORE_INDEX] * len(x) + a for x, a in zip(prompts, answers)]
        # A label at position 0 is never predicted (labels are shifted): such a response has no
        # token to average over (the reference would give NaN); the pair is dropped.
        if any(all(t == IGNORE_INDEX for t in lab[1:]) for lab in labels):
            continue
        out["prompt"].append(row["prompt"])
        out["prompt_input_ids"].append(prompts[2])
        out["chosen_input_ids"].append(prompts[0] + answers[0])
        out["chosen_labels"].append(labels[0])
        out["rejected_input_ids"].append(prompts[1] + answers[1])
        out["rejected_labels"].append(labels[1])
        out["prompt_truncated"].append(prompt_cut)
        out["response_truncated"].append(answer_cut)
    return out


@dataclasses.dataclass(frozen=True)
class TokenStats:
    """What tokenising one split did: pairs in, pairs kept, and how many of the kept pairs had a
    prompt, resp. a response, truncated."""

    pairs: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0

    @property
    def dropped(self) -> int:
        return self.pairs - self.kept


def tokenize_split(
    ds: Dataset, tokenizer, max_length: int, max_prompt_length: int, *, num_proc: int | None = None,
    name: str = "dataset", new_fingerprint: str | None = None, options: TokenizeOptions = TokenizeOptions(),
) -> tuple[Dataset, TokenStats]:
    """Tokenise normalised rows (see `tokenize_row`): (the kept pairs, with `TOKENISED_COLUMNS`;
    the counts)."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos_token; SimPO responses must end with one")
    if is_chat(ds) and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{name}: the data is in chat format (message lists) but the tokenizer has no chat template; "
            "use a tokenizer with a chat template (tokenizer_name_or_path), set chat_template, or give "
            "prompt/chosen/rejected as strings"
        )
    out = ds.map(
        _tokenize_batch, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "max_prompt_length": max_prompt_length,
                   "options": options},
        features=_FEATURES, new_fingerprint=new_fingerprint, desc=f"tokenising {name}",
    )
    stats = TokenStats(pairs=len(ds), kept=len(out), prompt_truncated=sum(out["prompt_truncated"]),
                       response_truncated=sum(out["response_truncated"]))
    return out.remove_columns(list(_FLAGS)), stats


def tokenize_pairs(
    ds: Dataset, tokenizer, max_length: int, max_prompt_length: int, *, num_proc: int | None = None,
    name: str = "dataset", new_fingerprint: str | None = None, options: TokenizeOptions = TokenizeOptions(),
) -> Dataset:
    """`tokenize_split` that logs its counts in one warning line (when there is something to
    say) and returns the kept pairs."""
    out, stats = tokenize_split(ds, tokenizer, max_length, max_prompt_length, num_proc=num_proc, name=name,
                                new_fingerprint=new_fingerprint, options=options)
    line = summary_line({name: stats}, max_length, max_prompt_length)
    if line:
        log.warning("%s", line)
    return out


def summary_line(stats: dict[str, TokenStats], max_length: int, max_prompt_length: int,
                 notes: list[str] = ()) -> str:
    """One line with the truncated and dropped pairs per split and the ``notes`` (e.g. the eval
    rows held out of a single file); "" when there is nothing to say."""
    parts = list(notes)
    cut = {k: s for k, s in stats.items() if s.prompt_truncated or s.response_truncated}
    if cut:
        parts.append(
            f"pairs longer than max_length={max_length} truncated: " + ", ".join(
                f"{k} {s.prompt_truncated} prompts (to their last {max_prompt_length} tokens) and "
                f"{s.response_truncated} responses (to {max_length - max_prompt_length} tokens) of {s.kept} pairs"
                for k, s in cut.items())
        )
    dropped = {k: s for k, s in stats.items() if s.dropped}
    if dropped:
        parts.append("dropped (a response with no labelled token): " + ", ".join(
            f"{k} {s.dropped} of {s.pairs} pairs" for k, s in dropped.items()))
    return "; ".join(parts)


# --------------------------------------------------------------------------- caching


# --------------------------------------------------------------------------- batching


