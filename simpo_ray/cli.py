"""The command lines: `python -m simpo_ray.train` (`train_main`) and `python -m simpo_ray.tune`
(`tune_main`), and `run_command`, which every CLI (also `python -m analysis`) runs under.

Contract: a mistake in the input is one `error: ...` line on stderr and exit status 2
(`--debug` shows the traceback), found before any Ray process starts where that is possible.
An interrupted command (Ctrl-C) exits with status 130 (128 + SIGINT), as shells expect; a search
stopped for another reason (the disk nearly full) writes its partial tables and exits with 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable

from simpo_ray.errors import SearchStopped, UserError, one_line
from simpo_ray.io import check_name

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM
_terminated: list[int] = []  # set by the SIGTERM handler of `run_command`


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error: ...` line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_command(command: Callable[[], int], *, debug: bool) -> int:
    """`command()`'s exit status; a `UserError` becomes one `error: ...` line on stderr and
    status 2 (`SearchStopped`: status 1), or with `debug` propagates (its traceback shown).

    SIGTERM (`kill`, a job scheduler's stop) ends the command as Ctrl-C does (a search saves its
    state and writes its partial tables), with status 143; a second SIGTERM or Ctrl-C ends it at
    once. (`cluster.init_ray` keeps this handler where Ray would put its own.)
    """
    import logging

    _terminated.clear()
    ours, handler, level = logging.getLogger("simpo_ray"), None, None
    if debug:  # what the console filters drop (Ray's and Train's own lines) is shown too
        handler, level = logging.StreamHandler(sys.stderr), ours.level
        handler.setFormatter(logging.Formatter("[debug] %(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.DEBUG)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c) if main else None
    try:
        status = command()
    except (UserError, SearchStopped) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UserError) else 1
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"error: {'terminated (SIGTERM)' if _terminated else 'interrupted (Ctrl-C)'}", file=sys.stderr)
        status = EXIT_INTERRUPTED
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if handler is not None:  # the command's stderr may not outlive it (a caller's capture)
            ours.removeHandler(handler)
            ours.setLevel(level)
    return EXIT_TERMINATED if _terminated and status == EXIT_INTERRUPTED else status


def _sigterm_as_ctrl_c(signum, frame) -> None:
    """What SIGINT does now (Tune's or Train's graceful stop, else KeyboardInterrupt)."""
    _terminated.append(signum)
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):  # SIGINT ignored (a background job): SIGTERM still ends the command
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


def check_flag_ranges(args: argparse.Namespace, lowest: dict[str, float]) -> None:
    """`UserError` naming the first flag (`lowest`: attribute -> smallest allowed value) whose
    given value is below it or not finite."""
    for attr, low in lowest.items():
        value = getattr(args, attr)
        if value is not None and not (value >= low and math.isfinite(value)):
            raise UserError(f"--{attr.replace('_', '-')}: {value} is out of range; allowed >= {low}")


# ---------------------------------------------------------------- python -m simpo_ray.train


def _train_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="python -m simpo_ray.train",
        description="Run one SimPO training on Ray Train from a YAML config in the SimPO reference "
                    "trainer's key names (model_name_or_path, dataset_mixer, learning_rate, beta, "
                    "gamma_beta_ratio, sft_weight, ...).",
    )
    p.add_argument("--config", required=True, help="training config YAML")
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (DDP); default: the config's num_workers")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (default: 1 if CUDA is available)")
    p.add_argument("--storage-path", default=None, help="where Ray Train keeps checkpoints (default ./results)")
    p.add_argument("--name", default=None, help="run name under the storage path")
    p.add_argument("--metrics-out", default=None, help="write the final metrics as JSON to this file")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a local cluster)")
    p.add_argument("--max-failures", type=int, default=0, help="worker failures to recover from via checkpoints")
    p.add_argument("--debug", action="store_true", help="show tracebacks and the Ray lines the console filters drop")
    return p


def train_main(argv: list[str] | None = None) -> int:
    """`python -m simpo_ray.train`: 0 done, 1 training failed, 2 bad input, 3 diverged."""
    args = _train_parser().parse_args(argv)
    return run_command(lambda: _train(args), debug=args.debug)


def _train(args: argparse.Namespace) -> int:
    import ray
    import ray.train

    from simpo_ray.infra import cluster, launch
    from simpo_ray.config import load_train_config
    from simpo_ray.train.model import model_position_limit

    # An unset max_length: the smaller of 1024 and the model's position limit (one line says so).
    cfg = load_train_config(args.config, position_limit=model_position_limit)
    if args.name is not None:
        check_name(args.name)
    check_flag_ranges(args, {"num_workers": 1, "max_failures": 0, "cpus_per_worker": 0, "gpus_per_worker": 0})
    resources = launch.run_resources(cfg, args.num_workers, args.cpus_per_worker, args.gpus_per_worker)
    storage_path = os.path.abspath(os.path.expanduser(args.storage_path or os.path.join(os.getcwd(), "results")))
    # Everything checkable without Ray is checked before Ray starts: no Ray log line and no
    # Ray process for a mistake in the input.
    cluster.check_writable(storage_path)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        cluster.check_address(address)  # in seconds, before the data is prepared
    if not address:
        cluster.check_fits(cluster.ClusterInfo.local(), resources)
    prepared = launch.check_inputs(cfg)
    launch.claim_output_dir(cfg)  # another config's model there is refused before Ray starts
    if cfg.report_to not in (None, "none", ["none"]):  # the reference's configs set it: not silently dropped
        print(f"note: report_to: {cfg.report_to} selects a search's loggers (python -m simpo_ray.tune); this "
              "run's every report is in <storage>/<name>/history.jsonl", file=sys.stderr)
    cluster.init_ray(address, reap_orphans=False, log_to_driver=True, configure_logging=False)
    try:
        result = launch.run_training(cfg, num_workers=resources.num_workers,
                                     cpus_per_worker=resources.cpus_per_worker,
                                     gpus_per_worker=resources.gpus_per_worker, storage_path=storage_path,
                                     name=args.name, max_failures=args.max_failures, prepared=prepared)
        error = result.error
    except (ray.exceptions.RayError, ray.train.TrainingFailedError) as e:
        # Train V2's fit() raises when the workers fail more often than --max-failures allows.
        error = e
    if error is not None:
        if args.debug:
            raise error
        print(f"error: training failed: {one_line(error)}", file=sys.stderr)
        return 1
    metrics = launch.final_metrics(result)
    metrics["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    if args.metrics_out:
        from simpo_ray.io import write_json_atomic

        write_json_atomic(args.metrics_out, metrics)
    print(json.dumps({k: metrics[k] for k in sorted(metrics) if k.startswith(("eval/", "step", "status"))}, indent=1))
    _say_generation_warning(cfg, metrics)
    return 0 if metrics.get("status") != "diverged" else 3


def _say_generation_warning(cfg, metrics: dict) -> None:
    """Below the final metrics, one line when the final model's win rates mislead (answers cut
    at max_new_tokens, or length alone telling wins from losses: `train.generation_checks`)."""
    from simpo_ray.train.evaluate import is_bundled_task
    from simpo_ray.train.generation_checks import warning_line
    from simpo_ray.train.quality import max_new_tokens

    line = warning_line(metrics, max_new_tokens(cfg, is_bundled_task(cfg)))
    if line:
        print(f"[simpo-ray] final model: {line}", flush=True)


# ---------------------------------------------------------------- python -m simpo_ray.tune


def _tune_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="python -m simpo_ray.tune",
        description=(
            "Search SimPO hyperparameters (learning_rate, beta, gamma_beta_ratio, sft_weight) "
            "within the documented ranges for a model size, on a Ray cluster: Optuna TPE proposes, "
            "ASHA stops weak trials early, each trial trains with Ray Train."
        ),
        epilog=(
            "examples:\n"
            "  python -m simpo_ray.tune --space search_spaces/cpu-tiny.yaml      # bundled CPU task\n"
            "  python -m simpo_ray.tune --space search_spaces/7b.yaml --dry-run  # plan only\n"
            "  python -m simpo_ray.tune --space search_spaces/7b.yaml --address auto --storage-path s3://bucket/simpo\n"
            "  python -m simpo_ray.tune --space search_spaces/cpu-tiny.yaml --resume   # continue an interrupted search\n"
            "  python -m simpo_ray.tune --space search_spaces/cpu-base.yaml --warm-start results/cpu-tiny "
            "results/cpu-small --dry-run\n"
            "\n"
            "warm start (--warm-start, or search.warm_start: [dirs] in the space; paths relative to the\n"
            "working directory): finished searches of the same size bucket and model hand their ranked\n"
            "trials to Optuna as completed trials (not rerun); the best 3 trials of the finished size\n"
            "nearest this one run right after the documented default (search.warm_start_points: top_k;\n"
            "trend: instead the point a trend per parameter against model size predicts; prior: 3\n"
            "points drawn around it, search.warm_start_prior_samples).\n"
            "--warm-start-narrow (search.warm_start_narrow: true) also narrows each searched\n"
            "range to the predicted interval (never outside the documented range unless\n"
            "--allow-out-of-range). --dry-run prints the trials handed over, the trends and the point.\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--space", required=True, help="search space YAML (see search_spaces/)")
    p.add_argument("--storage-path", default=None,
                   help="where results and checkpoints go: a local dir (default ./results), NFS, or s3://...")
    p.add_argument("--name", default=None, help="experiment name (default: the space's name)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto' or host:port; default RAY_ADDRESS, else start a local one)")
    p.add_argument("--num-samples", type=int, default=None, help="number of trials (default: the space's)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: as many as the cluster fits)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: the space's)")
    p.add_argument("--scheduler", default=None, choices=["asha", "hyperband", "median", "fifo"],
                   help="early stopping (default: the space's; fifo = none)")
    p.add_argument("--sampler", default=None, choices=["tpe", "random"],
                   help="how trials are proposed (default: the space's; random = Optuna RandomSampler)")
    p.add_argument("--task", default=None, choices=["chat", "code", "math", "creative"],
                   help="task preset: narrows/shifts ranges as the guide's tables do")
    p.add_argument("--model-type", default=None, choices=["base", "instruct", "chat"],
                   help="model-type preset (sft_weight range)")
    p.add_argument("--allow-out-of-range", action="store_true",
                   help="search ranges outside the guide's documented ranges")
    p.add_argument("--warm-start", nargs="+", action="extend", default=None, metavar="DIR",
                   help="finished searches (their directories, or folders of them) to start from; added "
                        "after the space's search.warm_start (see below)")
    p.add_argument("--optuna-storage", default=None, metavar="URL",
                   help="the database keeping the search's Optuna study (search.optuna_storage; default: "
                        "sqlite:///<experiment>/optuna.db), e.g. postgresql://user@host/db")
    p.add_argument("--warm-start-narrow", action="store_true", default=None,
                   help="narrow the searched ranges to the interval the warm start predicts "
                        "(search.warm_start_narrow: true)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted search at --storage-path/--name (finished trials are kept)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the space against the cluster and print the plan; start no trial")
    p.add_argument("--trace-memory", action="store_true",
                   help="run the workers' own training step at the space's real size under fake tensors "
                        "(no GPU, no storage; about a minute) and print its per-GPU peak beside the plan; "
                        "a space whose traced peak does not fit is refused")
    p.add_argument("--debug", action="store_true", help="show tracebacks and the Ray lines the console filters drop")
    return p


def trace_memory(space) -> str:
    """`--trace-memory`: the traced step of one trial of `space` (`train.trace`) beside its plan;
    `UserError` when the strategy the run would use does not fit the trial's GPUs by the trace."""
    from simpo_ray.train import memory
    from simpo_ray.train.trace import size, trace_run

    cfg, res = space.default_config(), space.resources
    print(f"tracing the training step of {cfg.model_name_or_path} on {res.num_workers} worker(s) under fake "
          "tensors...", file=sys.stderr, flush=True)
    run = trace_run(cfg, res, space.estimate.params_billion if space.estimate else None)
    gb = res.gpu_memory_gb
    lines = [f"memory trace (model shape from {run.source}; {run.traces[0].micro_batches} of the "
             f"{cfg.gradient_accumulation_steps} micro-batches per step traced, every sequence {cfg.max_length} tokens):"]
    refused = None
    for t, planned in zip(run.traces, run.plans):
        overhead = planned.parts["overhead"]
        verdict = ""
        if gb is not None:
            need = t.peak + overhead
            ok = need <= memory.FIT_MARGIN * gb * memory.GB
            verdict = (f"; with {overhead / memory.GB:.0f} GB CUDA overhead {need / memory.GB:.1f} GB of "
                       f"{gb:g} GB: {'fits' if ok else 'does NOT fit'} (plans may use {memory.FIT_MARGIN:.0%})")
            if not ok and t.strategy == run.chosen:
                refused = f"{t.strategy} needs {need / memory.GB:.1f} GB per GPU by the trace"
        mark = " (the run's strategy)" if t.strategy == run.chosen else ""
        lines.append(f"  {t.summary()}{mark}; plan {size(planned.total - overhead)} without overhead{verdict}")
    if refused:
        raise UserError(f"{cfg.model_name_or_path} does not fit the trial's {gb:g} GB GPUs: {refused}; use more "
                        "workers per trial, fsdp_cpu_offload: true or a smaller per_device_train_batch_size")
    return "\n".join(lines)


def tune_main(argv: list[str] | None = None) -> int:
    """`python -m simpo_ray.tune`: 0 done, 2 bad input, 130 interrupted (partial tables written),
    1 stopped because the disk was nearly full or a write failed (partial tables written where they fit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _tune_parser().parse_args(argv)
    shown = list(argv)
    if args.optuna_storage:  # the resume line printed at an interruption masks the database password
        from simpo_ray.search.study import shown as masked

        shown = [a.replace(args.optuna_storage, masked(args.optuna_storage)) for a in shown]
    resume = shlex.join(["python", "-m", "simpo_ray.tune", *shown] + ([] if args.resume else ["--resume"]))
    return run_command(lambda: _tune(args, resume_command=resume), debug=args.debug)


def _tune(args: argparse.Namespace, resume_command: str | None = None) -> int:
    from simpo_ray.infra import cluster, launch
    from simpo_ray.search import plan
    from simpo_ray.search.records import SearchRecord
    from simpo_ray.search.run import run_search

    if args.name is not None:
        check_name(args.name)
    if args.dry_run and args.resume:
        raise UserError("--dry-run and --resume conflict: a dry run starts nothing to resume")
    check_flag_ranges(args, {"num_samples": 1, "max_concurrent": 1})
    space = plan.load(args.space, task=args.task, model_type=args.model_type,
                      allow_out_of_range=args.allow_out_of_range, num_samples=args.num_samples,
                      seed=args.seed, scheduler=args.scheduler, sampler=args.sampler,
                      max_concurrent=args.max_concurrent, warm_start=args.warm_start,
                      warm_start_narrow=args.warm_start_narrow, optuna_storage=args.optuna_storage)
    if args.dry_run:
        text, refusals = plan.dry_run(space, address=args.address, storage_path=args.storage_path, name=args.name)
        print(text, flush=True)
        if args.trace_memory:
            print(trace_memory(space))
        if refusals:  # exit as the real run would: one line, status 2
            more = f" (and {len(refusals) - 1} more, above)" if len(refusals) > 1 else ""
            raise UserError(f"the search would be refused: {refusals[0]}{more}")
        return 0
    if args.trace_memory:
        print(trace_memory(space), flush=True)
    # Check what needs no Ray before Ray starts (run_search starts it before it prepares the
    # data and plans the trials): a bad model path, bad data or a trial that cannot fit is one
    # error line, with no Ray process started and no Ray log line printed.
    cluster.check_writable(plan.storage_root(args.storage_path))
    if args.address or os.environ.get("RAY_ADDRESS"):
        cluster.check_address(args.address or os.environ["RAY_ADDRESS"])  # in seconds, before the data
    else:
        cluster.check_fits(cluster.ClusterInfo.local(), space.resources)
    prepared = launch.check_inputs(space.default_config())
    local = run_search(space, storage_path=args.storage_path, name=args.name, address=args.address,
                       resume=args.resume, prepared=prepared, resume_command=resume_command)
    # An interrupted search wrote partial tables and printed how to resume it.
    return EXIT_INTERRUPTED if SearchRecord.read(local / "search.json").state == "interrupted" else 0
