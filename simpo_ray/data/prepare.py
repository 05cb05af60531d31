"""Tokenised data prepared once and cached on disk: `prepare_datasets` tokenises a config's data
(`data.tokens`) into `save_to_disk` entries under the cache directory, keyed by a fingerprint of
the data config, the sources, the tokenizer and the code that shapes them; later calls (other
trials, other workers) load it back. The held-out prompts for generation are stored beside it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset

from simpo_ray.data import cache, sources as data
from simpo_ray.data import prompts
from simpo_ray.config import TrainConfig
from simpo_ray.data.sources import BUNDLED_PREFIX, load_raw
from simpo_ray.errors import UserError

from simpo_ray.data import tokens
from simpo_ray.data.tokens import DATA_KEYS, TokenizeOptions, TokenStats, summary_line

log = logging.getLogger(__name__)


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
    # The held-out rows as `prompts.prompt_rows` (JSON lines), in eval order: what the policy
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
                 for f in (data.__file__, __file__, prompts.__file__)],
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
        tok, st = tokens.tokenize_split(ds, tokenizer, cfg.max_length, cfg.max_prompt_length,
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
        for row in prompts.prompt_rows(eval_):
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
