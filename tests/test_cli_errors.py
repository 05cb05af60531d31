"""Bad input through the real CLIs: one `error:` line on stderr, exit status 2, before Ray starts.

Table-driven: each case writes a config (`python -m simpo_ray.train --config ...`) or a search
space (`python -m simpo_ray.tune --space ...`) derived from a valid one, runs the CLI's `main()`
in-process with `ray.init` booby-trapped (so a case that got as far as starting Ray fails), and
checks the exit status, that stderr is exactly one line starting `error:`, and what the message
names (field, value, allowed range). A few cases run as real subprocesses to show that no
traceback reaches the user, and `--debug` shows one.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TINY_SPACE = yaml.safe_load((ROOT / "search_spaces" / "cpu-tiny.yaml").read_text())
# A valid, small training config (the bundled task).
TRAIN = {"model_name_or_path": "bundled:tiny", "dataset_mixer": {"bundled:sort": 1.0}, "max_length": 64,
         "max_prompt_length": 32, "max_steps": 2, "eval_steps": 1, "max_eval_samples": 16,
         "per_device_train_batch_size": 4, "generation_eval_samples": 4, "learning_rate": 1e-3}
LOCAL_DATA = {"search.objective": "eval/preference_accuracy"}  # success_rate needs the bundled data
DELETE = object()


def _set(d: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".") if not dotted.startswith("base.dataset_mixer") else \
        ["base", "dataset_mixer"]
    for part in path:
        d = d.setdefault(part, {})
    if value is DELETE:
        d.pop(last, None)
    else:
        d[last] = value


def _fill(value, files: dict[str, str]):
    """Replace `{name}` placeholders with the fixture files' paths."""
    if isinstance(value, str):
        return value.format(**files)
    if isinstance(value, dict):
        return {_fill(k, files): _fill(v, files) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, files) for v in value]
    return value


# (id, cli, content, extra argv, regexes the message must match)
# content: a str = raw file text; a dict = changes to the valid config / space (dotted keys for
# the space; DELETE removes a key).
CASES = [
    # ---- python -m simpo_ray.train --config
    ("train-malformed-yaml", "train", "learning_rate: [1e-3\nbeta: 2\n", [],
     [r"malformed YAML at line \d+, column \d+"]),
    ("train-not-a-mapping", "train", "- learning_rate\n- beta\n", [], [r"expected a mapping", r"list"]),
    ("train-config-missing", "train", None, ["--config", "{tmp}/nope.yaml"], [r"nope\.yaml: file not found"]),
    ("train-unknown-key", "train", {"learnig_rate": 1e-3}, [],
     [r"learnig_rate: unknown key", r"did you mean 'learning_rate'"]),
    ("train-unknown-key-2", "train", {"gama_beta_ratio": 0.5}, [], [r"did you mean 'gamma_beta_ratio'"]),
    ("train-wrong-type-float", "train", {"beta": "high"}, [], [r"beta: expected a number", r"'high'"]),
    ("train-wrong-type-int", "train", {"max_steps": 2.5}, [], [r"max_steps: expected an integer", r"2\.5"]),
    ("train-wrong-type-bool", "train", {"bf16": "yes"}, [], [r"bf16: expected true or false", r"'yes'"]),
    ("train-lr-zero", "train", {"learning_rate": 0}, [],
     [r"learning_rate: 0 is out of range; allowed \(0, inf\)"]),
    ("train-label-smoothing-range", "train", {"label_smoothing": 0.7}, [],
     [r"label_smoothing: 0\.7 is out of range; allowed \[0, 0\.5\]"]),
    ("train-warmup-range", "train", {"warmup_ratio": 1.5}, [], [r"warmup_ratio: 1\.5 .*allowed \[0, 1\]"]),
    ("train-max-steps-zero", "train", {"max_steps": 0}, [], [r"max_steps: 0 .*-1 \(use epochs\) or >= 1"]),
    ("train-unknown-loss-type", "train", {"loss_type": "ipo"}, [],
     [r"loss_type: 'ipo' is not allowed", r"sigmoid, hinge"]),
    ("train-unknown-scheduler", "train", {"lr_scheduler_type": "cosine_restarts"}, [],
     [r"lr_scheduler_type: 'cosine_restarts' is not allowed", r"cosine, linear"]),
    ("train-hinge-label-smoothing", "train", {"loss_type": "hinge", "label_smoothing": 0.1}, [],
     [r"label_smoothing: 0\.1 cannot be used with loss_type 'hinge'"]),
    ("train-prompt-not-below-max-length", "train", {"max_prompt_length": 64}, [],
     [r"max_prompt_length: 64 must be smaller than max_length \(64\)"]),
    ("train-mixer-fraction", "train", {"dataset_mixer": {"bundled:sort": 1.5}}, [],
     [r"dataset_mixer\.bundled:sort: fraction 1\.5 is out of range; allowed \(0, 1\]"]),
    ("train-model-missing", "train", {"model_name_or_path": "/nonexistent/models/llama"}, [],
     [r"model path '/nonexistent/models/llama' does not exist"]),
    ("train-bundled-model-unknown", "train", {"model_name_or_path": "bundled:huge"}, [],
     [r"unknown bundled model 'bundled:huge'", r"tiny"]),
    ("train-data-missing-columns", "train", {"dataset_mixer": {"{missing_cols}": 1.0}}, [],
     [r"missing column\(s\) 'chosen', 'rejected'", r"'answer'"]),
    ("train-data-no-rows", "train", {"dataset_mixer": {"{empty}": 1.0}}, [], [r"empty\.jsonl has no rows"]),
    ("train-data-file-missing", "train", {"dataset_mixer": {"{tmp}/gone.jsonl": 1.0}}, [],
     [r"gone\.jsonl': no such file or directory"]),
    ("train-storage-not-writable", "train", {}, ["--storage-path", "{a_file}/results"],
     [r"--storage-path: .*a_file/results is not writable"]),
    ("train-more-gpus-than-cluster", "train", {}, ["--gpus-per-worker", "64"],
     [r"needs 64 GPU but no node has that many"]),
    ("train-more-cpus-than-cluster", "train", {}, ["--cpus-per-worker", "4096"],
     [r"needs 4096 CPU but no node has that many"]),
    ("train-num-workers-zero", "train", {}, ["--num-workers", "0"], [r"--num-workers: 0 is out of range; allowed >= 1"]),
    ("train-flag-wrong-type", "train", {}, ["--num-workers", "two"],
     [r"argument --num-workers: invalid int value: 'two'"]),
    ("train-unknown-flag", "train", {}, ["--learning-rate", "1e-3"], [r"unrecognized arguments: --learning-rate"]),
    # ---- python -m simpo_ray.tune --space
    ("tune-malformed-yaml", "tune", "params:\n  beta: {distribution: uniform, low: 2\n", [],
     [r"malformed YAML at line \d+"]),
    ("tune-space-missing", "tune", None, ["--space", "{tmp}/nope.yaml"], [r"nope\.yaml: file not found"]),
    ("tune-unknown-top-key", "tune", {"paramz": {}}, [], [r"paramz: unknown key", r"did you mean 'params'"]),
    ("tune-unknown-search-key", "tune", {"search.num_sample": 4}, [],
     [r"search\.num_sample: unknown key", r"did you mean 'num_samples'"]),
    ("tune-unknown-base-key", "tune", {"base.warmup_ratoi": 0.1}, [], [r"warmup_ratoi", r"did you mean 'warmup_ratio'"]),
    ("tune-unknown-param", "tune", {"params.betta": {"distribution": "uniform", "low": 1, "high": 2}}, [],
     [r"params\.betta: unknown parameter", r"did you mean 'beta'"]),
    ("tune-wrong-type", "tune", {"search.num_samples": "ten"}, [], [r"search\.num_samples: expected an integer", r"'ten'"]),
    ("tune-num-samples-zero", "tune", {"search.num_samples": 0}, [], [r"search\.num_samples: 0 is out of range; allowed \[1"]),
    ("tune-empty-range", "tune", {"params.beta": {"distribution": "uniform", "low": 3.0, "high": 3.0}}, [],
     [r"params\.beta: empty range: low 3 >= high 3"]),
    ("tune-inverted-range", "tune", {"params.beta": {"distribution": "uniform", "low": 8.0, "high": 3.0}}, [],
     [r"params\.beta: empty range: low 8 >= high 3"]),
    ("tune-log-range-touching-zero", "tune",
     {"params.sft_weight": {"distribution": "loguniform", "low": 0.0, "high": 1.0}}, [],
     [r"params\.sft_weight\.low: 0 must be > 0 for a loguniform distribution"]),
    ("tune-out-of-documented-range", "tune",
     {"params.learning_rate": {"distribution": "loguniform", "low": 1e-5, "high": 1e-3}}, [],
     [r"params\.learning_rate\.low: 1e-05 is outside the documented range for cpu \[0\.0001, 0\.01\]",
      r"--allow-out-of-range"]),
    ("tune-unknown-scheduler", "tune", {"search.scheduler": "pbt"}, [],
     [r"search\.scheduler: 'pbt' is not allowed", r"asha, hyperband, median, fifo"]),
    ("tune-unknown-sampler", "tune", {"search.sampler": "grid"}, [],
     [r"search\.sampler: 'grid' is not allowed", r"tpe, random"]),
    ("tune-unknown-scheduler-flag", "tune", {}, ["--scheduler", "pbt"],
     [r"argument --scheduler: invalid choice: 'pbt'"]),
    ("tune-unknown-objective", "tune", {"search.objective": "eval/accuracy"}, [],
     [r"search\.objective: 'eval/accuracy' is not allowed", r"eval/preference_accuracy"]),
    ("tune-wrong-mode", "tune", {"search.mode": "min"}, [], [r"search\.mode: 'min' is wrong for eval/success_rate"]),
    ("tune-unknown-loss-type", "tune", {"base.loss_type": "dpo"}, [], [r"loss_type: 'dpo' is not allowed"]),
    ("tune-hinge-label-smoothing", "tune", {"base.loss_type": "hinge", "base.label_smoothing": 0.2}, [],
     [r"label_smoothing: 0\.2 cannot be used with loss_type 'hinge'"]),
    ("tune-model-missing", "tune", {"base.model_name_or_path": "/nonexistent/models/llama"}, [],
     [r"model path '/nonexistent/models/llama' does not exist"]),
    ("tune-data-missing-columns", "tune", {**LOCAL_DATA, "base.dataset_mixer": {"{missing_cols}": 1.0}}, [],
     [r"missing column\(s\) 'chosen', 'rejected'"]),
    ("tune-data-no-rows", "tune", {**LOCAL_DATA, "base.dataset_mixer": {"{empty}": 1.0}}, [],
     [r"empty\.jsonl has no rows"]),
    ("tune-storage-not-writable", "tune", {}, ["--storage-path", "{a_file}/results"],
     [r"--storage-path: .*a_file/results is not writable"]),
    ("tune-more-gpus-than-cluster", "tune", {"resources.gpus_per_worker": 64}, [],
     [r"needs 64 GPU but no node has that many"]),
    ("tune-more-workers-than-cluster", "tune", {"resources.num_workers": 4096}, [],
     [r"one trial needs 4096 worker\(s\)"]),
    ("tune-resume-without-search", "tune", {}, ["--resume", "--storage-path", "{tmp}/empty_storage"],
     [r"--resume: .*empty_storage/cpu-tiny holds no search to resume"]),
    ("tune-dry-run-with-resume", "tune", {}, ["--dry-run", "--resume"], [r"--dry-run and --resume conflict"]),
    ("tune-max-concurrent-zero", "tune", {}, ["--max-concurrent", "0"], [r"--max-concurrent: 0 is out of range; allowed >= 1"]),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("cli_inputs")
    (tmp / "missing_cols.jsonl").write_text("".join(
        json.dumps({"prompt": f"sort {i} 3 1", "answer": "1 3"}) + "\n" for i in range(20)))
    (tmp / "empty.jsonl").write_text("")
    (tmp / "a_file").write_text("a plain file where a directory is expected\n")
    return {"tmp": str(tmp), "missing_cols": str(tmp / "missing_cols.jsonl"), "empty": str(tmp / "empty.jsonl"),
            "a_file": str(tmp / "a_file")}


def _write_input(cli: str, content, files: dict[str, str], path: Path) -> None:
    if isinstance(content, str):
        path.write_text(content)
        return
    if cli == "train":
        data = {**TRAIN, **_fill(content, files)}
    else:
        data = copy.deepcopy(TINY_SPACE)
        for key, value in _fill(content, files).items():
            _set(data, key, value)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _argv(cli: str, content, extra: list[str], files: dict[str, str], tmp_path: Path) -> list[str]:
    extra = [_fill(a, files) for a in extra]
    if content is None:  # the case names its own (missing) file
        return extra
    path = tmp_path / ("config.yaml" if cli == "train" else "cpu-tiny.yaml")
    _write_input(cli, content, files, path)
    flag = "--config" if cli == "train" else "--space"
    return [flag, str(path), "--storage-path", str(tmp_path / "results"), *extra]


def _no_ray(monkeypatch):
    """Make starting Ray fail the test: every error must come before `ray.init`."""
    import ray

    import simpo_ray.infra.cluster as cluster

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started, but the input error should have been reported before")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(cluster, "init_ray", refuse)


def _main(cli: str):
    from simpo_ray.cli import train_main, tune_main

    return train_main if cli == "train" else tune_main


def _run_in_process(cli: str, argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = _main(cli)(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    return rc, capsys.readouterr().err


def _assert_one_error_line(rc: int, err: str, patterns: list[str]) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in err
    for pattern in patterns:
        assert re.search(pattern, line), f"{pattern!r} not in {line!r}"
    return line


@pytest.mark.parametrize("case_id,cli,content,extra,patterns", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_exit_2(case_id, cli, content, extra, patterns, files, tmp_path,
                                           capsys, monkeypatch):
    _no_ray(monkeypatch)
    argv = _argv(cli, content, extra, files, tmp_path)
    rc, err = _run_in_process(cli, argv, capsys)
    _assert_one_error_line(rc, err, patterns)


def test_enough_cases():
    assert len(CASES) >= 30
    assert {c[1] for c in CASES} == {"train", "tune"}


# --------------------------------------------------------------- real subprocesses


SUBPROCESS_CASES = ("train-malformed-yaml", "train-flag-wrong-type", "tune-unknown-search-key", "tune-model-missing",
                    "train-data-missing-columns")


def _run_cli(cli: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"simpo_ray.{cli}", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_subprocess_no_traceback_reaches_the_user(case_id, files, tmp_path):
    _, cli, content, extra, patterns = next(c for c in CASES if c[0] == case_id)
    r = _run_cli(cli, _argv(cli, content, extra, files, tmp_path))
    _assert_one_error_line(r.returncode, r.stderr, patterns)


@pytest.mark.slow
def test_debug_shows_the_traceback(files, tmp_path, capsys, monkeypatch):
    from simpo_ray.errors import UserError

    _, cli, content, extra, _ = next(c for c in CASES if c[0] == "train-unknown-key")
    argv = _argv(cli, content, extra, files, tmp_path)
    r = _run_cli(cli, [*argv, "--debug"])
    assert r.returncode != 0
    assert "Traceback (most recent call last)" in r.stderr
    assert "ConfigError: " in r.stderr and "learnig_rate" in r.stderr
    # In-process, --debug lets the exception itself through.
    _no_ray(monkeypatch)
    with pytest.raises(UserError, match="did you mean 'learning_rate'"):
        _main(cli)([*argv, "--debug"])


# --------------------------------------------------------------- warnings, not errors


def test_prompts_longer_than_max_length_are_truncated_with_a_warning(tmp_path, capsys, monkeypatch, caplog):
    """Too-long prompts are not an error: they are cut (keep-end) and one warning says how many."""
    import simpo_ray.search.run as tune_mod
    from simpo_ray.cli import tune_main

    rows = [{"prompt": "sort " + " ".join(str((i * 7 + k) % 10) for k in range(60)),
             "chosen": "0 1 2", "rejected": "2 1 0"} for i in range(12)]
    rows += [{"prompt": f"sort {i + 10} {i}", "chosen": f"{i} {i + 10}", "rejected": f"{i + 10} {i}"}
             for i in range(12)]
    data = tmp_path / "long_prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    space = copy.deepcopy(TINY_SPACE)
    _set(space, "search.objective", "eval/preference_accuracy")
    _set(space, "base.dataset_mixer", {str(data): 1.0})
    space_path = tmp_path / "long.yaml"
    space_path.write_text(yaml.safe_dump(space, sort_keys=False))

    started = {}
    _no_ray(monkeypatch)
    def fake_search(*args, **kwargs):  # a finished search's directory, as run_search returns it
        import dataclasses

        from simpo_ray.search.records import SearchRecord

        started["search"] = (args, kwargs)
        exp = tmp_path / "results" / "long"
        dataclasses.replace(SearchRecord.from_space(args[0], space_path, "long"), state="finished").write(exp)
        return exp

    monkeypatch.setattr(tune_mod, "run_search", fake_search)
    with caplog.at_level(logging.WARNING, logger="simpo_ray.data.prepare"):
        rc = tune_main(["--space", str(space_path), "--storage-path", str(tmp_path / "results")])
    assert rc == 0 and "search" in started  # the checks passed and the search was launched
    warnings = [r.getMessage() for r in caplog.records
                if "pairs longer than max_length=64 truncated" in r.getMessage()]
    assert warnings, [r.getMessage() for r in caplog.records]
    assert re.search(r"train data \d+ prompts \(to their last 32 tokens\) and \d+ responses \(to 32 tokens\) "
                     r"of \d+ pairs", warnings[0])
    assert "error" not in capsys.readouterr().err

    # The tokenised prompts really are cut to max_prompt_length.
    from simpo_ray.data.prepare import load_prepared
    from simpo_ray.infra.launch import check_inputs
    from simpo_ray.search.plan import load

    sp = load(space_path)
    prepared = check_inputs(sp.default_config())
    train = load_prepared(prepared.train_path)
    assert prepared.num_train > 0
    assert max(len(p) for p in train["prompt_input_ids"]) <= 32
