"""Generation-quality evaluation's share of a GPU trial, by arithmetic (no GPU was lent).

For each real-size space: the training time between two generation evaluations, and the time of
one evaluation (preference forward passes, generation, reward scoring), from stated hardware
figures. Training: 6 * N * tokens per step (plus one recomputed forward with gradient
checkpointing) at the space's MFU of the H100's bf16 peak. Generation is memory-bound: each
decoded token reads every weight once, from HBM (DDP: the worker's full bf16 copy) or, under
FSDP, all-gathered from the other workers over NVLink (8 GPUs per node) or InfiniBand (more),
plus a fixed per-token overhead of Hugging Face's `generate` loop; every worker decodes its share
of the prompts in `ceil(share / generation_batch_size)` (one, by default) rounds of `max_new_tokens` steps
(the worst case: every round runs to the limit). The reward model scores policy answers once per
evaluation (the baseline's once per run), at the same MFU. Prints a table; `eval share` is eval
time / (train time + eval time) per generation interval.
"""

from __future__ import annotations

import math
import sys

from _common import REPO, load, parser, write_json

HBM_GBPS = 3350.0        # H100 SXM HBM3
NVLINK_GBPS = 360.0      # all-gather bus bandwidth within an 8-GPU NVLink node (NCCL tests, H100)
IB_GBPS = 45.0           # per GPU across nodes, 400 Gb/s NDR InfiniBand, achieved
TOKEN_OVERHEAD_S = 0.02  # generate()'s per-step Python and kernel-launch overhead
SPACES = ("1b-3b", "7b", "8b-13b", "13b-30b", "70b")


def trial_costs(name: str) -> dict:
    from simpo_ray.train.memory import reward_params
    from simpo_ray.search.plan import load as load_space

    space = load_space(REPO / "search_spaces" / f"{name}.yaml")
    cfg, e, r = space.default_config(), space.estimate, space.resources
    gpus = r.num_workers
    flops_s = e.peak_tflops * 1e12 * e.mfu * gpus
    recompute = 8 / 6 if cfg.gradient_checkpointing else 1.0
    step_s = 6 * e.params_billion * 1e9 * space.effective_batch * e.tokens_per_pair * recompute / flops_s
    every = cfg.generation_eval_steps or cfg.eval_steps
    train_s = every * step_s
    # preference eval: one forward (2 N FLOPs per token) over max_eval_samples pairs
    pref_s = 2 * e.params_billion * 1e9 * (cfg.max_eval_samples or 1000) * e.tokens_per_pair / flops_s
    weights = 2 * e.params_billion * 1e9
    fsdp = cfg.parallel == "fsdp"
    if fsdp:
        link = NVLINK_GBPS if gpus <= 8 else IB_GBPS
        per_token = weights * (gpus - 1) / gpus / (link * 1e9) + TOKEN_OVERHEAD_S
    else:
        per_token = weights / (HBM_GBPS * 1e9) + TOKEN_OVERHEAD_S
    share = math.ceil(cfg.generation_eval_samples / gpus)
    rounds = math.ceil(share / (cfg.generation_batch_size or share)) if share else 0
    gen_s = rounds * cfg.max_new_tokens * per_token if cfg.generation_eval_samples else 0.0
    rm = reward_params(cfg)
    rm_s = 2 * rm * share * (e.tokens_per_pair / 2) / (e.peak_tflops * 1e12 * e.mfu) if rm else 0.0
    eval_s = pref_s * every / cfg.eval_steps + gen_s + rm_s
    return {"space": name, "gpus": gpus, "parallel": cfg.parallel, "step_s": step_s, "every": every,
            "train_s": train_s, "pref_eval_s": pref_s * every / cfg.eval_steps, "gen_s": gen_s,
            "reward_s": rm_s, "eval_share": eval_s / (train_s + eval_s), "samples": cfg.generation_eval_samples,
            "max_new_tokens": cfg.max_new_tokens, "reward_model": cfg.reward_model_name_or_path}


def main() -> int:
    args = parser(__doc__, "eval_cost").parse_args()
    rows = [trial_costs(n) for n in SPACES]
    print(f"load average {load()} (arithmetic only)\n")
    print("| space | GPUs | parallel | step s | gen every | train s | pref eval s | generation s | reward s | eval share |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['space']} | {r['gpus']} | {r['parallel']} | {r['step_s']:.2f} | {r['every']} | "
              f"{r['train_s']:.0f} | {r['pref_eval_s']:.1f} | {r['gen_s']:.1f} | {r['reward_s']:.1f} | "
              f"{r['eval_share']:.1%} |")
    print(f"\nassumptions: HBM {HBM_GBPS:g} GB/s, NVLink all-gather {NVLINK_GBPS:g} GB/s (<= 8 GPUs), "
          f"InfiniBand {IB_GBPS:g} GB/s per GPU (more), {TOKEN_OVERHEAD_S * 1e3:g} ms per decoded token "
          "of generate() overhead; every round decodes max_new_tokens")
    write_json(args.out, {"rows": rows, "load": load()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
