"""Batches of tokenised pairs as tensors: `PairCollator` pads each batch to its longest sequence."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy ignores: prompt tokens and padding


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
