"""`bundled:reward`: a tiny Llama sequence classifier trained as a Bradley-Terry reward model on
the bundled task's training pairs, so the generation-quality objective runs offline.

Like real reward models it starts from an SFT model (`bundled:tiny`'s weights, a new one-output
score head) and is trained to score each pair's chosen answer above its rejected one
(-log sigmoid(r_chosen - r_rejected)), on `train_prefs` with its 10% label noise. It is built
once per cache (`ensure_reward_model`); its held-out pair accuracy on the clean `test_prefs` is
printed when it is built and saved in `reward_meta.json`.

`bundled:reward-verbose` is the same recipe on `bundled:sort-verbose`'s pairs, whose raters liked
a filler tail: it learns to score verbosity up (`task.FILLER`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaForSequenceClassification

from simpo_ray.data.cache import build_once, cache_dir

from . import task
from .models import _threads, ensure_model, optimise, recipe_hash

RECIPE = dict(init="tiny", steps=300, batch_size=64, learning_rate=2e-3, warmup_steps=30, seed=0, version=1)
META_FILE = "reward_meta.json"
NAMES = {"bundled:reward": False, "bundled:reward-verbose": True}  # name -> trained on the verbose variant


def _encode(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    return [tokenizer(tokenizer.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"]
            for c in conversations]


def _rewards(model, seqs: list[list[int]], pad: int) -> torch.Tensor:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return model(input_ids=ids, attention_mask=mask).logits[:, 0]


def pair_accuracy(model, tokenizer, rows) -> float:
    """Share of `rows` whose chosen answer the model scores above the rejected one."""
    model.eval()
    with torch.no_grad():
        chosen = _rewards(model, _encode(tokenizer, [r["chosen"] for r in rows]), tokenizer.pad_token_id)
        rejected = _rewards(model, _encode(tokenizer, [r["rejected"] for r in rows]), tokenizer.pad_token_id)
    return float((chosen > rejected).float().mean())


def train_reward_model(model, tokenizer, *, steps, batch_size, learning_rate, warmup_steps, seed,
                       verbose: bool = False) -> float:
    """Bradley-Terry training on `train_prefs` (of the verbose variant with `verbose`); returns the
    smoothed final loss."""
    rows = task.load_split("train_prefs", verbose=verbose)
    chosen = _encode(tokenizer, rows["chosen"])
    rejected = _encode(tokenizer, rows["rejected"])
    gen = torch.Generator().manual_seed(seed)

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(len(chosen), (batch_size,), generator=gen).tolist()
        r = _rewards(model, [chosen[i] for i in idx] + [rejected[i] for i in idx], tokenizer.pad_token_id)
        return -F.logsigmoid(r[:batch_size] - r[batch_size:]).mean()

    return optimise(model, batch_loss, steps=steps, learning_rate=learning_rate, warmup_steps=warmup_steps)


def build_reward_model(out_dir: Path, *, verbose: bool = False, log=print) -> None:
    """Build and `save_pretrained` the reward model and its tokenizer into `out_dir` (`verbose`:
    `bundled:reward-verbose`)."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    init = ensure_model(RECIPE["init"])
    tokenizer = AutoTokenizer.from_pretrained(init)
    torch.manual_seed(RECIPE["seed"])
    import transformers

    transformers.utils.logging.disable_progress_bar()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "score.weight newly initialized" is the point here
    try:
        model = LlamaForSequenceClassification.from_pretrained(init, num_labels=1)
    finally:
        transformers.logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    train = {k: v for k, v in RECIPE.items() if k not in ("init", "version")}
    with _threads(1):
        loss = train_reward_model(model, tokenizer, **train, verbose=verbose)
        test = task.load_split("test_prefs", verbose=verbose)
        accuracy = pair_accuracy(model, tokenizer, test)
    model.save_pretrained(out_dir)
    if not (out_dir / "config.json").is_file():  # transformers skips the save on a rank other than 0
        raise RuntimeError(f"save_pretrained wrote no model into {out_dir} (built on a rank other than 0 of a "
                           "process group?); build bundled models in the driver (launch.check_inputs)")
    tokenizer.save_pretrained(out_dir)
    (out_dir / META_FILE).write_text(json.dumps({"heldout_pair_accuracy": accuracy, "train_loss": loss,
                                                 "recipe": RECIPE, "verbose": verbose}, indent=1))
    name = "bundled:reward-verbose" if verbose else "bundled:reward"
    log(f"[simpo_ray] built {name} in {time.perf_counter() - t0:.1f}s (Bradley-Terry loss {loss:.3f}; "
        f"held-out pair accuracy {accuracy:.3f} on {len(test)} test_prefs pairs)", flush=True)


def reward_recipe_hash(verbose: bool = False) -> str:
    recipe = {"reward": RECIPE, "init": recipe_hash(RECIPE["init"])}
    if verbose:  # (bundled:reward's hash, and so its cached copy, stay as they were)
        recipe["data"] = {"variant": "sort-verbose", "filler": task.FILLER, "max": task.MAX_FILLERS,
                          "p": [task.VERBOSE_CHOSEN, task.VERBOSE_REJECTED]}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def ensure_reward_model(verbose: bool = False) -> Path:
    """Path of the built `bundled:reward` (`verbose`: `bundled:reward-verbose`), building it once
    per cache (process-safe)."""
    final = cache_dir() / "models" / f"reward{'-verbose' if verbose else ''}-{reward_recipe_hash(verbose)}"
    build_once(final, lambda out, **kw: build_reward_model(out, verbose=verbose, **kw))
    return final
