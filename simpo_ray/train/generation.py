"""The policy's answers to held-out prompts: the rows to ask, the prompts' ids, batched generation
(KV cache, left padding, greedy or seeded sampling) and the split of the prompts across workers.

The held-out rows (`data.prompts.prompt_rows`) are picked once, in the driver (`tokens.prepare_datasets`
stores it); the training loop's evaluator (`train.Evaluator`) generates for its share of them
(`shard`), gathers every worker's answers (`gather`) and scores them (`simpo_ray.train.reward`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_MAX_NEW_TOKENS = 512  # a chat answer; the bundled task's budget is task.MAX_ANSWER_TOKENS


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: int  # generated tokens before the end-of-turn token
    # Ran to max_new_tokens without an end-of-turn token: cut at the limit, unfinished.
    truncated: bool = False


def stop_ids(model, tokenizer) -> list[int]:
    """End-of-turn ids: the generation config's (Llama-3 lists <|eot_id|> there) and the tokenizer's EOS.
    `model` may be a wrapper holding the causal LM as `.model` (the FSDP-sharded `PolicyLogps`)."""
    config = getattr(model, "generation_config", None) or getattr(getattr(model, "model", None), "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [] if ids is None else [ids]
    return sorted(set(ids) | {tokenizer.eos_token_id})


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             synced: bool = False, keep_special_tokens: bool = False, rounds: int | None = None) -> list[Answer]:
    """Answers to `prompts` (token ids), `batch_size` at a time, left-padded, with the KV cache.

    Greedy unless `do_sample` (then seeded by `seed`, with the caller's RNG state left as it was).
    Text after the first end-of-turn token is cut. `keep_special_tokens`: decode them (the bundled
    task counts a stray "<|user|>" as a wrong answer). `synced` (FSDP): every worker must call
    `generate` equally often and keeps stepping until all are done; `rounds` is then the number
    of batches every worker runs (a worker with fewer prompts repeats one and drops the answer).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops, pad = stop_ids(model, tokenizer), tokenizer.pad_token_id
    n_rounds = rounds if rounds is not None else math.ceil(len(prompts) / batch_size)
    out: list[Answer] = []
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if do_sample else contextlib.nullcontext()
    try:
        with rng:
            if do_sample:
                torch.manual_seed(seed)
            for r in range(n_rounds):
                chunk = prompts[r * batch_size:(r + 1) * batch_size]
                real = len(chunk)
                chunk = chunk or prompts[:1] or [[tokenizer.bos_token_id or pad]]
                width = max(map(len, chunk))
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, seq in enumerate(chunk):
                    ids[i, width - len(seq):] = torch.tensor(seq)
                    mask[i, width - len(seq):] = 1
                sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=stops,
                                     use_cache=True, synced_gpus=synced, **sampling)
                for row in gen[:real, width:].tolist():
                    cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                    truncated = cut == len(row) >= max_new_tokens
                    row = [t for t in row[:cut] if t != pad]  # padding, should any precede the stop
                    out.append(Answer(tokenizer.decode(row, skip_special_tokens=not keep_special_tokens), len(row),
                                      truncated))
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------- across workers

def shard(n: int, rank: int, world: int) -> list[int]:
    """The indices of `n` prompts that worker `rank` of `world` answers: every world-th one."""
    return list(range(rank, n, world))


def gather(local: list, n: int, rank: int, world: int) -> list:
    """Every worker's `local` results (for `shard(n, rank, world)`) in the prompts' order, on every
    worker. Without a process group (one worker) `local` is the whole list."""
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return list(local)
    parts: list = [None] * world
    dist.all_gather_object(parts, list(local))
    out: list = [None] * n
    for r, part in enumerate(parts):
        for i, value in zip(shard(n, r, world), part):
            out[i] = value
    return out
