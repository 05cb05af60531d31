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
Not inside `wall`: the trial process's own start (Tune's clock starts once the process is up and
the trial function unpickled) and teardown after the last report. The driver's clock (a Tune
callback, `_DriverClock`) covers the first: from the trial's addition (a slot free; Tune then
requests its actor) to its first report, less eval0 (driver: start-up), and to its last report
(driver: wall).

Two arms, the same search otherwise (`--arms`): `train_workers` (search.local_mode: false, a
`TorchTrainer` per trial, as before issue 24) and `in_process` (search.local_mode: true, the
default: the loop in the Tune trial's own process, infra/local_run.py).

Baseline (a fresh subprocess, no Ray): the same pieces as train.py's worker loop (load_model,
PolicyLogps, simpo_objective, AdamW, get_scheduler, the workers' Evaluator every eval_steps) for the
space's default point, timed by phase; several trials in one process, as a plain Optuna loop
would run them (imports paid once).

Usage: .venv/bin/python bench/search_overhead.py [--quick] [--arms train_workers,in_process]
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


class _DriverClock:
    """Tune callback (driver side): when each trial was added (a slot free: its actor is requested
    next) and when each of its results arrived, by the driver's clock. Tune's `time_total_s` starts
    only once the trial process is up; this view includes the process start and the wait for the
    previous trial's resources too."""
    seen: dict = {}  # trial_id -> {"start": t, "results": [(step, t)]}

    def __new__(cls):
        from ray.tune import Callback

        seen = cls.seen

        class DriverClock(Callback):
            def on_step_begin(self, iteration, trials, **info):
                # A trial first appears when a slot is free (max_concurrent_trials): from then on
                # it waits only for Ray (the ended trial's resources back, its process started).
                now = time.time()
                for trial in trials:
                    seen.setdefault(trial.trial_id, {"start": now, "results": []})

            def on_trial_result(self, iteration, trials, trial, result, **info):
                seen.setdefault(trial.trial_id, {"start": float("nan"), "results": []})["results"].append(
                    (result.get("step"), time.time()))

        return DriverClock()


def with_driver_clock():
    """The search's callbacks plus `_DriverClock` (the bench's own probe; nothing else changes)."""
    from simpo_ray.search import loggers, run

    original = loggers.callbacks

    def callbacks(*args, **kwargs):
        return original(*args, **kwargs) + [_DriverClock()]

    run.loggers.callbacks = callbacks  # run.py calls loggers.callbacks(...) through the module
    return original


ARMS = {  # search.local_mode: where a single-worker trial trains
    "train_workers": False,  # a TorchTrainer per trial: controller + worker process (before)
    "in_process": True,      # in the Tune trial's own process (infra/local_run.py; after)
}


def run_arm(arm: str, args, extra: dict, _search) -> dict:
    load_s = load()
    storage = _search.new_storage(f"overhead-{arm}")
    res = _search.run(storage=storage, name=f"overhead-{arm}", num_samples=args.num_samples,
                      max_steps=args.max_steps, scheduler="fifo", seed=args.seed,
                      max_concurrent=args.max_concurrent, extra={**extra, "search.local_mode": ARMS[arm]})
    load_e = load()
    rows = decompose(res["trials"], res["curves"])
    for r in rows:  # the driver's view: from the trial's start (its process requested) to its reports
        clock = _DriverClock.seen.get(r["trial_id"], {})
        times = [t for step, t in clock.get("results", [])]
        if times and math.isfinite(clock.get("start", float("nan"))):
            r["driver_wall_s"] = times[-1] - clock["start"]
            r["driver_startup_s"] = times[0] - clock["start"] - (r["eval_ckpt_s"] / max(r["reports"], 1))
            r["driver_startup_share"] = r["driver_startup_s"] / r["driver_wall_s"]
        else:
            r["driver_wall_s"] = r["driver_startup_s"] = r["driver_startup_share"] = float("nan")
    sum_train = sum(r["train_time_s"] for r in rows)
    sum_wall = sum(r["wall_s"] for r in rows)

    def med(key):
        return statistics.median(r[key] for r in rows)

    headers = ["trial", "steps", "wall s", "train steps s", "worker startup s", "Ray startup s", "eval+ckpt s",
               "train %", "start-up %", "eval %", "s/step", "driver: wall s", "driver: start-up s",
               "driver: start-up %"]
    trows = [[r["trial_id"][-5:], r["steps"], r["wall_s"], r["train_time_s"], r["worker_startup_s"],
              r["ray_startup_s"], r["eval_ckpt_s"], 100 * r["train_share"], 100 * r["startup_share"],
              100 * r["eval_share"], r["s_per_step"], r["driver_wall_s"], r["driver_startup_s"],
              100 * r["driver_startup_share"]] for r in rows]
    trows.append(["median", med("steps"), med("wall_s"), med("train_time_s"), med("worker_startup_s"),
                  med("ray_startup_s"), med("eval_ckpt_s"), 100 * med("train_share"), 100 * med("startup_share"),
                  100 * med("eval_share"), med("s_per_step"), med("driver_wall_s"), med("driver_startup_s"),
                  100 * med("driver_startup_share")])

    def mean(key):
        return statistics.fmean(r[key] for r in rows)

    def share(part, whole):  # of all the trials' wall time together
        return sum(r[part] for r in rows) / sum(r[whole] for r in rows)

    trows.append(["mean", mean("steps"), mean("wall_s"), mean("train_time_s"), mean("worker_startup_s"),
                  mean("ray_startup_s"), mean("eval_ckpt_s"), 100 * share("train_time_s", "wall_s"),
                  100 * share("startup_s", "wall_s"), 100 * share("eval_ckpt_s", "wall_s"), mean("s_per_step"),
                  mean("driver_wall_s"), mean("driver_startup_s"), 100 * share("driver_startup_s", "driver_wall_s")])
    # A reused trial process starts nothing (start-up ~0, the eval0 estimate's noise either side):
    # the mean over trials is the cost a trial pays, the median would hide the first trials'.
    startup_fixed = mean("startup_s")
    s_step = med("s_per_step")
    eval_per_step = med("eval_ckpt_s") / max(med("steps"), 1)  # evals scale with steps (every eval_steps)
    # start-up share < 20%  <=>  startup / (startup + steps * (s_step + eval_per_step)) < 0.2
    steps_for_20 = math.ceil(4 * startup_fixed / (s_step + eval_per_step))
    search = {
        "arm": arm, "local_mode": ARMS[arm], "num_trials": len(rows), "max_concurrent": args.max_concurrent,
        "search_wall_s": res["wall_s"], "sum_trial_wall_s": sum_wall, "sum_train_time_s": sum_train,
        "train_share_of_search_cpu": sum_train / (res["wall_s"] * args.max_concurrent),
        "ideal_wall_s": sum_train / args.max_concurrent,
        "mean_startup_s": startup_fixed, "startup_share": share("startup_s", "wall_s"),
        "mean_driver_startup_s": mean("driver_startup_s"),
        "driver_startup_share": share("driver_startup_s", "driver_wall_s"),
        "steps_for_startup_under_20pct": steps_for_20,
        "target_met": max(share("startup_s", "wall_s"), share("driver_startup_s", "driver_wall_s")) < 0.2,
        "load_start": load_s, "load_end": load_e, "experiment_dir": res["exp"],
    }
    return {"rows": rows, "search": search, "md_trials": table(headers, trows)}


def main(argv=None) -> int:
    p = parser(__doc__, "search_overhead")
    p.add_argument("--quick", action="store_true", help="smoke check: 2 trials x 40 steps, 1 baseline trial")
    p.add_argument("--num-samples", type=int, default=6, help="trials in the Ray search (default 6)")
    p.add_argument("--max-steps", type=int, default=600, help="steps per trial (cpu-tiny space: 600)")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at a time (default 2)")
    p.add_argument("--baseline-trials", type=int, default=2, help="trials of the in-process baseline")
    p.add_argument("--seed", type=int, default=0, help="search seed")
    p.add_argument("--skip-baseline", action="store_true", help="only the Ray search")
    p.add_argument("--arms", default="train_workers,in_process",
                   help="where trials train (search.local_mode): train_workers (false), in_process (true)")
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
    with_driver_clock()
    arms = {}
    for arm in args.arms.split(","):
        arms[arm] = run_arm(arm, args, extra, _search)
        print(f"  arm {arm} done, load {load()}", file=sys.stderr, flush=True)
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
    for arm, out in arms.items():
        print(f"\n{arm} (search.local_mode: {str(ARMS[arm]).lower()})")
        print(out["md_trials"])
    srows = [[arm, f"{len(out['rows'])} x {args.max_steps}", args.max_concurrent, out["search"]["search_wall_s"],
              out["search"]["sum_train_time_s"], f"{100 * out['search']['train_share_of_search_cpu']:.0f}%",
              out["search"]["mean_startup_s"], f"{100 * out['search']['startup_share']:.0f}%",
              out["search"]["mean_driver_startup_s"], f"{100 * out['search']['driver_startup_share']:.0f}%",
              out["search"]["steps_for_startup_under_20pct"],
              f"{out['search']['load_start']}-{out['search']['load_end']}"] for arm, out in arms.items()]
    md_search = table(["arm", "trials x steps", "concurrency", "search wall s", "sum train-step s",
                       "sum train / (wall x slots)", "mean start-up s/trial", "start-up share",
                       "driver: mean start-up s/trial", "driver: start-up share",
                       "steps for start-up < 20%", "load start-end"], srows)
    print()
    print(md_search)
    if "train_workers" in arms and "in_process" in arms:
        before, after = arms["train_workers"]["search"], arms["in_process"]["search"]
        print(f"\nin_process / train_workers: start-up per trial {after['mean_startup_s'] / before['mean_startup_s']:.2f}x "
              f"(driver's clock {after['mean_driver_startup_s'] / before['mean_driver_startup_s']:.2f}x), "
              f"search wall {after['search_wall_s'] / before['search_wall_s']:.2f}x")
    if md_base:
        print()
        print(md_base)
    for arm, out in arms.items():
        search = out["search"]
        print(f"{arm}: start-up < 20% of a trial's wall at {args.max_steps} steps: "
              f"{'MET' if search['target_met'] else 'NOT met'} ({100 * search['startup_share']:.0f}% "
              f"in Tune's time, {100 * search['driver_startup_share']:.0f}% by the driver's clock); "
              f"needs about {search['steps_for_startup_under_20pct']} steps per trial at this step and eval cost")
    md_trials = "\n\n".join(f"{arm}\n{out['md_trials']}" for arm, out in arms.items())
    out = write_json(args.out, {"benchmark": "search_overhead", "machine": info, "quick": args.quick,
                                "settings": vars(args), "arms": {a: {"trials": o["rows"], "search": o["search"]}
                                                                 for a, o in arms.items()},
                                "baseline": baseline,
                                "markdown": "\n\n".join(x for x in (md_trials, md_search, md_base) if x)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
