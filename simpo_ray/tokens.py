"""Preference pairs as tokens: the reference SimPO tokenisation, the fingerprinted on-disk cache
of the tokenised splits, and the collator that pads them into batches.

Tokenisation follows princeton-nlp/SimPO (`run_simpo.py` `apply_chat_template` for the "simpo"
task + `simpo_trainer.py` `tokenize_row`), so a config tuned here trains the same sequences there.
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

from simpo_ray import cache, data
from simpo_ray.config import TrainConfig
from simpo_ray.data import BUNDLED_PREFIX, innermost_reason, is_chat, load_raw
from simpo_ray.errors import UserError
from simpo_ray.loss import IGNORE_INDEX

log = logging.getLogger(__name__)

TOKENISED_COLUMNS = ["prompt", "prompt_input_ids", "chosen_input_ids", "chosen_labels",
                     "rejected_input_ids", "rejected_labels"]
# Config keys that determine the tokenised data; anything else (learning_rate, beta, ...) does not.
DATA_KEYS = ("dataset_mixer", "dataset_splits", "max_length", "max_prompt_length",
             "max_train_samples", "max_eval_samples", "seed")


# --------------------------------------------------------------------------- tokenising


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself puts BOS in front of encoded text (Llama does, Qwen doesn't)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def render_pair(row: dict, tokenizer) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) texts of one normalised row, as the reference renders them.

    Chat rows: prompt = template on ``chosen[:-1]`` with the generation prompt; each answer =
    the template's rendering of the whole conversation after that prompt (so it carries the
    template's end-of-turn text), or the raw answer if the rendering does not extend the prompt.
    """
    if isinstance(row["chosen"], str):
        return row["prompt"], row["chosen"], row["rejected"]
    try:
        prompt = tokenizer.apply_chat_template(row["chosen"][:-1], tokenize=False, add_generation_prompt=True)
        answers = []
        for conv in (row["chosen"], row["rejected"]):
            full = tokenizer.apply_chat_template(conv, tokenize=False)
            answers.append(full[len(prompt):] if full.startswith(prompt) else conv[-1]["content"])
    except Exception as e:  # jinja2 errors, e.g. a template that forbids a system turn
        raise UserError(
            f"the tokenizer's chat template failed on the pair with prompt {row['prompt'][:60]!r}: {innermost_reason(e)}"
        ) from None
    return prompt, answers[0], answers[1]


def truncate_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], *, max_length: int,
    max_prompt_length: int, bos_token_id: int | None = None,
) -> tuple[list[int], list[int], list[int], bool]:
    """The reference's truncation: first the prompt keeps its last ``max_prompt_length`` tokens
    (a leading BOS is kept in front of them), then responses are cut to
    ``max_length - max_prompt_length``; each step only if prompt + longer response > max_length.
    Returns (prompt, chosen, rejected, prompt_was_truncated)."""
    longer = max(len(chosen), len(rejected))
    cut = False
    if len(prompt) + longer > max_length and len(prompt) > max_prompt_length:
        cut = True
        if bos_token_id is not None and prompt[0] == bos_token_id:
            prompt = [bos_token_id] + prompt[len(prompt) - max_prompt_length + 1:]
        else:
            prompt = prompt[-max_prompt_length:]
    if len(prompt) + longer > max_length:
        chosen = chosen[: max_length - max_prompt_length]
        rejected = rejected[: max_length - max_prompt_length]
    return prompt, chosen, rejected, cut


def tokenize_row(row: dict, tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """One normalised row → the reference's token ids and labels (prompt positions = -100)."""
    out = _tokenize_batch({k: [v] for k, v in row.items()}, tokenizer, max_length, max_prompt_length)
    return {k: out[k][0] for k in TOKENISED_COLUMNS}


def _tokenize_batch(batch: dict, tokenizer, max_length: int, max_prompt_length: int) -> dict:
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    texts = [render_pair(row, tokenizer) for row in rows]
    prompts, chosens, rejecteds = (list(t) for t in zip(*texts))
    enc = lambda xs: tokenizer(xs, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = _adds_bos(tokenizer)
    out = {k: [] for k in TOKENISED_COLUMNS + ["prompt_truncated"]}
    for row, p, c, r in zip(rows, enc(prompts), enc(chosens), enc(rejecteds)):
        if add_bos and p[:1] != [bos]:
            p = [bos] + p
        c = c if c[-1:] == [eos] else c + [eos]
        r = r if r[-1:] == [eos] else r + [eos]
        p, c, r, cut = truncate_pair(p, c, r, max_length=max_length, max_prompt_length=max_prompt_length,
                                     bos_token_id=bos)
        out["prompt"].append(row["prompt"])
        out["prompt_input_ids"].append(p)
        out["chosen_input_ids"].append(p + c)
        out["chosen_labels"].append([IGNORE_INDEX] * len(p) + c)
        out["rejected_input_ids"].append(p + r)
        out["rejected_labels"].append([IGNORE_INDEX] * len(p) + r)
        out["prompt_truncated"].append(cut)
    return out


def tokenize_pairs(
    ds: Dataset, tokenizer, max_length: int, max_prompt_length: int, *, num_proc: int | None = None,
    name: str = "dataset", new_fingerprint: str | None = None,
) -> Dataset:
    """Tokenise normalised rows (see `tokenize_row`); logs one warning with the number of
    prompts that were truncated. Output columns: `TOKENISED_COLUMNS`."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos_token; SimPO responses must end with one")
    if is_chat(ds) and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{name}: the data is in chat format (message lists) but the tokenizer has no chat template; "
            "use a tokenizer with a chat template (tokenizer_name_or_path) or give prompt/chosen/rejected as strings"
        )
    out = ds.map(
        _tokenize_batch, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "max_prompt_length": max_prompt_length},
        new_fingerprint=new_fingerprint, desc=f"tokenising {name}",
    )
    n_cut = sum(out["prompt_truncated"])
    if n_cut:
        log.warning("%s: %d of %d pairs do not fit max_length=%d; their prompts were truncated to the "
                    "last %d tokens (max_prompt_length)", name, n_cut, len(out), max_length, max_prompt_length)
    return out.remove_columns("prompt_truncated")


# --------------------------------------------------------------------------- caching


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """Tokenised splits saved with ``save_to_disk``; paths are plain strings (Ray configs, YAML)."""

    train_path: str
    eval_path: str
    num_train: int
    num_eval: int
    fingerprint: str


def tokenizer_identity(tokenizer) -> dict:
    """What about a tokenizer changes its token ids: the full fast-tokenizer spec (vocab, merges,
    normaliser, added tokens) or the vocab, the chat template and the special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "class": type(tokenizer).__name__,
        "spec": hashlib.sha256(spec.encode()).hexdigest(),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "adds_bos": _adds_bos(tokenizer),
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
        "code": [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in (data.__file__, __file__)],
        "config": {k: getattr(cfg, k) for k in DATA_KEYS},
        "sources": {name: _source_identity(name) for name in cfg.dataset_mixer},
        "tokenizer": tokenizer_identity(tokenizer),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_datasets(cfg: TrainConfig, tokenizer, *, cache_dir: str | os.PathLike | None = None) -> PreparedData:
    """Load, tokenise and ``save_to_disk`` train and eval under ``<cache>/data/<fingerprint>``,
    once: later calls (other trials, other workers, other processes) find it there
    (process-safe, see `cache.build_once`)."""
    fp = data_fingerprint(cfg, tokenizer)
    final = (Path(cache_dir) if cache_dir is not None else cache.cache_dir()) / "data" / fp
    built = cache.build_once(final, lambda tmp: _build(cfg, tokenizer, fp, tmp), marker="meta.json")
    meta = json.loads((final / "meta.json").read_text())
    if built:
        log.info("tokenised %d train and %d eval pairs into %s", meta["num_train"], meta["num_eval"], final)
    else:
        log.info("reusing tokenised data %s", final)
    return PreparedData(str(final / "train"), str(final / "eval"), meta["num_train"], meta["num_eval"], fp)


def _build(cfg: TrainConfig, tokenizer, fp: str, out: Path) -> None:
    train, eval_ = load_raw(cfg)
    sizes = {}
    for split, ds in (("train", train), ("eval", eval_)):
        tok = tokenize_pairs(ds, tokenizer, cfg.max_length, cfg.max_prompt_length,
                             num_proc=cfg.preprocessing_num_workers, name=f"{split} data",
                             new_fingerprint=f"{fp}-{split}")
        tok.save_to_disk(str(out / split))
        sizes[f"num_{split}"] = len(tok)
    meta = {**sizes, "fingerprint": fp, "config": {k: getattr(cfg, k) for k in DATA_KEYS}}
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
