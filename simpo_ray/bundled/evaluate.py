"""Generation eval for the bundled task: greedy answers, checked by ``task.check``."""

from __future__ import annotations

from simpo_ray.data.prompts import prompt_ids
from simpo_ray.train import generation

from . import task


def generate_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int | None = None,
                     batch_size: int = 64, synced: bool = False, system_turn: bool = False,
                     verbose: bool = False) -> list[str]:
    """Greedy assistant answers for user ``prompts`` (chat template + generation prompt), with
    other special tokens kept (a stray "<|user|>" makes an answer wrong); see
    `simpo_ray.train.generation.generate`. ``system_turn``: an empty system turn goes first, as the
    training data's prompts have it (`tokens.inserts_system_turn`, the reference's rule).
    ``verbose``: the token budget of `bundled:sort-verbose`, whose answers may carry a filler
    tail (`task.answer_budget`), when ``max_new_tokens`` is not given."""
    rows = [{"prompt": p, "turns": [{"role": "user", "content": p}], "text": None} for p in prompts]
    ids = [prompt_ids(tokenizer, r, system_turn=system_turn, max_prompt_length=10**9) for r in rows]
    answers = generation.generate(model, tokenizer, ids, max_new_tokens=max_new_tokens or task.answer_budget(verbose),
                                  batch_size=batch_size, synced=synced, keep_special_tokens=True)
    return [a.text for a in answers]


def success_rate(model, tokenizer, prompts: list[str], *, max_new_tokens: int | None = None,
                 batch_size: int = 64, verbose: bool = False) -> float:
    """Share of ``prompts`` whose greedy answer passes ``task.check`` (``verbose``: the
    `bundled:sort-verbose` budget and check, which ignore a filler tail)."""
    if not prompts:
        raise ValueError("success_rate needs at least one prompt")
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, verbose=verbose)
    return sum(task.check(p, a, verbose=verbose) for p, a in zip(prompts, answers)) / len(prompts)
