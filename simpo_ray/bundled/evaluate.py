"""Generation eval for the bundled task: greedy answers, checked by ``task.check``."""

from __future__ import annotations

import torch

from . import task


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int | None = None,
                     batch_size: int = 64, synced: bool = False, system_turn: bool = False) -> list[str]:
    """Greedy assistant answers for user ``prompts`` (chat template + generation prompt).

    ``model`` is a plain causal LM (unwrap DDP first) or an FSDP-sharded module with a
    ``generate`` method; ``synced`` (FSDP) keeps every worker stepping until all are done, as
    the sharded forwards are collective. ``system_turn``: an empty system turn goes first, as
    the training data's prompts have it (`tokens.inserts_system_turn`, the reference's rule).
    Text after EOS is cut, padding dropped.
    """
    max_new_tokens = max_new_tokens or task.MAX_ANSWER_TOKENS
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            system = [{"role": "system", "content": ""}] if system_turn else []
            texts = [tokenizer.apply_chat_template(system + [{"role": "user", "content": p}],
                                                   tokenize=False, add_generation_prompt=True)
                     for p in prompts[i:i + batch_size]]
            # Left padding: generation appends on the right. The template already wrote BOS.
            enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                            add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, synced_gpus=synced)
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                row = [t for t in row if t != tokenizer.pad_token_id]
                # Keep other special tokens: a stray "<|user|>" makes the answer wrong.
                out.append(tokenizer.decode(row, skip_special_tokens=False))
    finally:
        model.train(was_training)
    return out


def success_rate(model, tokenizer, prompts: list[str], *, max_new_tokens: int | None = None,
                 batch_size: int = 64) -> float:
    """Share of ``prompts`` whose greedy answer passes ``task.check``."""
    if not prompts:
        raise ValueError("success_rate needs at least one prompt")
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    return sum(task.check(p, a) for p, a in zip(prompts, answers)) / len(prompts)
