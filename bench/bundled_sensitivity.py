"""Do the four SimPO hyperparameters matter on the bundled CPU task? One real Ray Train run per row.

    .venv/bin/python bench/bundled_sensitivity.py [--size tiny] [--steps 600] [--out FILE]

Each row trains `bundled:<size>` with `python -m simpo_ray.train`'s code path (`run_training`)
and reports held-out preference accuracy and greedy success rate before (step 0) and after.
Prints a Markdown table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROWS = [  # (label, learning_rate, beta, gamma_beta_ratio, sft_weight)
    ("too low lr", 1e-5, 2.0, 0.5, 0.5),
    ("good lr, sft 0.5", 1e-3, 2.0, 0.5, 0.5),
    ("good lr, sft 0 (pure SimPO)", 1e-3, 2.0, 0.5, 0.0),
    ("good lr, sft 1.0", 1e-3, 2.0, 0.5, 1.0),
    ("good lr, beta 10", 1e-3, 10.0, 0.5, 0.5),
    ("good lr, gamma/beta 1.0", 1e-3, 2.0, 1.0, 0.5),
    ("too high lr", 1e-2, 2.0, 0.5, 0.5),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--quick", action="store_true", help="40 steps, 2 rows: a smoke check")
    p.add_argument("--out", default="bench/results/bundled_sensitivity.json")
    args = p.parse_args(argv)
    rows = ROWS[:2] if args.quick else ROWS
    steps = 40 if args.quick else args.steps

    from simpo_ray.config import TrainConfig
    from simpo_ray.infra.cluster import init_ray, ray_env_defaults
    from simpo_ray.infra.launch import final_metrics, read_history, run_training

    ray_env_defaults()
    init_ray(num_cpus=2, log_to_driver=False, configure_logging=False)
    results = []
    storage = tempfile.mkdtemp(prefix="simpo-sensitivity-")
    for label, lr, beta, gbr, sft in rows:
        cfg = TrainConfig(model_name_or_path=f"bundled:{args.size}", dataset_mixer={"bundled:sort": 1.0},
                          max_length=64, max_prompt_length=32, max_eval_samples=512,
                          per_device_train_batch_size=16, per_device_eval_batch_size=64,
                          generation_eval_samples=256, learning_rate=lr, beta=beta, gamma_beta_ratio=gbr,
                          sft_weight=sft, max_steps=steps, eval_steps=steps, warmup_ratio=0.1)
        t0 = time.perf_counter()
        result = run_training(cfg, num_workers=1, storage_path=storage, name=f"row{len(results)}")
        history = read_history(Path(result.path) / "history.jsonl")
        start, end = history[0], final_metrics(result)
        results.append({"label": label, "learning_rate": lr, "beta": beta, "gamma_beta_ratio": gbr,
                        "sft_weight": sft, "steps": steps, "status": end["status"],
                        "pref_acc_before": start["eval/preference_accuracy"],
                        "pref_acc_after": end["eval/preference_accuracy"],
                        "success_before": start["eval/success_rate"], "success_after": end["eval/success_rate"],
                        "wall_s": time.perf_counter() - t0})
        print(f"  {label}: done in {results[-1]['wall_s']:.0f}s", file=sys.stderr)
    print(f"bundled:{args.size}, {steps} steps, batch 16, 512 held-out pairs, 256 generation prompts, "
          f"load {os.getloadavg()[0]:.1f}\n")
    print("| setting | learning_rate | beta | gamma_beta_ratio | sft_weight | preference accuracy | success rate |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['label']} | {r['learning_rate']:g} | {r['beta']:g} | {r['gamma_beta_ratio']:g} | "
              f"{r['sft_weight']:g} | {r['pref_acc_before']:.3f} → {r['pref_acc_after']:.3f} | "
              f"{r['success_before']:.3f} → {r['success_after']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"size": args.size, "steps": steps, "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
