"""The bundled offline CPU task (``bundled:sort``) and model ladder (``bundled:<size>``)."""

from .evaluate import success_rate
from .models import LADDER, ensure_model
from .task import answer, check, generate_pairs, load_split
from .tokenizer import build_tokenizer

__all__ = ["LADDER", "answer", "build_tokenizer", "check", "ensure_model", "generate_pairs",
           "load_split", "success_rate"]
