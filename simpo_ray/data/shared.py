"""Hand tokenised datasets from the driver to Ray workers on any node.

The driver tokenises once (cached on its disk by `tokens.prepare_datasets`), then puts the Arrow
tables into Ray's object store. Workers on every node, of every trial, read them from there
instead of re-tokenising or needing the driver's file system.
"""

from __future__ import annotations

from typing import Any

import datasets
import ray


def share_prepared(prepared: Any, prompt_samples: int = 0) -> dict[str, Any]:
    """Put the prepared train/eval Arrow tables, and the first `prompt_samples` held-out prompt
    rows (the generation sample), into the object store; return their refs."""
    from simpo_ray.data.prepare import load_prepared

    refs = {}
    for split, path in (("train", prepared.train_path), ("eval", prepared.eval_path)):
        ds = load_prepared(path)
        refs[split] = {"table": ray.put(ds.data.table), "fingerprint": f"{prepared.fingerprint}-{split}"}
    refs["prompts"] = ray.put(prepared.prompt_rows(prompt_samples))
    return refs


def load_prompts(data: dict[str, Any]) -> list[dict]:
    """The generation sample shared by `share_prepared` (none when the data predate it)."""
    ref = data.get("prompts")
    return ray.get(ref) if ref is not None else []


def load_shared(ref_or_path: Any) -> datasets.Dataset:
    """A `datasets.Dataset` from a shared table (or a dataset path, for local use).

    The fingerprint travels with the table: without it, `datasets` would hash the whole table
    in every worker to invent one.
    """
    if isinstance(ref_or_path, dict):
        return datasets.Dataset(ray.get(ref_or_path["table"]), fingerprint=ref_or_path["fingerprint"])
    from simpo_ray.data.prepare import load_prepared

    return load_prepared(ref_or_path)
