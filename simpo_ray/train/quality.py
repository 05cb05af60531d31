"""Generation-quality evaluation inside the training loop: the policy answers a fixed sample of
held-out prompts, split across the workers; the bundled task checks the answers; a reward model
scores them against a baseline answer per prompt (`simpo_ray.train.reward`).

Knows torch and torch.distributed, not Ray: `train.Evaluator` calls it at every evaluation.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from simpo_ray.data import prompts
from simpo_ray.train import generation
from simpo_ray.config import TrainConfig
from simpo_ray.train.generation_checks import TRUNCATED
from simpo_ray.train.reward import RewardScorer, win_metrics


def max_new_tokens(cfg: TrainConfig, bundled: bool) -> int:
    """`max_new_tokens`, else the bundled task's answer budget or `generation.DEFAULT_MAX_NEW_TOKENS`."""
    if cfg.max_new_tokens is not None:
        return cfg.max_new_tokens
    if bundled:
        from simpo_ray.bundled import task

        return task.answer_budget(task.is_verbose(cfg.dataset_mixer))
    return generation.DEFAULT_MAX_NEW_TOKENS


class GenerationEval:
    """Answers, checks and reward-model scores for `rows` (every worker holds all of them and
    answers `generation.shard` of them). `state` is the training loop's checkpointed state: the
    baseline's scores are kept there (`reward_baseline`), so a resumed run compares against the
    same baseline, the step-0 model's answers included."""

    def __init__(self, rows: list[dict[str, Any]], tokenizer, cfg: TrainConfig, device, rank: int, world: int,
                 *, bundled: bool, system_turn: bool, lockstep: bool, state: dict[str, Any]) -> None:
        self.rows, self.tokenizer, self.cfg, self.rank, self.world = rows, tokenizer, cfg, rank, world
        self.bundled, self.lockstep, self.state, self.device = bundled, lockstep, state, device
        self.mine = generation.shard(len(rows), rank, world)
        self.ids = [prompts.prompt_ids(tokenizer, rows[i], system_turn=system_turn,
                                          max_prompt_length=cfg.max_prompt_length) for i in self.mine]
        share = math.ceil(len(rows) / world)
        self.batch_size = cfg.generation_batch_size or max(share, 1)
        self.rounds = math.ceil(share / self.batch_size) if lockstep else None
        self.scorer = None
        if cfg.reward_model_name_or_path:
            self.scorer = RewardScorer(cfg.reward_model_name_or_path, device,
                                       bf16=cfg.bf16 and torch.device(device).type == "cuda",
                                       batch_size=cfg.per_device_eval_batch_size)

    @property
    def active(self) -> bool:
        return bool(self.rows) and (self.bundled or self.scorer is not None)

    def __call__(self, model) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        answers = generation.generate(
            model, self.tokenizer, self.ids, max_new_tokens=max_new_tokens(cfg, self.bundled),
            batch_size=self.batch_size, do_sample=cfg.generation_do_sample,
            temperature=cfg.generation_temperature, top_p=cfg.generation_top_p, seed=cfg.seed + self.rank,
            synced=self.lockstep, keep_special_tokens=self.bundled, rounds=self.rounds)
        out = {"time/generation_s": time.perf_counter() - t0,
               TRUNCATED: self._share(sum(a.truncated for a in answers), len(answers))}
        if self.bundled:
            rate = out["eval/success_rate"] = self._success_rate(answers)
            n = len(self.rows)  # every worker's share: the prompts of this evaluation
            # binomial: the bootstrap over prompts of a share, in closed form
            out["eval/success_rate_se"] = math.sqrt(rate * (1 - rate) / n) if n else math.nan
        if self.scorer is not None:
            t1 = time.perf_counter()
            out.update(self._reward_metrics(answers))
            out["time/reward_s"] = time.perf_counter() - t1
        return out

    def _success_rate(self, answers: list[generation.Answer]) -> float:
        from simpo_ray.bundled import task

        verbose = task.is_verbose(self.cfg.dataset_mixer)  # a filler tail is neither right nor wrong
        return self._share(sum(task.check(self.rows[i]["prompt"], a.text, verbose=verbose)
                               for i, a in zip(self.mine, answers)), len(answers))

    def _share(self, count: int, n: int) -> float:
        """count / n summed over the workers (every worker calls it: a collective)."""
        counts = torch.tensor([float(count), float(n)], dtype=torch.float64, device=self.device)
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(counts)
        return counts[0].item() / max(counts[1].item(), 1.0)

    def _reward_metrics(self, answers: list[generation.Answer]) -> dict[str, float]:
        turns = [self.rows[i]["turns"] for i in self.mine]
        scores = self.scorer.score(turns, [a.text for a in answers])
        mine = [(s, a.text, a.tokens) for s, a in zip(scores, answers)]
        policy = generation.gather(mine, len(self.rows), self.rank, self.world)
        baseline = self.state.get("reward_baseline")
        if baseline is None or baseline.get("identity") != self._identity():
            baseline = {**self._baseline(turns, mine), "identity": self._identity()}
            self.state["reward_baseline"] = baseline
        return win_metrics(
            [p[0] for p in policy], baseline["scores"],
            [len(p[1]) for p in policy], [len(t) for t in baseline["texts"]],
            [p[2] for p in policy], baseline["tokens"],
            same_text=[p[1].strip() == t.strip() for p, t in zip(policy, baseline["texts"])])

    def _identity(self) -> dict[str, Any]:
        """What the kept baseline scores depend on: a resumed run with another reward model,
        baseline or prompt sample scores its baseline anew."""
        prompts = hashlib.sha256(json.dumps([r["turns"] for r in self.rows]).encode()).hexdigest()[:16]
        return {"reward_model": self.cfg.reward_model_name_or_path, "baseline": self.cfg.reward_baseline,
                "prompts": prompts}

    def _baseline(self, turns: list[list[dict]], mine: list[tuple]) -> dict[str, list]:
        """The baseline answers' scores, texts and token counts, over all rows: the dataset's chosen
        answers, or (`reward_baseline: initial`) this evaluation's own answers, which is the
        first one of a run (step 0)."""
        if self.cfg.reward_baseline == "initial":
            if self.state.get("step", 0) > 0 and self.rank == 0:
                print("[simpo-ray] warning: reward_baseline: initial, but this run resumed without the "
                      "step-0 answers; the baseline is this checkpoint's answers", file=sys.stderr, flush=True)
            local = mine
        else:
            texts = [self.rows[i]["baseline"] for i in self.mine]
            scores = self.scorer.score(turns, texts)
            lengths = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
            local = list(zip(scores, texts, lengths))
        every = generation.gather(local, len(self.rows), self.rank, self.world)
        return {"scores": [b[0] for b in every], "texts": [b[1] for b in every], "tokens": [b[2] for b in every]}
