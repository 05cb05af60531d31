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
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets import Dataset

from simpo_ray import cache, data, generation
from simpo_ray.config import TrainConfig
from simpo_ray.data import BUNDLED_PREFIX, innermost_reason, is_chat, load_raw
from simpo_ray.errors import UserError
from simpo_ray.loss import IGNORE_INDEX

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
            f"the tokenizer's chat template failed on the pair with prompt {row['prompt'][:60]!r}: {innermost_reason(e)}"
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


def _keep_end(prompt: list[int], max_prompt_length: int, bos: int | None) -> list[int]:
    """The prompt's last ``max_prompt_length`` tokens, a leading BOS kept in front of them."""
    if bos is not None and prompt[:1] == [bos]:
        return [bos] + prompt[len(prompt) - max_prompt_length + 1:]
    return prompt[-max_prompt_length:]


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
            p, prompt_cut = _keep_end(p, max_prompt_length, bos_token_id), True
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


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """Tokenised splits saved with ``save_to_disk``; paths are plain strings (Ray configs, YAML)."""

    train_path: str
    eval_path: str
    num_train: int
    num_eval: int
    fingerprint: str
    # One line: pairs truncated or dropped per split, eval rows held out of a single file; "" if
    # none. `prepare_datasets` logs it (a warning, which the CLIs show) on every run, cached or not.
    summary: str = ""
    # The held-out rows as `generation.prompt_rows` (JSON lines), in eval order: what the policy
    # answers and the reward model judges. "" for data prepared before it existed.
    prompts_path: str = ""

    def prompt_rows(self, n: int) -> list[dict]:
        """The first `n` held-out prompt rows (the fixed generation sample)."""
        if n <= 0 or not self.prompts_path:
            return []
        rows = []
        with open(self.prompts_path) as f:
            for line in f:
                if len(rows) == n:
                    break
                rows.append(json.loads(line))
        return rows


def tokenizer_identity(tokenizer) -> dict:
    """What about a tokenizer changes its token ids: the full fast-tokenizer spec (vocab, merges,
    normaliser, added tokens) or the vocab, the chat template and the special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "class": type(tokenizer).__name__,
        "spec": hashlib.sha256(spec.encode()).hexdigest(),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "bos": tokenizer.bos_token, "eos": tokenizer.eos_token,
    }


def _source_identity(name: str) -> Any:
    """Local files by size and mtime (an edited file re-tokenises); the bundled task by its code."""
    if name.startswith(BUNDLED_PREFIX):
        from simpo_ray.bundled import task

        return hashlib.sha256(Path(task.__file__).read_bytes()).hexdigest()
    path = Path(name).expanduser()
    files = sorted(path.rglob("*")) if path.is_dir() else [path] if path.is_file() else []
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]


def data_fingerprint(cfg: TrainConfig, tokenizer) -> str:
    """Hash of the data-relevant config keys, the sources and the tokenizer (not of learning
    rate, beta, ...: every trial of a search shares one tokenised copy)."""
    recipe = {
        # An edit to the loading or the tokenising code re-tokenises.
        "code": [hashlib.sha256(Path(f).read_bytes()).hexdigest()
                 for f in (data.__file__, __file__, generation.__file__)],
        "config": {k: getattr(cfg, k) for k in DATA_KEYS},
        "sources": {name: _source_identity(name) for name in cfg.dataset_mixer},
        "tokenizer": tokenizer_identity(tokenizer),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_datasets(cfg: TrainConfig, tokenizer, *, cache_dir: str | os.PathLike | None = None) -> PreparedData:
    """Load, tokenise and ``save_to_disk`` train and eval under ``<cache>/data/<fingerprint>``,
    once: later calls (other trials, other workers, other processes) find it there
    (process-safe, see `cache.build_once`). The counts of truncated and dropped pairs and the
    held-out note are stored with the data and logged (`PreparedData.summary`) on every call."""
    fp = data_fingerprint(cfg, tokenizer)
    final = (Path(cache_dir) if cache_dir is not None else cache.cache_dir()) / "data" / fp
    built = cache.build_once(final, lambda tmp: _build(cfg, tokenizer, fp, tmp), marker="meta.json")
    meta = json.loads((final / "meta.json").read_text())
    if built:
        log.info("tokenised %d train and %d eval pairs into %s", meta["num_train"], meta["num_eval"], final)
    else:
        log.info("reusing tokenised data %s", final)
    stats = {f"{split} data": TokenStats(**meta["stats"][split]) for split in ("train", "eval")}
    summary = summary_line(stats, cfg.max_length, cfg.max_prompt_length, meta.get("notes", []))
    if summary:
        log.warning("%s", summary)
    return PreparedData(str(final / "train"), str(final / "eval"), meta["num_train"], meta["num_eval"], fp,
                        summary, str(final / "prompts.jsonl"))


def _build(cfg: TrainConfig, tokenizer, fp: str, out: Path) -> None:
    notes: list[str] = []
    train, eval_ = load_raw(cfg, notes)
    sizes, stats = {}, {}
    for split, ds in (("train", train), ("eval", eval_)):
        tok, st = tokenize_split(ds, tokenizer, cfg.max_length, cfg.max_prompt_length,
                                 num_proc=cfg.preprocessing_num_workers, name=f"{split} data",
                                 new_fingerprint=f"{fp}-{split}", options=TokenizeOptions.from_config(cfg))
        if st.kept == 0:
            raise UserError(
                f"{split} data: all {st.pairs} pairs were dropped: no response has a labelled token within "
                f"max_length={cfg.max_length} (max_prompt_length={cfg.max_prompt_length})"
            )
        tok.save_to_disk(str(out / split))
        sizes[f"num_{split}"] = len(tok)
        stats[split] = dataclasses.asdict(st)
    with open(out / "prompts.jsonl", "w") as f:
        for row in generation.prompt_rows(eval_):
            f.write(json.dumps(row) + "\n")
    meta = {**sizes, "fingerprint": fp, "config": {k: getattr(cfg, k) for k in DATA_KEYS}, "stats": stats,
            "notes": notes}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def load_prepared(path: str | os.PathLike) -> Dataset:
    """A tokenised split from `prepare_datasets` (memory-mapped Arrow, loads in milliseconds)."""
    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"no prepared dataset at {path} (was the cache dir deleted?)") from None


# --------------------------------------------------------------------------- batching


class PairCollator:
    """Pads a list of tokenised rows into tensors.

    ``chosen_*``/``rejected_*`` are right-padded (each to its own batch max): input ids with
    ``pad_token_id``, labels with -100, attention mask 0. ``prompt_input_ids`` and
    ``prompt_attention_mask`` are left-padded, ready for ``generate``.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        for side in ("chosen", "rejected"):
            ids = [r[f"{side}_input_ids"] for r in rows]
            batch[f"{side}_input_ids"] = _pad(ids, self.pad_token_id)
            batch[f"{side}_attention_mask"] = _pad([[1] * len(x) for x in ids], 0)
            batch[f"{side}_labels"] = _pad([r[f"{side}_labels"] for r in rows], IGNORE_INDEX)
        if all("prompt_input_ids" in r for r in rows):
            prompts = [r["prompt_input_ids"] for r in rows]
            batch["prompt_input_ids"] = _pad(prompts, self.pad_token_id, left=True)
            batch["prompt_attention_mask"] = _pad([[1] * len(x) for x in prompts], 0, left=True)
        return batch


def _pad(seqs: list[list[int]], value: int, *, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        start = width - len(s) if left else 0
        out[i, start:start + len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out
