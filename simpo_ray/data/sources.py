"""Preference data: load and mix the sources of ``dataset_mixer`` and normalise their rows
(tokenising, caching and batching them is `simpo_ray.data.tokens`).

Sources (keys of `dataset_mixer`) are Hugging Face Hub dataset names, local `.json`/`.jsonl`/
`.parquet` files, local directories (`<split>.jsonl` etc., a `save_to_disk` DatasetDict, or a
downloaded hub snapshot such as `data/train_prefs-00000-of-00001.parquet`), or `bundled:sort`
(`bundled:sort-verbose`: its length-biased variant).
Rows are either plain strings (`prompt`, `chosen`, `rejected`) or UltraFeedback-style chat
conversations (`chosen`/`rejected` message lists ending in the assistant turn, `prompt` optional).

Also the Hub checks: `require_hub` (fail within seconds, not after minutes of retries, when the
Hub cannot be reached) and `check_sources` (what `--dry-run` says about the model and the data).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
from datasets import Dataset, Features, List, Value

from simpo_ray.config import TrainConfig
from simpo_ray.data.hub import HUB_TIMEOUT_S, hub_endpoint, hub_offline, hub_reachable, require_hub
from simpo_ray.errors import UserError, one_line

log = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
HOLDOUT_SEED = 0  # fixed, so the eval rows do not move with the training seed

_MESSAGES = List({"role": Value("string"), "content": Value("string")})
CHAT_FEATURES = Features({"prompt": Value("string"), "chosen": _MESSAGES, "rejected": _MESSAGES})
STRING_FEATURES = Features({"prompt": Value("string"), "chosen": Value("string"), "rejected": Value("string")})

# --------------------------------------------------------------------------- loading


def load_raw(cfg: TrainConfig, notes: list[str] | None = None) -> tuple[Dataset, Dataset]:
    """(train, eval) mixed from ``cfg.dataset_mixer``, normalised to ``prompt``/``chosen``/``rejected``.

    As alignment-handbook's ``mix_datasets``: each source's train split is subsampled to
    ``int(fraction * len)`` rows (the first rows of a shuffle seeded with ``cfg.seed``), eval
    splits are used whole; both concatenations are shuffled with ``cfg.seed`` and then cut to
    ``max_train_samples`` / ``max_eval_samples``. A single local file has no splits: a fixed
    share (``eval_holdout_fraction``, at least one row) of its rows is held out as its eval split
    whatever ``dataset_splits`` says; a line saying so is appended to ``notes``.
    """
    train_split, eval_split = cfg.dataset_splits
    trains, evals = [], []
    for name, frac in cfg.dataset_mixer.items():
        train, eval_ = _load_source(name, train_split, eval_split, cfg.eval_holdout_fraction, notes)
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


def _load_source(name: str, train_split: str, eval_split: str, holdout: float = 0.05,
                 notes: list[str] | None = None) -> tuple[Dataset, Dataset]:
    """One mixer entry's (train, eval), normalised."""
    path = Path(name).expanduser()
    if path.is_file():
        ds = normalise(_read_file(name, path), name)  # row numbers in errors are the file's
        if len(ds) < 2:
            raise UserError(f"dataset '{name}': needs at least 2 rows to hold out an eval row, has {len(ds)}")
        n_eval = min(len(ds) - 1, max(1, round(holdout * len(ds))))
        parts = ds.train_test_split(test_size=n_eval, shuffle=True, seed=HOLDOUT_SEED)
        if notes is not None:
            notes.append(f"{n_eval} of the {len(ds)} rows of {path.name} held out for evaluation "
                         f"(eval_holdout_fraction {holdout:g}; a single file has no '{eval_split}' split)")
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

    if name not in task.DATASETS:
        raise UserError(f"dataset '{name}': unknown bundled dataset; the bundled datasets are "
                        f"{', '.join(map(repr, task.DATASETS))}")
    if split not in task.SPLITS:
        raise UserError(f"dataset '{name}': unknown split '{split}'; available: {', '.join(task.SPLITS)}")
    return task.load_split(split, verbose=task.DATASETS[name])


NEWLINE = b"\n"


def _check_utf8(name: str, path: Path, chunk: int = 1 << 20) -> None:
    """JSON is UTF-8 text; any other bytes make the json reader's errors misleading ("Missing a
    colon"), so say what is wrong: where the first byte that is not UTF-8 is."""
    import codecs

    decoder, offset, lines = codecs.getincrementaldecoder("utf-8")(), 0, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                bad, line = (block[e.start] if block else 0), lines + block[:e.start].count(NEWLINE) + 1
                raise UserError(f"dataset '{name}': {path.name} is not UTF-8 text (byte 0x{bad:02x} on line "
                                f"{line}, offset {offset + e.start}); save it as UTF-8") from None
            if not block:
                return
            offset, lines = offset + len(block), lines + block.count(NEWLINE)


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
        if builder == "json":
            _check_utf8(name, path)
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except UserError:
        raise
    except Exception as e:  # datasets wraps pyarrow/json errors in several types
        raise UserError(f"dataset '{name}': cannot read {path.name}: {one_line(e, first=True, innermost=True)}") from None
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
    files = dir_split_files(path)  # a hub snapshot: data/<split>-00000-of-00001.parquet, ...
    if split in files:
        return _read_files(name, path, files[split])
    found = sorted({p.stem for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES and not _SHARD.match(p.name)}
                   | set(files))
    raise UserError(
        f"dataset '{name}': unknown split '{split}' (no {split}.jsonl, .json or .parquet in the directory, "
        f"nor a hub layout such as data/{split}-00000-of-00001.parquet); available: {', '.join(found) or 'none'}"
    )


_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}")


def dir_split_files(path: Path) -> dict[str, list[Path]]:
    """Split name → data files of a local directory in the layouts of a dataset repository (as
    a hub download leaves it): shards ``[data/]<split>-00000-of-00002.parquet``, a file
    ``data/<split>.jsonl``, or what `datasets` resolves by itself (``train-*.jsonl``, a
    ``test/`` folder, ...). {} when none matches. Only .json/.jsonl/.parquet files count."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns
    from datasets.exceptions import DataFilesNotFoundError

    out: dict[str, list[Path]] = {}
    try:
        resolved = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
        for split, found in resolved.items():
            out[str(split)] = sorted(Path(f) for f in found)
    except (EmptyDatasetError, DataFilesNotFoundError, FileNotFoundError) as e:  # no layout it knows
        log.debug("%s: no split layout datasets knows (%s)", path, one_line(e, first=True))
    mine: dict[str, list[Path]] = {}
    for folder in (path, path / "data"):
        if folder.is_dir():
            for f in sorted(folder.iterdir()):
                shard = _SHARD.match(f.name)
                if f.is_file() and f.suffix in LOCAL_SUFFIXES and (shard or folder.name == "data"):
                    mine.setdefault(shard.group("split") if shard else f.stem, []).append(f)
    out.update(mine)  # a split's exact name wins over datasets' keyword guess ("train_prefs-*" → "train")
    return {split: kept for split, files in out.items()
            if (kept := sorted({f for f in files if f.suffix in LOCAL_SUFFIXES}))}


def _read_files(name: str, root: Path, files: list[Path]) -> Dataset:
    """One split made of several data files (shards) of one type."""
    if len(files) == 1:
        return _read_file(name, files[0])
    builders = {LOCAL_SUFFIXES[f.suffix] for f in files}
    shown = ", ".join(str(f.relative_to(root)) for f in files[:3]) + (", ..." if len(files) > 3 else "")
    if len(builders) > 1:
        raise UserError(f"dataset '{name}': one split mixes file types ({shown}); use one type per split")
    try:
        ds = datasets.load_dataset(builders.pop(), data_files=[str(f) for f in files], split="train")
    except Exception as e:
        raise UserError(f"dataset '{name}': cannot read {shown}: {one_line(e, first=True, innermost=True)}") from None
    if len(ds) == 0:
        raise UserError(f"dataset '{name}': {shown} have no rows")
    return ds


def _load_hub(name: str, split: str) -> Dataset:
    require_hub(f"dataset '{name}'")
    try:
        return datasets.load_dataset(name, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise UserError(f"dataset '{name}': unknown split '{split}': {one_line(e, first=True, innermost=True)}") from None
        raise UserError(f"cannot load dataset '{name}' from the Hugging Face Hub: {one_line(e, first=True, innermost=True)}") from None
    except Exception as e:
        raise UserError(
            f"cannot load dataset '{name}' from the Hugging Face Hub: {one_line(e, first=True, innermost=True)}; "
            "for offline use pass a local .jsonl/.parquet file or bundled:sort"
        ) from None


# --------------------------------------------------------------------------- the Hub


def source_status(kind: str, name: str, splits: list[str] | None = None) -> str:
    """Where ``name`` (a ``kind``: model, tokenizer or dataset) will come from, checked without
    loading it: bundled, a local path (exists or not; a dataset directory: whether ``splits``
    are in it), or the Hub (reachable, not reachable, or not checked in offline mode)."""
    if name.startswith(BUNDLED_PREFIX):
        return "bundled (built on first use)" if kind != "dataset" else "bundled"
    path = Path(name).expanduser()
    if path.is_dir():
        if kind == "model" and not (path / "config.json").is_file():
            return "local directory exists, but has no config.json"
        if kind == "dataset" and splits:
            found = _dir_splits(path)
            missing = [s for s in splits if s not in found]
            if missing:
                return (f"local directory exists, but split(s) {', '.join(missing)} not found in it; "
                        f"available: {', '.join(sorted(found)) or 'none'}")
            return f"local directory exists (splits {', '.join(splits)} found)"
        return "local directory exists"
    if path.exists():
        return "local file exists"
    if name.startswith(("/", "./", "../", "~")) or (kind == "dataset" and _looks_local(name)):
        return "local path does not exist"
    offline = hub_offline()
    if offline is not None:
        if kind in ("model", "tokenizer") and not _in_hub_cache(name, "config.json" if kind == "model"
                                                                else "tokenizer_config.json"):
            return f"not in the local Hugging Face cache, and the Hub is not used ({offline})"
        return f"Hub not checked ({offline}: the local Hugging Face cache only)"
    if hub_reachable():
        return f"Hub reachable ({hub_endpoint()})"
    return (f"Hub not reachable ({hub_endpoint()} did not answer within {HUB_TIMEOUT_S:g} s): "
            "use a local path or HF_HUB_OFFLINE=1")


# What `source_status` says of a source the run would fail on.
MISSING = ("does not exist", "has no config.json", "not found in it", "Hub not reachable",
           "not in the local Hugging Face cache")


def _in_hub_cache(repo_id: str, filename: str) -> bool:
    """Whether the local Hugging Face cache holds `filename` of model `repo_id` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except ValueError:  # not a valid repo id
        return False


def check_sources(cfg: TrainConfig) -> list[str]:
    """One line per source of a run, for ``--dry-run``: the model, the tokenizer (when it is
    another), each dataset of ``dataset_mixer``; e.g. ``model org/name: Hub reachable (...)``."""
    entries = [("model", cfg.model_name_or_path)]
    if cfg.tokenizer_name_or_path and cfg.tokenizer_name_or_path != cfg.model_name_or_path:
        entries.append(("tokenizer", cfg.tokenizer_name_or_path))
    entries += [("dataset", name) for name in cfg.dataset_mixer]
    return [f"{kind} {name}: {source_status(kind, name, cfg.dataset_splits)}" for kind, name in entries]


def _dir_splits(path: Path) -> set[str]:
    """The split names a local dataset directory offers (the layouts `_read_dir_split` reads)."""
    import json

    if (path / "dataset_dict.json").is_file():
        try:
            return set(json.loads((path / "dataset_dict.json").read_text())["splits"])
        except (OSError, ValueError, KeyError, TypeError):
            return set()
    top = {p.stem for p in path.iterdir() if p.is_file() and p.suffix in LOCAL_SUFFIXES and not _SHARD.match(p.name)}
    return top | set(dir_split_files(path))


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
