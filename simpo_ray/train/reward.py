"""Generation quality as a reward model sees it: scoring answers, win rates, the length-controlled
win rate.

`RewardScorer` loads any Hugging Face `AutoModelForSequenceClassification` with one output (no
remote code) and its own tokenizer and chat template, and scores (prompt turns, answer)
conversations. `win_metrics` turns the policy's and a baseline's scores into the metrics the
training loop reports (`eval/reward_win_rate`, `eval/reward_win_rate_lc`, ...); `lc_win_rate` is
the length-controlled win rate in the manner of AlpacaEval 2 (Dubois et al., 2024). Pure functions
of lists except the scorer; nothing here knows about Ray or Tune.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from simpo_ray.errors import UserError, one_line
from simpo_ray.train.generation_checks import LENGTH_SEPARATES, length_separates

BUNDLED_REWARD = "bundled:reward"
BUNDLED_REWARDS = (BUNDLED_REWARD, "bundled:reward-verbose")  # built here (bundled.reward_model)


# ---------------------------------------------------------------- win rates

def wins(policy: list[float], baseline: list[float], same_text: list[bool] | None = None) -> np.ndarray:
    """Per prompt: 1 when the policy's answer outscores the baseline's, 0 when it scores lower,
    0.5 on a tie (equal scores, or the very same text: a correct bundled answer equals the chosen
    one, and batching must not turn that into a coin flip), as AlpacaEval counts ties."""
    p, b = np.asarray(policy, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if p.shape != b.shape or p.ndim != 1:
        raise ValueError(f"policy and baseline scores must be two lists of one length, got {p.shape}, {b.shape}")
    w = np.where(p > b, 1.0, np.where(p < b, 0.0, 0.5))
    if same_text is not None:
        w = np.where(np.asarray(same_text, dtype=bool), 0.5, w)
    return w


@dataclass(frozen=True)
class LCFit:
    """The fitted length-controlled model: P(win) = sigmoid(intercept + length_coef * tanh(d / scale)),
    d = policy length - baseline length (characters); `win_rate_lc` = sigmoid(intercept), its
    prediction at zero length difference."""

    intercept: float
    length_coef: float
    scale: float
    win_rate_lc: float


def lc_win_rate(win: list[float] | np.ndarray, policy_len: list[int] | np.ndarray,
                baseline_len: list[int] | np.ndarray, *, l2: float = 1e-4) -> LCFit:
    """Length-controlled win rate, as AlpacaEval 2's GLM without its instruction-difficulty term.

    Fitted: logistic regression of the soft win w_i in [0, 1] (a tie is 0.5) on an intercept
    theta and phi * tanh(d_i / sd(d)), d_i = len(policy answer) - len(baseline answer) in
    characters (AlpacaEval's length term, scaled by the standard deviation of d), by maximum
    likelihood with soft labels (cross-entropy against w_i) and a small L2 penalty `l2` on both
    coefficients (AlpacaEval uses a cross-validated L1 penalty and shrinks towards "gamed"
    baselines we do not have; the penalty here only keeps the fit finite when every answer wins
    or lengths separate wins perfectly). Read out at zero length difference: sigmoid(theta).
    AlpacaEval adds a per-instruction difficulty, estimated once from many models' outputs, and
    averages the prediction over instructions; without such estimates it is left out, and the
    average of the prediction at zero length difference is sigmoid(theta). When lengths separate
    wins from losses perfectly (few prompts), the data do not pin down the win at zero length
    difference and the value rests on the penalty: read it with the raw rate and the lengths.
    """
    w = np.asarray(win, dtype=np.float64)
    d = np.asarray(policy_len, dtype=np.float64) - np.asarray(baseline_len, dtype=np.float64)
    if not (w.shape == d.shape and w.ndim == 1 and len(w)):
        raise ValueError("lc_win_rate needs equally long, non-empty lists of wins and lengths")
    sd = float(d.std(ddof=1)) if len(d) > 1 else 0.0  # pandas' std, as AlpacaEval computes it
    x = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    X = np.stack([np.ones_like(x), x], axis=1)
    coef = np.zeros(2)
    n = len(w)
    for _ in range(100):  # Newton's method on the penalised mean log-loss (convex: converges fast)
        p = 1.0 / (1.0 + np.exp(-(X @ coef)))
        grad = X.T @ (p - w) / n + l2 * coef
        hess = (X * (p * (1 - p))[:, None]).T @ X / n + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        coef -= step
        if np.abs(step).max() < 1e-10:
            break
    theta, phi = float(coef[0]), float(coef[1])
    return LCFit(theta, phi, sd, 1.0 / (1.0 + math.exp(-theta)))


def mean_se(values) -> float:
    """The standard error of a mean over prompts: the bootstrap's over prompts, in closed form
    (sd with ddof=0 / sqrt(n), what resampling the n prompts with replacement converges to)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.std() / math.sqrt(len(v))) if len(v) else math.nan


def lc_se(win, policy_len, baseline_len, *, resamples: int = 200, seed: int = 0) -> float:
    """The bootstrap standard error of the LC win rate: the fit redone on `resamples` resamples of
    the prompts (with replacement; seeded, so a report is reproducible)."""
    w = np.asarray(win, dtype=np.float64)
    pl, bl = np.asarray(policy_len, dtype=np.float64), np.asarray(baseline_len, dtype=np.float64)
    if len(w) < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    fits = [lc_win_rate(w[i], pl[i], bl[i]).win_rate_lc for i in rng.integers(0, len(w), (resamples, len(w)))]
    return float(np.std(fits, ddof=1))


def win_metrics(policy_scores: list[float], baseline_scores: list[float], policy_chars: list[int],
                baseline_chars: list[int], policy_tokens: list[int], baseline_tokens: list[int],
                same_text: list[bool] | None = None) -> dict[str, float]:
    """The reported metrics of one evaluation, over the sampled prompts; `eval/length_separates`
    says when the LC fit rests on its penalty (`generation_checks`)."""
    w = wins(policy_scores, baseline_scores, same_text)
    from scipy.special import expit  # (no overflow warning for a large score gap)

    soft = expit(np.asarray(policy_scores, np.float64) - np.asarray(baseline_scores, np.float64))
    if same_text is not None:  # the very same answer: a tie, as `wins` counts it
        soft = np.where(np.asarray(same_text, dtype=bool), 0.5, soft)
    return {
        "eval/reward_win_rate": float(w.mean()),
        "eval/reward_win_rate_se": mean_se(w),
        "eval/reward_win_rate_lc": lc_win_rate(w, policy_chars, baseline_chars).win_rate_lc,
        "eval/reward_win_rate_lc_se": lc_se(w, policy_chars, baseline_chars),
        # sigma(r_policy - r_baseline) averaged: the reward model's own win probability (Bradley-Terry),
        # a lower-variance companion of the hard win rate
        "eval/reward_win_prob": float(soft.mean()),
        "eval/reward_win_prob_se": mean_se(soft),
        LENGTH_SEPARATES: length_separates(w.tolist(), policy_chars, baseline_chars),
        "eval/reward_mean": float(np.mean(policy_scores)),
        "eval/baseline_reward_mean": float(np.mean(baseline_scores)),
        "eval/gen_length": float(np.mean(policy_tokens)),
        "eval/baseline_gen_length": float(np.mean(baseline_tokens)),
    }


# ---------------------------------------------------------------- the reward model

def resolve_reward_path(name: str) -> str:
    """``bundled:reward`` (or ``bundled:reward-verbose``) → the built bundled reward model;
    otherwise as `model.resolve_model_path`."""
    if name in BUNDLED_REWARDS:
        from simpo_ray.bundled.reward_model import NAMES, ensure_reward_model

        return str(ensure_reward_model(NAMES[name]))
    from simpo_ray.train.model import resolve_model_path

    return resolve_model_path(name)


def _check_one_output(name: str, config) -> None:
    """A sequence classifier's config with more than one label is a classifier, not a reward
    model (its first logit would be read as the reward). Other configs (a causal LM's says
    nothing of labels that counts) are judged by what loads: see `RewardScorer`."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels != 1:
        raise UserError(f"reward model '{name}': a classifier with {config.num_labels} outputs "
                        f"({', '.join(map(str, config.id2label.values()))}); a reward model has one output")


class RewardScorer:
    """A sequence-classification reward model with one output, scoring (prompt turns, answer).

    Each conversation is the prompt's turns (no system turn is added: reward models are trained
    without one) plus the assistant answer, rendered by the reward model's own chat template and
    encoded without further special tokens (the template writes BOS). Batches are right-padded
    with an id that occurs in none of the batch's sequences, so the model's pooling (the last
    token that is not padding) finds each answer's true last token even when the tokenizer pads
    with EOS. Weights load in bf16 when `bf16` (inference only), else fp32.
    """

    def __init__(self, name: str, device: torch.device | str = "cpu", *, bf16: bool = False,
                 batch_size: int = 8, max_length: int = 4096) -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_reward_path(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            _check_one_output(name, AutoConfig.from_pretrained(path))
            self.model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=torch.bfloat16 if bf16 else torch.float32, output_loading_info=True)
        except (OSError, ValueError, ImportError) as e:
            raise UserError(f"cannot load reward model '{name}': {one_line(e, first=True)}") from None
        new = sorted({*info.get("missing_keys", ()), *(k[0] if isinstance(k, tuple) else k
                                                       for k in info.get("mismatched_keys", ()))})
        if new:
            raise UserError(f"reward model '{name}': {', '.join(new[:3])} not in its checkpoint, so its scores "
                            "would come from random weights; a reward model is a sequence classifier with "
                            "one output, trained as one (a causal LM is not)")
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"reward model '{name}': its tokenizer has no chat template; "
                            "a reward model must format conversations as it was trained")
        self.name, self.batch_size, self.max_length = name, batch_size, max_length
        self.device = torch.device(device)
        self.model.to(self.device).eval()

    def encode(self, prompt_turns: list[dict], answer: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [*prompt_turns, {"role": "assistant", "content": answer}], tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-self.max_length:] if len(ids) > self.max_length else ids

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        """One reward per (prompt turns, answer)."""
        if len(prompts) != len(answers):
            raise ValueError("score needs one answer per prompt")
        encoded = [self.encode(p, a) for p, a in zip(prompts, answers)]
        out: list[float] = []
        text_config = self.model.config.get_text_config()
        saved = text_config.pad_token_id
        try:
            for i in range(0, len(encoded), self.batch_size):
                chunk = encoded[i:i + self.batch_size]
                pad = _unused_id(chunk, saved, self.model.get_input_embeddings().num_embeddings)
                text_config.pad_token_id = pad
                width = max(map(len, chunk))
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, seq in enumerate(chunk):
                    ids[r, :len(seq)] = torch.tensor(seq)
                    mask[r, :len(seq)] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                out += logits[:, 0].float().cpu().tolist()
        finally:
            text_config.pad_token_id = saved
        return out


def _unused_id(seqs: list[list[int]], preferred: int | None, vocab: int) -> int:
    """`preferred` when no sequence contains it, else the smallest id below `vocab` none contains
    (padding positions are masked, but their ids still go through the embedding)."""
    used = {t for s in seqs for t in s}
    if preferred is not None and 0 <= preferred < vocab and preferred not in used:
        return preferred
    return next(i for i in range(vocab) if i not in used)
