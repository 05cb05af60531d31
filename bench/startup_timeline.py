"""Where a trial's start-up goes: a phase-by-phase timeline of the Ray processes of each trial.

Runs a bundled cpu-tiny search one trial at a time (fifo, concurrency 1, so every process
belongs to the one running trial) while a thread samples the process table every 50 ms. Ray
names its worker processes `ray::IDLE` while they start and `ray::<Actor>.<method>` while they
run, so for each trial we get when each process was created and when it first ran its actor:

  trial process       Tune's trial actor (ImplicitFunc): created -> its `train` starts
  trial fn -> ctrl    the trial function (imports ray.train.torch/torch, builds TorchTrainer)
                      until Train's TrainController process is created
  controller          TrainController: process created -> `run` starts (imports, init)
  ctrl -> worker      controller run -> the RayTrainWorker process is created (the worker
                      placement group, the sync actor and PG cleaner are created meanwhile)
  worker process      RayTrainWorker: created -> ready (Ray start-up, torch import,
                      torch.distributed process group)
  worker -> loop      worker ready -> our train loop's timer starts (deserialising the loop)
  loop setup          our `startup_s`: config, tokenizer, model, data, DDP wrapper
  step-0 eval         the baseline evaluation (not start-up; reported for completeness)

Tune's `time_total_s` starts at the trial function, so the first phase is not in a trial's
reported wall time (it is in the search's). Also counted: the number of Ray worker processes
each trial starts (every one is a new Python interpreter importing ray).

Usage: .venv/bin/python bench/startup_timeline.py [--trials 4] [--max-steps 100]
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import parser, load, machine, table, write_json  # noqa: E402

PHASES = ("trial process", "trial fn -> ctrl", "controller", "ctrl -> worker", "worker process",
          "worker -> loop", "loop setup")


class ProcessSampler:
    """Samples `ray::` process titles: pid -> create time and first time of each title."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.seen: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            now = time.time()
            for p in psutil.process_iter(["pid", "cmdline", "create_time"]):
                try:
                    cmd = p.info["cmdline"] or []
                    title = (cmd[0] if len(cmd) == 1 else " ".join(cmd)).strip()
                    if not title.startswith("ray::"):
                        continue
                    entry = self.seen.setdefault(p.info["pid"], {"create": p.info["create_time"], "titles": {}})
                    entry["titles"].setdefault(title[len("ray::"):], now)
                except (psutil.Error, TypeError):
                    continue
            self._stop.wait(self.interval_s)

    def processes(self) -> list[dict]:
        out = []
        for pid, e in self.seen.items():
            names = [t for t in e["titles"] if t != "IDLE"]
            actor = names[0].split(".")[0] if names else "IDLE"
            first_run = {t: ts for t, ts in e["titles"].items() if t != "IDLE"}
            out.append({"pid": pid, "actor": actor, "create": e["create"], "titles": first_run})
        return sorted(out, key=lambda p: p["create"])


def _first(titles: dict[str, float], *prefixes: str) -> float | None:
    hits = [ts for t, ts in titles.items() if any(t.startswith(p) for p in prefixes)]
    return min(hits) if hits else None


def trial_pids(exp: str) -> dict[int, str]:
    """Tune's trial process pid -> trial id, from each trial's result.json (Tune records both)."""
    out = {}
    for path in Path(exp).glob("*/result.json"):
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[int(r["pid"])] = r["trial_id"]
                break
    return out


def timelines(procs: list[dict], curves, pids: dict[int, str]) -> list[dict]:
    """One row per trial: the phase durations, from the processes created during that trial."""
    trial_procs = [p for p in procs if p["actor"] == "ImplicitFunc"]
    rows = []
    for i, tp in enumerate(trial_procs):
        tid = pids.get(tp["pid"])
        end = trial_procs[i + 1]["create"] if i + 1 < len(trial_procs) else float("inf")
        mine = [p for p in procs if tp["create"] <= p["create"] < end]
        by_actor: dict[str, dict] = {}
        for p in mine:
            by_actor.setdefault(p["actor"], p)
        ctrl, worker = by_actor.get("TrainController"), by_actor.get("RayTrainWorker")
        t_train = _first(tp["titles"], "ImplicitFunc.train")
        c = curves[curves["trial_id"] == tid].sort_values("step")
        if not (tid and ctrl and worker and t_train and len(c)):
            continue
        t_ctrl_run = _first(ctrl["titles"], "TrainController.run") or min(ctrl["titles"].values())
        # The worker is ready when it first sits idle between calls (title exactly RayTrainWorker).
        t_w_ready = worker["titles"].get("RayTrainWorker") or max(worker["titles"].values())
        startup_s, eval0 = float(c["startup_s"].iloc[0]), _eval0(c)
        # Tune's time_total_s counts from the trial fn; at the step-0 report it covers everything
        # up to our loop's start, then the loop setup (startup_s) and the step-0 eval.
        loop_start = t_train + float(c["time_total_s"].iloc[0]) - eval0 - startup_s
        phases = {
            "trial process": t_train - tp["create"],
            "trial fn -> ctrl": ctrl["create"] - t_train,
            "controller": t_ctrl_run - ctrl["create"],
            "ctrl -> worker": worker["create"] - t_ctrl_run,
            "worker process": t_w_ready - worker["create"],
            "worker -> loop": loop_start - t_w_ready,
            "loop setup": startup_s,
        }
        rows.append({"trial_id": tid, **{k: round(v, 3) for k, v in phases.items()},
                     "start-up total": round(sum(phases.values()), 3), "step-0 eval": round(eval0, 3),
                     "train steps": round(float(c["train_time_s"].iloc[-1]), 3),
                     "processes": len(mine), "actors": sorted({p["actor"] for p in mine})})
    return rows


def _eval0(c) -> float:
    """The step-0 eval's duration, estimated as the mean eval+report time of the later reports."""
    if len(c) < 2:
        return 0.0
    wall = float(c["time_total_s"].iloc[-1] - c["time_total_s"].iloc[0])
    return max(0.0, (wall - float(c["train_time_s"].iloc[-1])) / (len(c) - 1))


def main(argv=None) -> int:
    p = parser(__doc__, "startup_timeline")
    p.add_argument("--trials", type=int, default=4, help="trials, run one at a time")
    p.add_argument("--max-steps", type=int, default=100, help="steps per trial")
    args = p.parse_args(argv)

    import _search

    info = machine()
    with ProcessSampler() as sampler:
        res = _search.run(storage=_search.new_storage("timeline"), name="timeline", num_samples=args.trials,
                          max_steps=args.max_steps, scheduler="fifo", seed=0, max_concurrent=1,
                          extra={"base.eval_steps": args.max_steps})
    procs, pids = sampler.processes(), trial_pids(res["exp"])
    rows = timelines(procs, res["curves"], pids)
    if not rows:
        print(f"no trial timeline: {len(procs)} ray processes seen "
              f"({sorted({p['actor'] for p in procs})}), trial pids {pids}", file=sys.stderr)
    cols = list(PHASES) + ["start-up total", "step-0 eval", "train steps", "processes"]
    med = {c: statistics.median(r[c] for r in rows) for c in cols} if rows else {}
    body = [[r["trial_id"][-5:]] + [r[c] for c in cols] for r in rows]
    body.append(["median"] + [med.get(c, float("nan")) for c in cols])
    md = table(["trial"] + cols, body)
    title = (f"Start-up timeline, cpu-tiny, {args.trials} trials x {args.max_steps} steps, one at a time "
             f"({info['cpu_model']}, {info['cores']} cores, {info['date_utc']}, load {info['load_at_start'][0]}-{load()})")
    print(f"\n{title}\n{md}")
    if rows:
        print(f"\nprocesses started per trial: {', '.join(rows[0]['actors'])}")
    write_json(args.out, {"benchmark": "startup_timeline", "machine": info, "settings": vars(args),
                          "search_wall_s": res["wall_s"], "trials": rows, "median": med,
                          "markdown": f"{title}\n{md}"})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
