"""A model's parameter count, wherever it can be found without loading the model.

`param_count(model, estimate_billion)`: the bundled ladder's exact count, a local model's
config.json, a space's `estimate.params_billion`, or a size written in the model's name.
Used by `simpo_ray.transfer.trends` to place searches of different models on one size axis.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

BUNDLED = Path(__file__).resolve().parent.parent / "bundled"


def _constants(path: Path) -> dict[str, Any]:
    """The module-level constants of a source file, evaluated without running the module."""
    ns: dict[str, Any] = {}
    for node in ast.parse(path.read_text()).body:
        target, value = ((node.targets[0], node.value) if isinstance(node, ast.Assign)
                         else (node.target, node.value) if isinstance(node, ast.AnnAssign) else (None, None))
        if value is None:
            continue
        try:
            got = eval(compile(ast.Expression(value), str(path), "eval"), {"__builtins__": {}, "dict": dict}, ns)
        except (NameError, TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError):
            continue  # a computed constant (names other constants): not needed here
        names = target.elts if isinstance(target, ast.Tuple) else [target]
        for name, v in zip(names, got if isinstance(target, ast.Tuple) else [got]):
            if isinstance(name, ast.Name):
                ns[name.id] = v
    return ns


@functools.cache
def bundled_param_count(size: str) -> int:
    """Exact parameter count of `bundled:<size>` (tied embeddings: tiny 85,504, small 761,344,
    base 4,538,368), from `bundled/models.LADDER` and the bundled tokenizer's vocabulary.

    Read from the source files: importing those modules imports torch and transformers (~5 s)."""
    from simpo_ray.train.memory import ModelShape

    try:
        ladder = _constants(BUNDLED / "models.py")["LADDER"]
        tok = _constants(BUNDLED / "tokenizer.py")
        vocab = len(tok["SPECIALS"]) + len(tok["CHARS"])
    except (OSError, KeyError, SyntaxError):
        from simpo_ray.bundled.models import LADDER as ladder
        from simpo_ray.bundled.tokenizer import CHARS, SPECIALS
        vocab = len(SPECIALS) + len(CHARS)
    c = ladder[size]["config"]
    h, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads", heads)) * (h // heads)
    shape = ModelShape(layers=int(c["num_hidden_layers"]), hidden=h, intermediate=int(c["intermediate_size"]),
                       vocab=vocab, kv_dim=kv, tied=True, source=f"bundled:{size}")  # model_config ties them
    return int(shape.total_params)


def param_count(model: str, estimate_billion: float | None = None) -> tuple[float | None, str]:
    """(parameter count, where it comes from) of a model, or (None, why not).

    In order: the bundled ladder (exact); a local model directory's config.json (exact, the
    memory planner's shape); the space's `estimate.params_billion`; a size in the model's name
    (`Mistral-7B` 7e9, `SmolLM2-135M` 1.35e8)."""
    name = str(model)
    if name.startswith("bundled:"):
        size = name.split(":", 1)[1]
        try:
            return float(bundled_param_count(size)), f"bundled:{size} (exact, from bundled/models.LADDER)"
        except KeyError:
            return None, f"no bundled model {name!r}"
    config = Path(name).expanduser() / "config.json"
    if config.is_file():
        from simpo_ray.train.memory import ModelShape

        try:
            data = json.loads(config.read_text())
            shape = ModelShape.from_config(SimpleNamespace(**data.get("text_config", data)), str(config))
            return float(shape.total_params), f"{config} (exact)"
        except (ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError):
            pass
    if estimate_billion:
        return float(estimate_billion) * 1e9, "the space's estimate.params_billion"
    sizes = re.findall(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)([BbMm])(?![A-Za-z])", short_name(name))
    if sizes:
        n, unit = sizes[-1]
        return float(n) * (1e9 if unit in "Bb" else 1e6), f"the model's name ({n}{unit.upper()})"
    return None, (f"unknown for {name!r}: not bundled, no config.json, no estimate.params_billion "
                  "in its space file, no size (7B, 135M) in its name")


def short_name(model: str) -> str:
    """`bundled:tiny` -> `tiny`; `mistralai/Mistral-7B-v0.1` -> `Mistral-7B-v0.1`."""
    return re.split(r"[:/]", str(model).rstrip("/"))[-1] or str(model)


def format_count(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"
