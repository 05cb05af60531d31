"""The held-out prompts the policy answers during evaluation: the rows to ask (`prompt_rows`,
picked once in the driver and stored beside the tokenised data) and each prompt's ids
(`prompt_ids`), truncated as training truncates prompts (`keep_end`). No model here."""

from __future__ import annotations

from typing import Any


def prompt_rows(ds) -> list[dict[str, Any]]:
    """Each normalised held-out row as {prompt, turns, text, baseline}: `turns` the prompt's
    messages (chat rows: chosen[:-1], the reference's rule), `text` the prompt string for rows
    without a chat format (else None), `baseline` the chosen answer's text."""
    rows = []
    for row in ds:
        if isinstance(row["chosen"], str):
            rows.append({"prompt": row["prompt"], "turns": [{"role": "user", "content": row["prompt"]}],
                         "text": row["prompt"], "baseline": row["chosen"]})
        else:
            rows.append({"prompt": row["prompt"], "turns": row["chosen"][:-1], "text": None,
                         "baseline": row["chosen"][-1]["content"]})
    return rows


def prompt_ids(tokenizer, row: dict[str, Any], *, system_turn: bool, max_prompt_length: int) -> list[int]:
    """The policy's input for one row: its turns through the chat template with the generation
    prompt (an empty system turn first when `system_turn`, as in training), or the plain prompt
    text; the last `max_prompt_length` tokens (a leading BOS kept), as training truncates."""
    if row["text"] is not None:
        ids = tokenizer(row["text"])["input_ids"]
    else:
        turns = row["turns"]
        if system_turn and (not turns or turns[0]["role"] != "system"):
            turns = [{"role": "system", "content": ""}, *turns]
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote BOS
    return keep_end(ids, max_prompt_length, tokenizer.bos_token_id) if len(ids) > max_prompt_length else ids


def keep_end(prompt: list[int], max_prompt_length: int, bos: int | None) -> list[int]:
    """The prompt's last ``max_prompt_length`` tokens, a leading BOS kept in front of them."""
    if bos is not None and prompt[:1] == [bos]:
        return [bos] + prompt[len(prompt) - max_prompt_length + 1:]
    return prompt[-max_prompt_length:]
