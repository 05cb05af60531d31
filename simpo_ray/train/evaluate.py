"""What a run measures and prints: the held-out evaluation every `eval_steps` (`Evaluator`:
preference accuracy, loss and rewards of the held-out pairs, generation quality), and the
one-line setup, progress and log lines of rank 0."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from simpo_ray.config import TrainConfig
from simpo_ray.train.step import MetricWindow, autocast, batch_tokens, objective_for, pair_fields


# Metrics whose worst value is known a priori (they are shares in [0, 1], higher is better).
# A diverged run reports them as 0.0 so that a searcher ranks it last.
BOUNDED_EVAL_METRICS = ("eval/preference_accuracy", "eval/rewards/accuracies", "eval/success_rate",
                        "eval/reward_win_rate", "eval/reward_win_rate_lc")


def is_bundled_task(cfg: TrainConfig) -> bool:
    return all(name.startswith("bundled:") for name in cfg.dataset_mixer)


def setup_line(cfg: TrainConfig, strategy: str, world: int, device: torch.device) -> str:
    precision = "bf16 compute over fp32 master weights" if cfg.bf16 else "fp32"
    how = f"{strategy} over {world} worker(s)" + (", CPU offload" if strategy == "fsdp" and cfg.fsdp_cpu_offload else "")
    sharded = ("; gradients reduce-scattered every micro-batch (kept sharded)"
               if strategy == "fsdp" and cfg.gradient_accumulation_steps > 1 else "")
    return (f"[simpo-ray] {how} on {device.type}; precision {precision}; gradient checkpointing "
            f"{'on' if cfg.gradient_checkpointing else 'off'}; dropout {'off' if cfg.disable_dropout else 'on'}"
            f"{sharded}")


class Evaluator:
    """Held-out metrics, sharded across workers and all-reduced, and generation quality.

    `eval/preference_accuracy` (share of pairs whose average log-prob of chosen exceeds
    rejected) does not depend on beta or gamma, so it ranks trials fairly, but it cannot see
    what the model generates; `quality.GenerationEval` adds `eval/success_rate` (bundled task)
    and the reward model's win rates. Under FSDP every forward is collective, so every worker
    runs the same number of batches (a worker with fewer rows repeats one and discards it) and
    generation runs with synced_gpus.
    """

    def __init__(self, policy, bare, tokenizer, eval_ds, collator, cfg: TrainConfig, objective, device,
                 rank: int, world: int, strategy: str, prompts: list[dict], state: dict) -> None:
        from simpo_ray.train.quality import GenerationEval
        from simpo_ray.data.tokens import inserts_system_turn

        self.policy, self.bare, self.tokenizer, self.ds, self.collator = policy, bare, tokenizer, eval_ds, collator
        self.cfg, self.objective, self.device, self.rank, self.world = cfg, objective, device, rank, world
        self.lockstep = strategy == "fsdp" and world > 1
        system = cfg.auto_insert_empty_system_msg and inserts_system_turn(tokenizer)
        self.generation = GenerationEval(prompts[:cfg.generation_eval_samples], tokenizer, cfg, device, rank, world,
                                         bundled=is_bundled_task(cfg), system_turn=system,
                                         lockstep=self.lockstep, state=state)
        self.last_generation: dict[str, float] = {}
        self.warned: set[str] = set()  # the generation problems the last generation eval showed

    @torch.no_grad()
    def __call__(self, step: int = 0, final: bool = False) -> dict[str, float]:
        cfg, ds = self.cfg, self.ds
        t0 = time.perf_counter()
        self.policy.eval()
        rows = list(range(self.rank, len(ds), self.world))
        size = cfg.per_device_eval_batch_size
        n_batches = math.ceil(math.ceil(len(ds) / self.world) / size) if self.lockstep else math.ceil(len(rows) / size)
        window = MetricWindow()
        for b in range(n_batches):
            chunk = rows[b * size:(b + 1) * size]
            batch = self.collator([ds[i] for i in (chunk or [0])])
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with autocast(cfg, self.device, "fsdp" if self.lockstep else "ddp"):
                # DDP: the bare module (shards differ in size); FSDP: the sharded root.
                out = self.bare(**pair_fields(batch))
            if chunk:
                _, metrics = objective_for(out, self.objective)
                window.add(metrics, tokens=batch_tokens(batch))
        result = {f"eval/{k}": v for k, v in window.reduce(self.world).items() if k != "tokens"}
        result["eval/sft_loss"] = result.get("eval/sft_loss", float("nan"))
        if self.generation.active:
            every = cfg.generation_eval_steps or cfg.eval_steps
            if step % every == 0 or final or not self.last_generation:
                fresh = self.generation(self.bare if self.lockstep else self.bare.model)
                result.update(fresh)  # with its time/ entries, which are not carried forward
                self.last_generation = {k: v for k, v in fresh.items() if k.startswith("eval/")}
                self.last_generation["eval/generation_step"] = step
                self._warn(fresh, step)
            result.update(self.last_generation)
        result["time/eval_s"] = time.perf_counter() - t0
        self.policy.train()
        return result

    def _warn(self, fresh: dict[str, float], step: int) -> None:
        """One warning line (rank 0) when a generation eval shows a problem the previous one did
        not (`generation_checks`): said once as it appears, not at every evaluation after it."""
        from simpo_ray.train import generation_checks
        from simpo_ray.train.quality import max_new_tokens

        limit = max_new_tokens(self.cfg, is_bundled_task(self.cfg))
        found = generation_checks.problems(fresh, limit)
        if self.rank == 0 and set(found) - self.warned:  # stdout: beside the progress line it explains
            print(f"[simpo-ray] step {step}: {generation_checks.warning_line(fresh, limit)}", flush=True)
        self.warned = set(found)


def _num(r: dict[str, Any], key: str, fmt: str) -> str:
    """A metric formatted, or an em dash where there is none yet (step 0 has no training loss)."""
    value = r.get(key)
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def progress_line(r: dict[str, Any]) -> str:
    parts = [f"step {r['step']}/{r['total_steps']}", f"loss {_num(r, 'loss', '.4f')}",
             f"eval/loss {_num(r, 'eval/loss', '.4f')}",
             f"eval/pref_acc {_num(r, 'eval/preference_accuracy', '.3f')}",
             f"margin {_num(r, 'eval/rewards/margins', '.3f')}"]
    if "eval/success_rate" in r:
        parts.append(f"success {r['eval/success_rate']:.3f}")
    if "eval/reward_win_rate" in r:
        parts.append(f"win {r['eval/reward_win_rate']:.3f} (LC {r['eval/reward_win_rate_lc']:.3f}, "
                     f"{r['eval/gen_length']:.0f} tok)")
    if "tokens_per_s" in r:
        parts.append(f"{r['tokens_per_s']:.0f} tok/s")
    return "[simpo-ray] " + "  ".join(parts)


def log_line(step: int, total: int, m: dict[str, float], lr: float, seconds: float) -> str:
    """Every `logging_steps`: the training loss since the last line (rank 0's batches)."""
    return (f"[simpo-ray] step {step}/{total}  loss {_num(m, 'loss', '.4f')}  "
            f"reward margin {_num(m, 'rewards/margins', '.3f')}  lr {lr:.3g}  "
            f"{m.get('tokens', 0.0) / max(seconds, 1e-9):.0f} tok/s")
