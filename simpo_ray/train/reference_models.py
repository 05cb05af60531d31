"""Public configs (config.json on the Hugging Face Hub, the fields that set size and work) of the
model families the real spaces name, so a laptop with no hub can plan and trace a 70B trial.

Rope scaling and rope theta are left out: they change the rotary table's values, not the memory
or the work. `config_for` prefers the model's own config (local, bundled or in the hub cache).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

_LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "num_key_value_heads": 8}
_QWEN25 = {"model_type": "qwen2", "vocab_size": 152064, "num_key_value_heads": 8}

# name -> (hub ids that use this shape, config fields)
REFERENCE_CONFIGS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "Llama-3.2-1B": (("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct"), {
        **_LLAMA3, "num_hidden_layers": 16, "hidden_size": 2048, "intermediate_size": 8192,
        "num_attention_heads": 32, "head_dim": 64, "tie_word_embeddings": True}),
    "Llama-3.2-3B": (("meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct"), {
        **_LLAMA3, "num_hidden_layers": 28, "hidden_size": 3072, "intermediate_size": 8192,
        "num_attention_heads": 24, "head_dim": 128, "tie_word_embeddings": True}),
    "Mistral-7B": (("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.2"), {
        "model_type": "mistral", "vocab_size": 32000, "num_hidden_layers": 32, "hidden_size": 4096,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
        "tie_word_embeddings": False}),
    "Llama-3-8B": (("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct",
                    "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct",
                    "Skywork/Skywork-Reward-V2-Llama-3.1-8B"), {
        **_LLAMA3, "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
        "num_attention_heads": 32, "tie_word_embeddings": False}),
    "Qwen2.5-14B": (("Qwen/Qwen2.5-14B", "Qwen/Qwen2.5-14B-Instruct"), {
        **_QWEN25, "num_hidden_layers": 48, "hidden_size": 5120, "intermediate_size": 13824,
        "num_attention_heads": 40, "tie_word_embeddings": False}),
    "Qwen2.5-32B": (("Qwen/Qwen2.5-32B", "Qwen/Qwen2.5-32B-Instruct"), {
        **_QWEN25, "num_hidden_layers": 64, "hidden_size": 5120, "intermediate_size": 27648,
        "num_attention_heads": 40, "tie_word_embeddings": False}),
    "Llama-3.1-70B": (("meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct",
                       "meta-llama/Meta-Llama-3-70B-Instruct"), {
        **_LLAMA3, "num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672,
        "num_attention_heads": 64, "tie_word_embeddings": False}),
    "Qwen3-1.7B": (("Skywork/Skywork-Reward-V2-Qwen3-1.7B", "Qwen/Qwen3-1.7B"), {
        "model_type": "qwen3", "vocab_size": 151936, "num_hidden_layers": 28, "hidden_size": 2048,
        "intermediate_size": 6144, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "tie_word_embeddings": True}),
    "Qwen3-0.6B": (("Skywork/Skywork-Reward-V2-Qwen3-0.6B", "Qwen/Qwen3-0.6B"), {
        "model_type": "qwen3", "vocab_size": 151936, "num_hidden_layers": 28, "hidden_size": 1024,
        "intermediate_size": 3072, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "tie_word_embeddings": True}),
}


def reference_config(name: str):
    """The transformers config of a `REFERENCE_CONFIGS` entry (by its name or one of its hub ids)."""
    from transformers import AutoConfig

    for ref, (ids, fields) in REFERENCE_CONFIGS.items():
        if name == ref or name in ids:
            fields = dict(fields)
            config = AutoConfig.for_model(fields.pop("model_type"), **fields)
            config.name_or_path = ref
            return config
    raise KeyError(name)


def parameters(config) -> int:
    """Parameters of a decoder-only transformer config, counted by building it on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def config_for(name: str, *, params_billion: float | None = None, trust_remote_code: bool = False,
               local_files_only: bool = True, revision: str | None = None):
    """(config, where it came from) for `name`: its own config (at `revision`, a Hub model's
    `model_revision`) when it is bundled, a local directory or in the hub cache; else the
    reference entry that lists `name`; else the reference family closest to `params_billion` (a
    space's estimate). `KeyError` when none applies."""
    from transformers import AutoConfig

    from simpo_ray.train.model import BUNDLED_PREFIX, resolve_model_path

    if name.startswith(BUNDLED_PREFIX):
        from simpo_ray.bundled import models

        if name[len(BUNDLED_PREFIX):] in models.LADDER:  # its architecture, without building it
            return models.shape_config(name[len(BUNDLED_PREFIX):]), f"the config of {name}"
    local = name.startswith(BUNDLED_PREFIX) or Path(name).expanduser().is_dir()
    try:
        path = resolve_model_path(name) if local else name
        hub = {} if local or not revision else {"revision": revision}
        return (AutoConfig.from_pretrained(path, local_files_only=local_files_only,
                                           trust_remote_code=trust_remote_code, **hub), f"the config of {name}")
    except (OSError, ValueError):
        pass
    try:
        config = reference_config(name)
        return config, f"the public config of {config.name_or_path}"
    except KeyError:
        if params_billion is None:
            raise
    sizes = {ref: parameters(reference_config(ref)) for ref in REFERENCE_CONFIGS}
    ref = min(sizes, key=lambda r: abs(math.log(sizes[r] / (params_billion * 1e9))))
    return reference_config(ref), (f"{ref}'s public config, the family closest to estimate.params_billion "
                                   f"{params_billion:g} ({name}'s own config could not be read offline)")
