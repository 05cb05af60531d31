"""Search overhead on the bundled task: where a trial's wall time goes (training steps vs
start-up vs eval), the per-trial fixed overhead, and a plain in-process baseline (no Ray).

Ray search: `run_search(search_spaces/cpu-tiny.yaml, scheduler="fifo", max_concurrent=2)` so every
trial runs its full `max_steps`. Per trial, from trials.csv / curves.csv (Tune's `time_total_s`
at each report, the worker's own `startup_s` and `train_time_s`):

  wall            = time_total_s at the last report (trial start -> last report)
  train steps     = train_time_s (forward/backward/optimizer steps only)
  eval+ckpt       = wall - time_total_s(step 0 report) - train_time_s
                    (the evals after step 0, checkpoint saves, reports)
  eval0 (est.)    = the eval cost of one report (eval+ckpt / reports after step 0) - an estimate of
                    the step-0 baseline eval, which has no checkpoint save
  worker startup  = startup_s (in the worker: model/tokenizer load, data, DDP wrap, optimizer)
  Ray start-up    = time_total_s(step 0) - startup_s - eval0: trial actor, TorchTrainer controller,
                    worker process spawn, imports before the worker's timer starts
  start-up        = Ray start-up + worker startup
Not inside `wall`: teardown after the last report (fit() returning, actor reuse) - it shows in
the search wall time against the sum of trial walls / concurrency.

Baseline (a fresh subprocess, no Ray): the same pieces as train.py's worker loop (load_model,
PolicyLogps, simpo_objective, AdamW, get_scheduler, the workers' Evaluator every eval_steps) for the
space's default point, timed by phase; several trials in one process, as a plain Optuna loop
would run them (imports paid once).

Usage: .venv/bin/python bench/search_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, REPO, load, machine, table, write_json  # noqa: E402


# ---- in-process baseline -----------------------------------------------------------------------

def baseline_worker(args) -> dict:
    t_proc = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    from transformers import get_scheduler

    from simpo_ray.data.collate import PairCollator
    from simpo_ray.data.prepare import load_prepared, prepare_datasets
    from simpo_ray.train.logps import PolicyLogps, simpo_objective
    from simpo_ray.train.model import load_model, load_tokenizer
    from simpo_ray.search.plan import load as load_space
    from simpo_ray.train.evaluate import Evaluator

    t_import = time.perf_counter() - t_proc
    space = load_space(str(REPO / "search_spaces" / "cpu-tiny.yaml"), overrides={"base.max_steps": args.max_steps})
    cfg = space.trial_config(space.points_to_evaluate[0])
    objective = dict(beta=cfg.beta, gamma_beta_ratio=cfg.gamma_beta_ratio, loss_type=cfg.loss_type,
                     label_smoothing=cfg.label_smoothing, sft_weight=cfg.sft_weight)
    trials = []
    for trial in range(args.baseline_trials):
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        tokenizer = load_tokenizer(cfg)
        model = load_model(cfg, device="cpu")
        prepared = prepare_datasets(cfg, tokenizer)
        train_ds, eval_ds = load_prepared(prepared.train_path), load_prepared(prepared.eval_path)
        collator = PairCollator(tokenizer.pad_token_id)
        gen = torch.Generator().manual_seed(cfg.seed)
        loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.per_device_train_batch_size, shuffle=True,
                                             generator=gen, collate_fn=collator, drop_last=True)
        policy = PolicyLogps(model)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        total = cfg.max_steps
        scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer,
                                  num_warmup_steps=math.ceil(cfg.warmup_ratio * total), num_training_steps=total)
        startup = time.perf_counter() - t0
        evals = []
        te = time.perf_counter()
        # The workers' evaluator (held-out pairs and generation), on one process.
        evaluate = Evaluator(policy, policy, tokenizer, eval_ds, collator, cfg, objective, torch.device("cpu"), 0, 1,
                             "ddp", prepared.prompt_rows(cfg.generation_eval_samples), {"step": 0})
        evaluate()
        evals.append(time.perf_counter() - te)
        train_time, step = 0.0, 0
        while step < total:
            for batch in loader:
                ts = time.perf_counter()
                out = policy(**{k: v for k, v in batch.items() if not k.startswith("prompt")})
                loss, metrics = simpo_objective(out, **objective)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                _ = {k: float(v) for k, v in metrics.items()}
                step += 1
                train_time += time.perf_counter() - ts
                if step % cfg.eval_steps == 0 or step == total:
                    te = time.perf_counter()
                    result = evaluate(step, step == total)
                    evals.append(time.perf_counter() - te)
                if step >= total:
                    break
        wall = time.perf_counter() - t0
        trials.append({"trial": trial, "wall_s": wall, "startup_s": startup, "train_time_s": train_time,
                       "eval_s": sum(evals), "eval0_s": evals[0], "n_evals": len(evals), "steps": step,
                       "s_per_step": train_time / step, "final_success_rate": result.get("eval/success_rate"),
                       "load": load()})
    return {"import_s": t_import, "trials": trials, "config": {k: getattr(cfg, k) for k in (
        "learning_rate", "beta", "gamma_beta_ratio", "sft_weight", "max_steps", "eval_steps",
        "per_device_train_batch_size", "generation_eval_samples", "max_eval_samples")}}


def run_baseline(args) -> dict:
    cmd = [sys.executable, __file__, "--baseline-worker", "--max-steps", str(args.max_steps),
           "--baseline-trials", str(args.baseline_trials)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"baseline failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = time.perf_counter() - t0  # incl. interpreter start and imports
    return out


# ---- Ray search --------------------------------------------------------------------------------

def decompose(trials, curves) -> list[dict]:
    rows = []
    for _, t in trials.iterrows():
        c = curves[curves["trial_id"] == t["trial_id"]].sort_values("step")
        if not len(c) or "time_total_s" not in c:
            continue
        first = float(c["time_total_s"].iloc[0])
        wall = float(t["wall_time_s"])
        train = float(t["final_train_time_s"])
        startup = float(t["final_startup_s"])
        n_later = max(len(c) - 1, 1)
        eval_ckpt = wall - first - train
        eval0 = eval_ckpt / n_later
        ray_start = first - startup - eval0
        rows.append({
            "trial_id": t["trial_id"], "status": t["status"], "steps": int(t["steps"]), "wall_s": wall,
            "train_time_s": train, "worker_startup_s": startup, "ray_startup_s": ray_start,
            "startup_s": ray_start + startup, "eval_ckpt_s": eval_ckpt + eval0, "first_report_s": first,
            "reports": len(c), "s_per_step": train / max(int(t["steps"]), 1),
            "train_share": train / wall, "startup_share": (ray_start + startup) / wall,
            "eval_share": (eval_ckpt + eval0) / wall, "best_objective": float(t["best_objective"]),
        })
    return rows


def main(argv=None) -> int:
    p = parser(__doc__, "search_overhead")
    p.add_argument("--quick", action="store_true", help="smoke check: 2 trials x 40 steps, 1 baseline trial")
    p.add_argument("--num-samples", type=int, default=6, help="trials in the Ray search (default 6)")
    p.add_argument("--max-steps", type=int, default=600, help="steps per trial (cpu-tiny space: 600)")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at a time (default 2)")
    p.add_argument("--baseline-trials", type=int, default=2, help="trials of the in-process baseline")
    p.add_argument("--seed", type=int, default=0, help="search seed")
    p.add_argument("--skip-baseline", action="store_true", help="only the Ray search")
    p.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.baseline_worker:
        print(json.dumps(baseline_worker(args), default=float))
        return 0
    extra = {}
    if args.quick:
        args.num_samples, args.max_steps, args.baseline_trials = 2, 40, 1
        extra = {"base.eval_steps": 20, "base.generation_eval_samples": 16, "search.grace_period": 20,
                 "search.max_t": 40}
    info = machine()
    import _search

    baseline = None
    if not args.skip_baseline:
        load_b = load()
        baseline = run_baseline(args)
        baseline["load_before"] = load_b
        print(f"  baseline done, load {load()}", file=sys.stderr, flush=True)
    load_s = load()
    storage = _search.new_storage("overhead")
    res = _search.run(storage=storage, name="overhead", num_samples=args.num_samples, max_steps=args.max_steps,
                      scheduler="fifo", seed=args.seed, max_concurrent=args.max_concurrent, extra=extra)
    load_e = load()
    rows = decompose(res["trials"], res["curves"])
    sum_train = sum(r["train_time_s"] for r in rows)
    sum_wall = sum(r["wall_s"] for r in rows)

    def med(key):
        return statistics.median(r[key] for r in rows)

    headers = ["trial", "steps", "wall s", "train steps s", "worker startup s", "Ray startup s", "eval+ckpt s",
               "train %", "start-up %", "eval %", "s/step"]
    trows = [[r["trial_id"][-5:], r["steps"], r["wall_s"], r["train_time_s"], r["worker_startup_s"],
              r["ray_startup_s"], r["eval_ckpt_s"], 100 * r["train_share"], 100 * r["startup_share"],
              100 * r["eval_share"], r["s_per_step"]] for r in rows]
    trows.append(["median", med("steps"), med("wall_s"), med("train_time_s"), med("worker_startup_s"),
                  med("ray_startup_s"), med("eval_ckpt_s"), 100 * med("train_share"), 100 * med("startup_share"),
                  100 * med("eval_share"), med("s_per_step")])
    md_trials = table(headers, trows)

    startup_fixed = med("startup_s")
    s_step = med("s_per_step")
    eval_per_step = med("eval_ckpt_s") / max(med("steps"), 1)  # evals scale with steps (every eval_steps)
    # start-up share < 20%  <=>  startup / (startup + steps * (s_step + eval_per_step)) < 0.2
    steps_for_20 = math.ceil(4 * startup_fixed / (s_step + eval_per_step))
    search = {
        "num_trials": len(rows), "max_concurrent": args.max_concurrent, "search_wall_s": res["wall_s"],
        "sum_trial_wall_s": sum_wall, "sum_train_time_s": sum_train,
        "train_share_of_search_cpu": sum_train / (res["wall_s"] * args.max_concurrent),
        "ideal_wall_s": sum_train / args.max_concurrent,
        "median_startup_s": startup_fixed, "median_startup_share": med("startup_share"),
        "steps_for_startup_under_20pct": steps_for_20, "target_met": med("startup_share") < 0.2,
        "load_start": load_s, "load_end": load_e,
    }
    md_search = table(["trials x steps", "concurrency", "search wall s", "sum train-step s",
                       "sum train / (wall x slots)", "median start-up s/trial", "median start-up share",
                       "steps for start-up < 20%", "load start-end"],
                      [[f"{len(rows)} x {args.max_steps}", args.max_concurrent, res["wall_s"], sum_train,
                        f"{100 * search['train_share_of_search_cpu']:.0f}%", startup_fixed,
                        f"{100 * search['median_startup_share']:.0f}%", steps_for_20, f"{load_s}-{load_e}"]])
    md_base = ""
    if baseline:
        brows = []
        for t in baseline["trials"]:
            brows.append([t["trial"], t["steps"], t["wall_s"], t["train_time_s"], t["startup_s"], t["eval_s"],
                          t["eval0_s"], 100 * t["train_time_s"] / t["wall_s"], 100 * t["startup_s"] / t["wall_s"],
                          t["s_per_step"], t["load"]])
        md_base = (f"in-process baseline (no Ray, 1 thread, default point; imports once: {baseline['import_s']:.1f}s, "
                   f"process wall {baseline['process_wall_s']:.1f}s)\n" + table(
                       ["trial", "steps", "wall s", "train steps s", "setup s", "eval s (all)", "eval0 s",
                        "train %", "setup %", "s/step", "load"], brows))
    print(f"\nSearch overhead, cpu-tiny space, fifo, {args.num_samples} trials x {args.max_steps} steps, "
          f"concurrency {args.max_concurrent} ({info['cpu_model']}, {info['cores']} cores, {info['date_utc']})")
    print(md_trials)
    print()
    print(md_search)
    if md_base:
        print()
        print(md_base)
    print(f"\nstart-up < 20% of a trial's wall at {args.max_steps} steps: "
          f"{'MET' if search['target_met'] else 'NOT met'} (median {100 * search['median_startup_share']:.0f}%); "
          f"needs about {steps_for_20} steps per trial at this step and eval cost")
    out = write_json(args.out, {"benchmark": "search_overhead", "machine": info, "quick": args.quick,
                                "settings": vars(args), "trials": rows, "search": search, "baseline": baseline,
                                "experiment_dir": res["exp"],
                                "markdown": "\n\n".join(x for x in (md_trials, md_search, md_base) if x)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
