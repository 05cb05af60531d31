"""The bundled model ladder: tiny Llamas, built from a config and briefly SFT-trained offline.

``ensure_model(size)`` returns a directory that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load. The SFT stage is deliberately short: the model sorts
short lists and fails on long ones, so a SimPO search on top of it has something to improve.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, get_scheduler

from simpo_ray.data.cache import build_once, cache_dir

from . import task
from .tokenizer import CHARS, CHAT_TEMPLATE, SPECIALS, build_tokenizer

# Bump when the recipe changes in a way the dict below does not capture (task, loop code).
# 2: transformers' get_scheduler("cosine") replaced a hand-written warmup-cosine (other rates).
RECIPE_VERSION = 2

# Architecture (LlamaConfig kwargs) and SFT recipe per size. Parameter counts are with tied
# embeddings: tiny 0.09M, small 0.76M, base 4.5M. SFT steps are set so each reaches ~30-35%
# held-out success and ~89-90% preference accuracy on test_prefs (tiny 0.31/0.89, small
# 0.33/0.90, base 0.35/0.90 with recipe version 2; see tests).
LADDER: dict[str, dict] = {
    "tiny": {
        "config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4),
        "sft": dict(steps=150, batch_size=32, learning_rate=3e-3, warmup_steps=15, seed=0),
    },
    "small": {
        "config": dict(hidden_size=128, intermediate_size=320, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4),
        "sft": dict(steps=100, batch_size=32, learning_rate=2e-3, warmup_steps=10, seed=0),
    },
    "base": {
        "config": dict(hidden_size=256, intermediate_size=640, num_hidden_layers=6,
                       num_attention_heads=8, num_key_value_heads=8),
        "sft": dict(steps=100, batch_size=32, learning_rate=1e-3, warmup_steps=10, seed=0),
    },
}
MAX_POSITIONS = 64  # a prompt is <= 17 tokens, an answer <= 12 (with EOS): pairs fit easily


def recipe_hash(size: str) -> str:
    """Short hash of everything that determines the built model."""
    recipe = {
        "version": RECIPE_VERSION,
        "size": size,
        **LADDER[size],
        "max_positions": MAX_POSITIONS,
        "vocab": SPECIALS + list(CHARS),
        "chat_template": CHAT_TEMPLATE,
        "task": [task.PREFIX, task.MIN_LEN, task.MAX_LEN, task.ERROR_TYPES, task.ERROR_WEIGHTS,
                 task.SPLITS["train_prefs"], task.TEST_BUCKETS],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def model_config(size: str, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **LADDER[size]["config"],
    )


def shape_config(size: str) -> LlamaConfig:
    """The architecture of `bundled:<size>` without building it (for the memory and disk plans
    of a dry run): the bundled tokenizer's size is fixed (its special tokens and characters)."""
    from simpo_ray.bundled.tokenizer import CHARS, SPECIALS

    return LlamaConfig(vocab_size=len(SPECIALS) + len(CHARS), max_position_embeddings=MAX_POSITIONS,
                       tie_word_embeddings=True, **LADDER[size]["config"])


def sft_batches(tokenizer, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``labels`` of the chosen conversations, prompt masked."""
    ids, labels = [], []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["chosen"][:1], tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["chosen"], tokenize=False)
        p = tokenizer(prompt)["input_ids"]
        f = tokenizer(full)["input_ids"]
        assert f[: len(p)] == p, "chat template must extend the generation prompt"
        ids.append(f)
        labels.append([-100] * len(p) + f[len(p):])
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    x = torch.tensor([s + [pad] * (width - len(s)) for s in ids])
    y = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
    return x, y


def sft_train(model, tokenizer, *, steps, batch_size, learning_rate, warmup_steps, seed) -> float:
    """Plain PyTorch SFT on the chosen answers of ``train_prefs`` (its label noise included,
    as real SFT data has mistakes); warmup then cosine decay. Returns the smoothed final loss."""
    x, y = sft_batches(tokenizer, task.load_split("train_prefs"))
    gen = torch.Generator().manual_seed(seed)

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(len(x), (batch_size,), generator=gen)
        xb, yb = x[idx], y[idx]
        width = int((xb != tokenizer.pad_token_id).sum(1).max())  # trim to the batch's longest
        xb, yb = xb[:, :width], yb[:, :width]
        return model(input_ids=xb, attention_mask=(xb != tokenizer.pad_token_id).long(), labels=yb).loss

    return optimise(model, batch_loss, steps=steps, learning_rate=learning_rate, warmup_steps=warmup_steps)


def optimise(model, batch_loss, *, steps: int, learning_rate: float, warmup_steps: int) -> float:
    """`steps` AdamW steps on `batch_loss()` (no weight decay, gradients clipped at 1.0, warmup then
    cosine decay); the bundled models' and `bundled:reward`'s recipe. Returns the smoothed final loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    sched = get_scheduler("cosine", opt, num_warmup_steps=warmup_steps, num_training_steps=steps)
    model.train()
    ema = None
    for _ in range(steps):
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
    model.eval()
    return ema


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_model(size: str, out_dir: Path, *, log=print) -> None:
    """Build, SFT-train and ``save_pretrained`` model and tokenizer of ``size`` into ``out_dir``."""
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(out_dir)
    torch.manual_seed(LADDER[size]["sft"]["seed"])
    model = LlamaForCausalLM(model_config(size, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    sft = LADDER[size]["sft"]
    log(f"[simpo_ray] building bundled:{size} ({n_params / 1e6:.2f}M params, "
        f"{sft['steps']} SFT steps) -> {out_dir.name}", flush=True)
    with _threads(1):
        loss = sft_train(model, tokenizer, **sft)
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a bar on stderr would garble one-line errors
    model.save_pretrained(out_dir)
    if not (out_dir / "config.json").is_file():  # transformers skips the save on a rank other than 0
        raise RuntimeError(f"save_pretrained wrote no model into {out_dir} (built on a rank other than 0 of a "
                           "process group?); build bundled models in the driver (launch.check_inputs)")
    log(f"[simpo_ray] built bundled:{size} in {time.perf_counter() - t0:.1f}s "
        f"(SFT loss {loss:.3f})", flush=True)


def ensure_model(size: str) -> Path:
    """Path of the built ``bundled:<size>`` model, building it once per cache (process-safe,
    see `simpo_ray.data.cache.build_once`)."""
    if size not in LADDER:
        raise ValueError(f"unknown bundled model size {size!r}; allowed: {list(LADDER)}")
    final = cache_dir() / "models" / f"{size}-{recipe_hash(size)}"
    build_once(final, lambda tmp: build_model(size, tmp))
    return final
