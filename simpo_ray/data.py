"""Preference data: load and mix sources, tokenise as the SimPO reference does, cache, collate.

Sources (keys of `dataset_mixer`) are Hugging Face Hub dataset names, local `.json`/`.jsonl`/
`.parquet` files (or a directory of `<split>.jsonl` etc.), or `bundled:sort`. Rows are either
plain strings (`prompt`, `chosen`, `rejected`) or UltraFeedback-style chat conversations
(`chosen`/`rejected` message lists ending in the assistant turn, `prompt` optional).

Tokenisation follows princeton-nlp/SimPO (`run_simpo.py` `apply_chat_template` for the "simpo"
task + `simpo_trainer.py` `tokenize_row`), so a config tuned here trains the same sequences there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
import torch
from datasets import Dataset, Features, List, Value

from simpo_ray.config import TrainConfig
from simpo_ray.errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
BUNDLED_PREFIX = "bundled:"
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# A single local file has no splits: this share of its rows (at least one) becomes the eval split.
HOLDOUT_FRACTION = 0.05
HOLDOUT_SEED = 0  # fixed, so the eval rows do not move with the training seed
# Config keys that determine the tokenised data; anything else (learning_rate, beta, ...) does not.
DATA_KEYS = ("dataset_mixer", "dataset_splits", "max_length", "max_prompt_length",
             "max_train_samples", "max_eval_samples", "seed")

_MESSAGES = List({"role": Value("string"), "content": Value("string")})
CHAT_FEATURES = Features({"prompt": Value("string"), "chosen": _MESSAGES, "rejected": _MESSAGES})
STRING_FEATURES = Features({"prompt": Value("string"), "chosen": Value("string"), "rejected": Value("string")})
TOKENISED_COLUMNS = ["prompt", "prompt_input_ids", "chosen_input_ids", "chosen_labels",
                     "rejected_input_ids", "rejected_labels"]


def default_cache_dir() -> Path:
    """``$SIMPO_RAY_CACHE`` or ``~/.cache/simpo_ray``."""
    return Path(os.environ.get("SIMPO_RAY_CACHE") or Path.home() / ".cache" / "simpo_ray")


# --------------------------------------------------------------------------- loading


def load_raw(cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    """(train, eval) mixed from ``cfg.dataset_mixer``, normalised to ``prompt``/``chosen``/``rejected``.

    As alignment-handbook's ``mix_datasets``: each source's train split is subsampled to
    ``int(fraction * len)`` rows (the first rows of a shuffle seeded with ``cfg.seed``), eval
    splits are used whole; both concatenations are shuffled with ``cfg.seed`` and then cut to
    ``max_train_samples`` / ``max_eval_samples``. A single local file has no splits: a fixed 5%
    of its rows (at least one) is held out as its eval split whatever ``dataset_splits`` says.
    """
    train_split, eval_split = cfg.dataset_splits
    trains, evals = [], []
    for name, frac in cfg.dataset_mixer.items():
        train, eval_ = _load_source(name, train_split, eval_split)
        keep = int(frac * len(train))
        if keep == 0:
            raise UserError(f"dataset '{name}': fraction {frac} of its {len(train)} train rows leaves no rows")
        if keep < len(train):
            train = train.shuffle(seed=cfg.seed).select(range(keep))
        trains.append((name, train))
        evals.append((name, eval_))
    train = _concat(trains).shuffle(seed=cfg.seed)
    eval_ = _concat(evals).shuffle(seed=cfg.seed)
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(train):
        train = train.select(range(cfg.max_train_samples))
    if cfg.max_eval_samples is not None and cfg.max_eval_samples < len(eval_):
        eval_ = eval_.select(range(cfg.max_eval_samples))
    return train, eval_


def _concat(named: list[tuple[str, Dataset]]) -> Dataset:
    kinds = {name: is_chat(ds) for name, ds in named}
    if len(set(kinds.values())) > 1:
        chat = [n for n, c in kinds.items() if c]
        plain = [n for n, c in kinds.items() if not c]
        raise UserError(
            f"dataset_mixer mixes chat-format datasets ({', '.join(chat)}) with plain-string datasets "
            f"({', '.join(plain)}); convert them to one format"
        )
    return datasets.concatenate_datasets([ds for _, ds in named])


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix in LOCAL_SUFFIXES


def _load_source(name: str, train_split: str, eval_split: str) -> tuple[Dataset, Dataset]:
    """One mixer entry's (train, eval), normalised."""
    path = Path(name).expanduser()
    if path.is_file():
        ds = normalise(_read_file(name, path), name)  # row numbers in errors are the file's
        if len(ds) < 2:
            raise UserError(f"dataset '{name}': needs at least 2 rows to hold out an eval row, has {len(ds)}")
        n_eval = max(1, round(HOLDOUT_FRACTION * len(ds)))
        parts = ds.train_test_split(test_size=n_eval, shuffle=True, seed=HOLDOUT_SEED)
        return parts["train"], parts["test"]
    if name.startswith(BUNDLED_PREFIX):
        load = _load_bundled
    elif path.is_dir():
        load = lambda name, split: _read_dir_split(name, path, split)  # noqa: E731
    elif _looks_local(name):
        raise UserError(f"dataset '{name}': no such file or directory")
    else:
        load = _load_hub
    return tuple(normalise(load(name, split), name, split) for split in (train_split, eval_split))


def _load_bundled(name: str, split: str) -> Dataset:
    from simpo_ray.bundled import task

    if name != "bundled:sort":
        raise UserError(f"dataset '{name}': unknown bundled dataset; the bundled dataset is 'bundled:sort'")
    if split not in task.SPLITS:
        raise UserError(f"dataset '{name}': unknown split '{split}'; available: {', '.join(task.SPLITS)}")
    return task.load_split(split)


def _read_file(name: str, path: Path) -> Dataset:
    builder = LOCAL_SUFFIXES.get(path.suffix)
    if builder is None:
        raise UserError(
            f"dataset '{name}': unsupported file type '{path.suffix}'; use .json, .jsonl or .parquet"
        )
    try:
        # Empty files: datasets' own errors for them are obscure (StopIteration, "BatchSize").
        empty = path.stat().st_size == 0 or (builder == "parquet" and pq.ParquetFile(path).metadata.num_rows == 0)
        if empty:
            raise UserError(f"dataset '{name}': {path.name} has no rows")
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except UserError:
        raise
    except Exception as e:  # datasets wraps pyarrow/json errors in several types
        raise UserError(f"dataset '{name}': cannot read {path.name}: {_reason(e)}") from None
    if len(ds) == 0:
        raise UserError(f"dataset '{name}': {path.name} has no rows")
    return ds


def _read_dir_split(name: str, path: Path, split: str) -> Dataset:
    if (path / "dataset_dict.json").is_file():  # a DatasetDict written by save_to_disk
        dd = datasets.load_from_disk(str(path))
        if split not in dd:
            raise UserError(f"dataset '{name}': unknown split '{split}'; available: {', '.join(dd)}")
        return dd[split]
    for suffix in LOCAL_SUFFIXES:
        if (path / f"{split}{suffix}").is_file():
            return _read_file(name, path / f"{split}{suffix}")
    found = sorted(p.stem for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
    raise UserError(
        f"dataset '{name}': unknown split '{split}' (no {split}.jsonl, .json or .parquet in the directory); "
        f"available: {', '.join(found) or 'none'}"
    )


def _load_hub(name: str, split: str) -> Dataset:
    try:
        return datasets.load_dataset(name, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise UserError(f"dataset '{name}': unknown split '{split}': {_reason(e)}") from None
        raise UserError(f"cannot load dataset '{name}' from the Hugging Face Hub: {_reason(e)}") from None
    except Exception as e:
        raise UserError(
            f"cannot load dataset '{name}' from the Hugging Face Hub: {_reason(e)}; "
            "for offline use pass a local .jsonl/.parquet file or bundled:sort"
        ) from None


def _reason(e: BaseException) -> str:
    """First line of the innermost error (datasets wraps the informative pyarrow one)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# --------------------------------------------------------------------------- normalising


def is_chat(ds: Dataset) -> bool:
    """True when ``chosen`` holds message lists rather than strings."""
    return isinstance(ds.features["chosen"], (List, list, datasets.Sequence))


def normalise(ds: Dataset, name: str, split: str | None = None) -> Dataset:
    """Columns ``prompt`` (str), ``chosen``, ``rejected`` (both str, or both full conversations).

    Chat rows end with the assistant turn; the prompt turns are ``chosen[:-1]`` (the reference
    rule). A chat row whose ``chosen`` is the assistant turn alone gets its prompt turns from the
    ``prompt`` column (a string becomes one user turn; a message list is used as is). The
    ``prompt`` string is the source's, or the last user turn of the conversation.
    """
    where = f"dataset '{name}'" + (f" (split '{split}')" if split is not None else "")
    cols = ds.column_names
    chat = "chosen" in cols and is_chat(ds)
    need = ["chosen", "rejected"] if chat else ["prompt", "chosen", "rejected"]
    missing = [c for c in need if c not in cols]
    if missing:
        raise UserError(
            f"{where}: missing column(s) {', '.join(map(repr, missing))}; "
            f"it has {', '.join(map(repr, cols)) or 'no columns'}"
        )
    if len(ds) == 0:
        raise UserError(f"{where}: the split is empty")
    fn = _normalise_chat if chat else _normalise_strings
    return ds.map(fn, with_indices=True, fn_kwargs={"where": where}, remove_columns=cols,
                  features=CHAT_FEATURES if chat else STRING_FEATURES, desc=f"checking {where}")


def _normalise_strings(row: dict, idx: int, *, where: str) -> dict:
    out = {k: row[k] for k in ("prompt", "chosen", "rejected")}
    for k, v in out.items():
        if not isinstance(v, str):
            raise UserError(f"{where}: row {idx} (0-based): '{k}' must be a string, got {type(v).__name__}")
    if out["chosen"] == out["rejected"]:
        raise UserError(f"{where}: row {idx} (0-based): chosen and rejected are identical")
    return out


def _messages(value: Any, key: str, idx: int, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: row {idx} (0-based): '{key}' must be a non-empty list of messages")
    out = []
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise UserError(
                f"{where}: row {idx} (0-based): '{key}' has a message that is not {{'role': str, 'content': str}}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _normalise_chat(row: dict, idx: int, *, where: str) -> dict:
    chosen = _messages(row["chosen"], "chosen", idx, where)
    rejected = _messages(row["rejected"], "rejected", idx, where)
    prompt = row.get("prompt")
    prompt_msgs = _messages(prompt, "prompt", idx, where) if isinstance(prompt, list) else None
    if prompt_msgs is None and isinstance(prompt, str) and prompt:
        prompt_msgs = [{"role": "user", "content": prompt}]
    convs = []
    for key, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise UserError(f"{where}: row {idx} (0-based): the last '{key}' message must be the assistant's")
        if len(conv) == 1 or (isinstance(prompt, list) and conv[: len(prompt_msgs)] != prompt_msgs):
            if prompt_msgs is None:
                raise UserError(
                    f"{where}: row {idx} (0-based): '{key}' holds only the assistant turn and there is no prompt"
                )
            conv = prompt_msgs + conv
        convs.append(conv)
    chosen, rejected = convs
    if chosen == rejected:
        raise UserError(f"{where}: row {idx} (0-based): chosen and rejected are identical")
    if not isinstance(prompt, str):
        users = [m["content"] for m in chosen[:-1] if m["role"] == "user"]
        prompt = users[-1] if users else ""
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


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
            f"the tokenizer's chat template failed on the pair with prompt {row['prompt'][:60]!r}: {_reason(e)}"
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
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),  # an edit here re-tokenises
        "config": {k: getattr(cfg, k) for k in DATA_KEYS},
        "sources": {name: _source_identity(name) for name in cfg.dataset_mixer},
        "tokenizer": tokenizer_identity(tokenizer),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_datasets(cfg: TrainConfig, tokenizer, *, cache_dir: str | os.PathLike | None = None) -> PreparedData:
    """Load, tokenise and ``save_to_disk`` train and eval under ``<cache>/data/<fingerprint>``,
    once: later calls (other trials, other workers, other processes) find it there.

    Process-safe: builders serialise on a ``flock`` and write to a temp dir renamed into place.
    """
    fp = data_fingerprint(cfg, tokenizer)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = root / "data"
    final = root / fp
    if not (final / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f".{fp}.lock"):
            if not (final / "meta.json").is_file():  # nobody built it while we waited
                _build(cfg, tokenizer, fp, root, final)
    else:
        log.info("reusing tokenised data %s", final)
    meta = json.loads((final / "meta.json").read_text())
    return PreparedData(str(final / "train"), str(final / "eval"), meta["num_train"], meta["num_eval"], fp)


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _build(cfg: TrainConfig, tokenizer, fp: str, root: Path, final: Path) -> None:
    train, eval_ = load_raw(cfg)
    tmp = Path(tempfile.mkdtemp(prefix=f".{fp}.", dir=root))
    try:
        sizes = {}
        for split, ds in (("train", train), ("eval", eval_)):
            tok = tokenize_pairs(ds, tokenizer, cfg.max_length, cfg.max_prompt_length,
                                 num_proc=cfg.preprocessing_num_workers, name=f"{split} data",
                                 new_fingerprint=f"{fp}-{split}")
            tok.save_to_disk(str(tmp / split))
            sizes[f"num_{split}"] = len(tok)
        meta = {**sizes, "fingerprint": fp, "config": {k: getattr(cfg, k) for k in DATA_KEYS}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():  # a partial dir without meta.json, e.g. from a crash in an old version
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("tokenised %d train and %d eval pairs into %s", sizes["num_train"], sizes["num_eval"], final)


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
