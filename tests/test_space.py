"""Search spaces against the guide. Expected numbers are typed here from the guide's text
(shared/reference/simpo-hyperparameters.md beside the repository), not read from simpo_ray.guide, so a wrong
table in guide.py fails these tests. Fast: no Ray, no torch."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest

from simpo_ray import guide
from simpo_ray.errors import ConfigError
from simpo_ray.search.describe import describe_space
from simpo_ray.search.estimate import estimate_gpu_hours
from simpo_ray.search.plan import load

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
SHIPPED = sorted(SPACES.glob("*.yaml"))
GPU_SPACES = {"1b-3b": "1b-3b", "7b": "7b-8b", "8b-13b": "8b-13b", "13b-30b": "13b-30b", "70b": "70b+"}
CPU_SPACES = ("cpu-tiny", "cpu-small", "cpu-base")

# --- the guide, typed by hand --------------------------------------------------------------
# "Learning Rate > By model size"
ROW = {"1B-3B": (5e-7, 1e-6), "7B-8B": (3e-7, 5e-7), "13B-30B": (1e-7, 3e-7), "70B+": (5e-8, 1e-7)}
# "Why Learning Rate Matters": too low < 1e-7, too high > 1e-6 (for 7B)
LR_7B_USABLE = (1e-7, 1e-6)
# Documented envelope per bucket: the bucket's row(s) and the rows next to them (for 7B-8B that
# is exactly the guide's usable bounds above).
ENVELOPE = {"1b-3b": (3e-7, 1e-6), "7b-8b": (1e-7, 1e-6), "8b-13b": (5e-8, 1e-6),
            "13b-30b": (5e-8, 5e-7), "70b+": (5e-8, 3e-7), "cpu": (1e-4, 1e-2)}
# Rows each bucket must cover.
COVERS = {"1b-3b": ["1B-3B"], "7b-8b": ["7B-8B"], "8b-13b": ["7B-8B", "13B-30B"],
          "13b-30b": ["13B-30B"], "70b+": ["70B+"]}
# "Recommended effective batch sizes" (1b-3b: the 7B row, extrapolated)
EFFECTIVE_BATCH = {"1b-3b": (128, 256), "7b-8b": (128, 256), "8b-13b": (64, 128),
                   "13b-30b": (64, 128), "70b+": (32, 64)}
BETA_RANGE = (2.0, 10.0)       # "Range: 2.0 to 10.0"
GAMMA_RANGE = (0.0, 1.0)       # "Range: 0.0 to 1.0"
SFT_BY_MODEL_TYPE = {"base": (0.0, 0.05), "instruct": (0.05, 0.1), "chat": (0.1, 0.2), None: (0.0, 1.0)}


def inside(lo, hi, outer, rel=1e-9):
    return outer[0] * (1 - rel) - 1e-15 <= lo and hi <= outer[1] * (1 + rel) + 1e-15


def approx_point(point, expected):
    assert set(point) == set(expected)
    for k, v in expected.items():
        assert point[k] == pytest.approx(v, rel=1e-9, abs=1e-15), k


# --- shipped spaces ------------------------------------------------------------------------


def test_all_expected_spaces_are_shipped():
    assert {p.stem for p in SHIPPED} == set(GPU_SPACES) | set(CPU_SPACES)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_space_loads_inside_the_guide(path):
    s = load(path)
    p = s.params
    assert set(p) == {"learning_rate", "beta", "gamma_beta_ratio", "sft_weight"}
    lr = (p["learning_rate"].low, p["learning_rate"].high)
    assert p["learning_rate"].distribution == "loguniform"
    assert inside(*lr, ENVELOPE[s.size_bucket])
    if s.size_bucket != "cpu":
        assert inside(*lr, (5e-8, 1e-6))  # nothing in the guide is below 5e-8 or above 1e-6
        for row in COVERS[s.size_bucket]:  # the search covers the guide's own row(s)
            assert lr[0] <= ROW[row][0] * (1 + 1e-9) and ROW[row][1] <= lr[1] * (1 + 1e-9)
        eb = s.effective_batch
        assert EFFECTIVE_BATCH[s.size_bucket][0] <= eb <= EFFECTIVE_BATCH[s.size_bucket][1]
        assert s.base["bf16"] is True and s.base["gradient_checkpointing"] is True
        # Generation quality ranks trials wherever generation is affordable (not 70b: bench/eval_cost.py);
        # the reward model loads with plain transformers, and every ASHA rung gets a fresh value.
        if s.size_bucket == "70b+":
            assert s.search.objective == "eval/preference_accuracy" and s.base["generation_eval_samples"] == 0
        else:
            assert s.search.objective == "eval/reward_win_rate_lc"
            assert s.base["reward_model_name_or_path"].startswith("Skywork/Skywork-Reward-V2-")
            assert s.search.grace_period % s.base["eval_steps"] == 0
        assert s.resources.gpus_per_worker >= 1
    else:
        assert s.search.objective == "eval/success_rate"
        r = s.resources
        assert (r.num_workers, r.cpus_per_worker, r.gpus_per_worker) == (1, 1, 0)
        assert s.search.num_samples == 12 and s.search.scheduler == "asha" and s.search.time_attr == "step"
        assert s.base["model_name_or_path"] == f"bundled:{path.stem.split('-')[1]}"
    assert inside(p["beta"].low, p["beta"].high, BETA_RANGE)
    assert inside(p["gamma_beta_ratio"].low, p["gamma_beta_ratio"].high, GAMMA_RANGE)
    assert inside(p["sft_weight"].low, p["sft_weight"].high, SFT_BY_MODEL_TYPE[s.model_type])
    assert s.search.mode == "max"
    # Every point to evaluate lies inside the searched space.
    for point in s.points_to_evaluate:
        for k, v in point.items():
            assert p[k].low - 1e-15 <= v <= p[k].high + 1e-15
    describe_space(s)
    est = estimate_gpu_hours(s)
    assert est["steps_per_trial"] > 0


def test_gpu_spaces_are_in_their_buckets():
    for stem, bucket in GPU_SPACES.items():
        assert load(SPACES / f"{stem}.yaml").size_bucket == bucket


def test_7b_default_is_first_and_matches_the_guides_standard_config():
    s = load(SPACES / "7b.yaml")
    # "7B Models (Mistral, Llama 3)": lr 5e-7, beta 2.0, gamma_beta_ratio 0.5, sft_weight 0.0
    approx_point(s.points_to_evaluate[0], {"learning_rate": 5e-7, "beta": 2.0,
                                           "gamma_beta_ratio": 0.5, "sft_weight": 0.0})
    assert s.point_labels[0].startswith("guide default")
    # The SimPO reference's Mistral-Base setting (3e-7, 2.0, 0.8, sft 0) follows, unclipped.
    approx_point(s.points_to_evaluate[1], {"learning_rate": 3e-7, "beta": 2.0,
                                           "gamma_beta_ratio": 0.8, "sft_weight": 0.0})
    assert "Mistral-Base" in s.point_labels[1]


def test_70b_default_is_first_and_matches_the_guides_standard_config():
    s = load(SPACES / "70b.yaml")
    # "70B Models": lr 1e-7, beta 2.0, gamma_beta_ratio 0.5, sft_weight 0.05
    approx_point(s.points_to_evaluate[0], {"learning_rate": 1e-7, "beta": 2.0,
                                           "gamma_beta_ratio": 0.5, "sft_weight": 0.05})


def test_8b_13b_default_and_clipped_reference_points():
    s = load(SPACES / "8b-13b.yaml")
    # "8B-13B Models": lr 3e-7, beta 2.5, gamma_beta_ratio 0.5, sft_weight 0.1 (instruct)
    approx_point(s.points_to_evaluate[0], {"learning_rate": 3e-7, "beta": 2.5,
                                           "gamma_beta_ratio": 0.5, "sft_weight": 0.1})
    # Llama3-Instruct (1e-6, 2.5, 0.55) and v0.2 (1e-6, 10, 0.3), sft 0 clipped to instruct's 0.05
    approx_point(s.points_to_evaluate[1], {"learning_rate": 1e-6, "beta": 2.5,
                                           "gamma_beta_ratio": 0.55, "sft_weight": 0.05})
    approx_point(s.points_to_evaluate[2], {"learning_rate": 1e-6, "beta": 10.0,
                                           "gamma_beta_ratio": 0.3, "sft_weight": 0.05})
    assert sum("clipped to 0.05" in n for n in s.notes) == 2


# --- presets -------------------------------------------------------------------------------


@pytest.mark.parametrize("task, lr_range, lr_default", [
    # "By task type": chat 5e-7, code 3e-7, math 3e-7, creative 1e-6; ranges shift by the same
    # factor inside the 7B usable bounds [1e-7, 1e-6].
    ("chat", (1e-7, 1e-6), 5e-7),
    ("code", (1e-7, 6e-7), 3e-7),
    ("math", (1e-7, 6e-7), 3e-7),
    ("creative", (2e-7, 1e-6), 1e-6),
])
def test_task_preset_shifts_the_learning_rate(task, lr_range, lr_default):
    s = load(SPACES / "7b.yaml", task=task)
    assert s.task == task  # the command line replaces the file's preset (chat)
    lr = s.params["learning_rate"]
    assert (lr.low, lr.high) == pytest.approx(lr_range, rel=1e-9)
    assert s.points_to_evaluate[0]["learning_rate"] == pytest.approx(lr_default, rel=1e-9)
    # Tasks do not move beta / gamma (the guide ties them to preference strength).
    assert s.points_to_evaluate[0]["beta"] == 2.0 and s.points_to_evaluate[0]["gamma_beta_ratio"] == 0.5


@pytest.mark.parametrize("task", ["code", "math"])
def test_reasoning_tasks_add_the_guides_reasoning_example(task):
    s = load(SPACES / "7b.yaml", task=task)
    # "Llama 3 8B Instruct (Reasoning)": beta 5.0, gamma_beta_ratio 0.7 at lr 3e-7
    assert {"learning_rate": 3e-7, "beta": 5.0, "gamma_beta_ratio": 0.7, "sft_weight": 0.0} in [
        {k: round(v, 12) for k, v in pt.items()} for pt in s.points_to_evaluate]


@pytest.mark.parametrize("model_type, sft_range, sft_default", [
    ("base", (0.0, 0.05), 0.0),       # "Base model 0.0" (+ 0.05 headroom, see guide.py)
    ("instruct", (0.05, 0.1), 0.1),   # "Instruct model 0.05-0.1"; 7B config "0.1 if instruct"
    ("chat", (0.1, 0.2), 0.2),        # "Chat model 0.1-0.2"; "Chat model (moderate SFT): 0.2"
    ("none", (0.0, 1.0), 0.0),        # "Range: 0.0 to 1.0", "Default: 0.0"
])
def test_model_type_preset_sets_sft_weight(model_type, sft_range, sft_default):
    s = load(SPACES / "7b.yaml", model_type=model_type)
    assert s.model_type == (None if model_type == "none" else model_type)
    sft = s.params["sft_weight"]
    assert (sft.low, sft.high) == pytest.approx(sft_range)
    assert s.points_to_evaluate[0]["sft_weight"] == pytest.approx(sft_default)


def test_task_preset_shifts_within_the_70b_envelope():
    s = load(SPACES / "70b.yaml", task="creative")
    lr = s.params["learning_rate"]
    # 70B creative: 2 x the 70B default (1e-7) = 2e-7, range moved up but capped at 3e-7
    assert (lr.low, lr.high) == pytest.approx((1e-7, 3e-7))
    assert s.points_to_evaluate[0]["learning_rate"] == pytest.approx(2e-7)


def test_explicit_bounds_are_checked_against_a_command_line_preset():
    # 8b-13b.yaml writes lr [1e-7, 1e-6] explicitly; the code preset allows at most 6e-7 there.
    with pytest.raises(ConfigError, match=r"params\.learning_rate\.high: 1e-06 .*task code"):
        load(SPACES / "8b-13b.yaml", task="code")


PRESET_TASKS = (None, "none", "chat", "code", "math", "creative")
PRESET_MODEL_TYPES = (None, "none", "base", "instruct", "chat")


def expected_refusal(stem: str, task: str | None, model_type: str | None) -> str | None:
    """The one refusal a shipped space may meet under presets, from the guide's tables typed
    above: an explicit bound of the space outside the preset's documented range. The CPU spaces
    search sft_weight over [0, 1] (measured), which every model-type preset narrows
    (SFT_BY_MODEL_TYPE: base's high 0.05 is below 1; instruct's and chat's lows are above 0);
    8b-13b searches learning rates up to 1e-6, above the code/math documented ceiling of 6e-7."""
    if stem.startswith("cpu") and model_type in ("base", "instruct", "chat"):
        assert not inside(0.0, 1.0, SFT_BY_MODEL_TYPE[model_type])
        return "params.sft_weight.high: 1 " if model_type == "base" else "params.sft_weight.low: 0 "
    if stem == "8b-13b" and task in ("code", "math"):
        return "params.learning_rate.high: 1e-06 "
    return None


def test_every_preset_of_every_shipped_space_loads_or_is_refused_as_the_guide_says():
    """Each of the 8 spaces x 6 tasks x 5 model types: refused with exactly the expected field
    and value, or loaded with every start point inside the searched ranges."""
    wrong = []
    for path in SHIPPED:
        for task in PRESET_TASKS:
            for model_type in PRESET_MODEL_TYPES:
                case, expected = (path.stem, task, model_type), expected_refusal(path.stem, task, model_type)
                try:
                    s = load(path, task=task, model_type=model_type)
                except ConfigError as e:
                    if expected is None or f"{path}: {expected}is outside the documented range" not in str(e):
                        wrong.append((case, f"refused: {e}", f"expected: {expected or 'loads'}"))
                    continue
                if expected is not None:
                    wrong.append((case, "loaded", f"expected refusal {expected}"))
                elif not s.point_labels[0].startswith("guide default") or not all(
                        s.params[k].contains(v) or s.params[k].low <= v <= s.params[k].high
                        for point in s.points_to_evaluate for k, v in point.items()):
                    wrong.append((case, "a start point outside the searched range", s.points_to_evaluate))
    assert wrong == []


# --- validation errors ---------------------------------------------------------------------

VALID = {
    "name": "toy",
    "size_bucket": "7b-8b",
    "task": "chat",
    "model_type": "instruct",
    "base": {"model_name_or_path": "some/model", "dataset_mixer": {"some/data": 1.0},
             "per_device_train_batch_size": 2, "gradient_accumulation_steps": 8},
    "params": {
        "learning_rate": {"distribution": "loguniform", "low": 1e-7, "high": 1e-6},
        "beta": {"distribution": "uniform", "low": 2.0, "high": 10.0},
        "gamma_beta_ratio": {"distribution": "uniform", "low": 0.0, "high": 1.0},
        "sft_weight": {"distribution": "uniform", "low": 0.05, "high": 0.1},
    },
    "resources": {"num_workers": 8, "cpus_per_worker": 4, "gpus_per_worker": 1},
    "search": {"num_samples": 8, "objective": "eval/preference_accuracy", "mode": "max",
               "scheduler": "asha", "grace_period": 10, "max_t": 100},
}


def mutate(path: str, value):
    """VALID with one dotted key set."""
    data = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node = data
    for k in parents:
        node = node.setdefault(k, {})
    node[last] = value
    return data

ERRORS = [
    # (dotted key, value, substrings the message must contain)
    ("serach", {}, ["serach", "did you mean 'search'"]),
    ("search.num_sample", 4, ["search.num_sample", "did you mean 'num_samples'"]),
    ("params.beta.distrib", "uniform", ["params.beta.distrib", "unknown key"]),
    ("params.learning_rat", {"distribution": "uniform", "low": 1e-7, "high": 1e-6},
     ["params.learning_rat", "did you mean 'learning_rate'"]),
    ("params.warmup_ratio", {"distribution": "uniform", "low": 0.0, "high": 0.1},
     ["params.warmup_ratio", "fix it in base"]),
    ("resources.num_workers", "eight", ["resources.num_workers", "expected an integer", "'eight'"]),
    ("params.beta.low", "two", ["params.beta.low", "expected a number", "'two'"]),
    ("params.beta.distribution", "normal",
     ["params.beta.distribution", "'normal'", "loguniform, uniform, choice"]),
    ("params.beta.low", 12.0, ["params.beta", "empty range", "low 12 >= high 10"]),
    ("params.gamma_beta_ratio.high", 0.0, ["params.gamma_beta_ratio", "empty range", "low 0 >= high 0"]),
    ("params.learning_rate.low", 0.0, ["params.learning_rate.low", "0", "must be > 0", "loguniform"]),
    ("params.learning_rate.high", 5e-6, ["params.learning_rate.high: 5e-06 is outside the documented range "
                                         "for 7b-8b, task chat [1e-07, 1e-06]", "--allow-out-of-range"]),
    ("params.learning_rate.low", 5e-8, ["params.learning_rate.low: 5e-08", "[1e-07, 1e-06]"]),
    ("params.beta.high", 20.0, ["params.beta.high: 20 is outside the guide's documented range [1, 10]"]),
    ("params.sft_weight.high", 0.3, ["params.sft_weight.high: 0.3", "model type instruct [0.05, 0.1]"]),
    ("params.beta", {"distribution": "choice", "values": [2.0, 12.0]},
     ["params.beta.values[1]: 12", "[1, 10]"]),
    ("search.scheduler", "ashaa",
     ["search.scheduler", "'ashaa'", "did you mean 'asha'", "asha, hyperband, median, fifo"]),
    ("search.sampler", "grid", ["search.sampler", "'grid'", "tpe, random"]),
    ("search.mode", "maximize", ["search.mode", "'maximize'", "max, min"]),
    ("search.objective", "eval/loss", ["search.mode", "eval/loss", "use mode: min"]),
    ("search.objective", "eval/accuracy",
     ["search.objective", "'eval/accuracy'", "eval/preference_accuracy"]),
    ("search.objective", "eval/success_rate", ["search.objective", "bundled", "some/data"]),
    ("search.max_t", 5, ["search.max_t", "5", "grace_period 10"]),
    ("search.time_attr", "epoch", ["search.time_attr", "'epoch'", "step, samples, tokens"]),
    ("task", "coding", ["task", "'coding'", "chat, code, math, creative"]),
    ("model_type", "sft", ["model_type", "'sft'", "base, instruct, chat"]),
    ("size_bucket", "7b", ["size_bucket", "'7b'", "did you mean '7b-8b'", "70b+"]),
    ("resources.num_workers", 0, ["resources.num_workers", "0", "allowed [1, inf)"]),
    ("resources.cpus_per_worker", 0, ["resources.cpus_per_worker", "0", "allowed (0, inf)"]),
    ("resources.gpus_per_worker", -1, ["resources.gpus_per_worker", "-1", "allowed [0, inf)"]),
    ("search.num_samples", 0, ["search.num_samples", "0", "allowed [1, inf)"]),
    ("base.beta", 2.5, ["params.beta", "also fixed in base", "2.5"]),
    ("base.lerning_rate", 5e-7, ["base.lerning_rate", "unknown key", "did you mean 'learning_rate'"]),
    ("base.warmup_ratio", 2.0, ["base.warmup_ratio", "2", "[0, 1]"]),
    ("base.per_device_train_batch_size", "two",
     ["base.per_device_train_batch_size", "expected an integer", "'two'"]),
    ("base.num_workers", 4, ["base.num_workers", "resources.num_workers"]),
    ("base.sft_weight", 0.5, ["base.sft_weight: 0.5", "model type instruct [0.05, 0.1]"]),
    ("params.learning_rate.range", "guide",
     ["params.learning_rate.range", "'guide'", "documented, recommended"]),
    ("search.points_to_evaluate", {"extra": [{"beta": 11.0}]},
     ["search.points_to_evaluate.extra[0].beta", "11", "uniform 2 to 10"]),
    ("search.points_to_evaluate", "all", ["search.points_to_evaluate", "'all'", "default_only"]),
    ("params", {}, ["params", "empty"]),
]
# Cases that need a second edit to isolate the error they test.
PREPARE = {
    # A fixed parameter must lie in its documented range too: stop searching it first.
    "base.sft_weight": lambda d: d["params"].pop("sft_weight"),
    # `range:` replaces low/high.
    "params.learning_rate.range": lambda d: [d["params"]["learning_rate"].pop(k) for k in ("low", "high")],
}


@pytest.mark.parametrize("key, value, expected", ERRORS, ids=[f"{k}={v!r}"[:60] for k, v, _ in ERRORS])
def test_validation_errors_name_field_value_and_range(key, value, expected):
    data = mutate(key, value)
    if key in PREPARE:
        PREPARE[key](data)
    with pytest.raises(ConfigError) as exc:
        load(data)
    for part in expected:
        assert part in str(exc.value), (part, str(exc.value))


def test_valid_fixture_loads():
    s = load(VALID)
    assert s.effective_batch == 2 * 8 * 8


def test_file_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("size_bucket: 7b-8b\nparams: {beta: {distribution: uniform, low: 2.0, high: 20.0}}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: params\.beta\.high: 20 "):
        load(f)
    with pytest.raises(ConfigError, match="file not found"):
        load(tmp_path / "missing.yaml")


def test_allow_out_of_range_loads_the_space():
    data = mutate("params.learning_rate.high", 5e-6)
    with pytest.raises(ConfigError):
        load(data)
    s = load(data, allow_out_of_range=True)
    assert s.params["learning_rate"].high == 5e-6
    assert s.allow_out_of_range


def test_overrides_dotted_and_nested():
    s = load(SPACES / "cpu-tiny.yaml",
                   overrides={"search.num_samples": 3, "params.beta.high": 5.0, "base": {"max_steps": 40}})
    assert s.search.num_samples == 3
    assert s.params["beta"].high == 5.0
    assert s.base["max_steps"] == 40 and s.base["model_name_or_path"] == "bundled:tiny"


# --- helpers -------------------------------------------------------------------------------


def test_trial_config_merges_base_params_and_resources():
    s = load(SPACES / "cpu-small.yaml")
    cfg = s.trial_config({"learning_rate": 2e-3, "beta": 3.0, "gamma_beta_ratio": 0.25, "sft_weight": 0.1})
    assert cfg.learning_rate == 2e-3 and cfg.beta == 3.0 and cfg.sft_weight == 0.1
    assert cfg.model_name_or_path == "bundled:small"
    assert cfg.num_workers == 1 and cfg.use_gpu is False
    assert cfg.loss_type == "sigmoid"
    with pytest.raises(ConfigError, match="'max_steps' is not searched"):
        s.trial_config({"max_steps": 3})
    with pytest.raises(ConfigError, match="beta"):
        s.trial_config({"beta": -1.0})


def test_unsearched_params_take_base_or_the_documented_default():
    data = copy.deepcopy(VALID)
    del data["params"]["sft_weight"], data["params"]["gamma_beta_ratio"]
    data["base"]["gamma_beta_ratio"] = 0.3
    s = load(data)
    cfg = s.trial_config({"learning_rate": 4e-7, "beta": 3.0})
    assert cfg.gamma_beta_ratio == 0.3          # fixed in base
    assert cfg.sft_weight == pytest.approx(0.1)  # 7B instruct default ("0.1 if instruct")
    assert set(s.points_to_evaluate[0]) == {"learning_rate", "beta"}


def test_duplicate_points_are_dropped_with_a_note():
    data = mutate("search.points_to_evaluate", {"extra": [{"learning_rate": 5e-7}]})
    s = load(data)
    assert len(s.points_to_evaluate) == 1
    assert any("dropped" in n for n in s.notes)


def test_describe_shows_searched_documented_and_default():
    text = describe_space(load(SPACES / "7b.yaml"))
    for part in ["learning_rate", "loguniform 1e-07 to 1e-06",   # searched
                 "3e-07 to 5e-07",                               # guide's 7B-8B row
                 "1 to 10", "2 to 5",                            # beta documented / optimal
                 "0.4 to 0.6",                                   # gamma optimal
                 "0 to 0.05",                                    # sft, base model
                 "5e-07", "= 128", "128 to 256", "Mistral-Base"]:
        assert part in text, part
    assert "5e-08 to 3e-07" in describe_space(load(SPACES / "70b.yaml"))


def test_format_table_shows_the_guides_tables():
    text = guide.format_table()
    for part in ["5e-07 to 1e-06", "3e-07 to 5e-07", "1e-07 to 3e-07", "5e-08 to 1e-07",
                 "Creative writing", "1e-06", "0.05 to 0.1", "0.1 to 0.2", "32 to 64", "Gemma2-9B-it"]:
        assert part in text, part


@pytest.mark.parametrize("model, expected", [
    ("mistralai/Mistral-7B-v0.1", ["Mistral-Base"]),
    ("alignment-handbook/zephyr-7b-sft-full", ["Mistral-Base"]),
    ("HuggingFaceH4/zephyr-7b-beta", []),
    ("mistralai/Mistral-7B-Instruct-v0.2", ["Mistral-Instruct"]),
    ("meta-llama/Meta-Llama-3-8B", ["Llama3-Base"]),
    ("princeton-nlp/Llama-3-Base-8B-SFT", ["Llama3-Base"]),
    ("meta-llama/Meta-Llama-3-8B-Instruct", ["Llama3-Instruct", "Llama3-Instruct v0.2"]),
    ("google/gemma-2-9b-it", ["Gemma2-9B-it"]),
    ("meta-llama/Llama-3.1-70B-Instruct", []),
    ("bundled:tiny", []),
])
def test_reference_settings_match_model_families(model, expected):
    assert [r.name for r in guide.reference_settings(model)] == expected


def test_reference_settings_values():
    # princeton-nlp/SimPO README / training_configs (lr, beta, gamma_beta_ratio); sft_weight 0
    got = {r.name: (r.learning_rate, r.beta, r.gamma_beta_ratio, r.sft_weight)
           for r in guide.REFERENCE_SETTINGS}
    assert got == {
        "Mistral-Base": (3e-7, 2.0, 0.8, 0.0), "Mistral-Instruct": (5e-7, 2.5, 0.1, 0.0),
        "Llama3-Base": (6e-7, 2.0, 0.5, 0.0), "Llama3-Instruct": (1e-6, 2.5, 0.55, 0.0),
        "Llama3-Instruct v0.2": (1e-6, 10.0, 0.3, 0.0), "Gemma2-9B-it": (8e-7, 10.0, 0.5, 0.0)}


def test_guide_lookups():
    assert guide.documented_range("learning_rate", "7b-8b") == pytest.approx(LR_7B_USABLE)
    assert guide.documented_range("beta", "70b+") == (1.0, 10.0)  # incl. the 1.0-2.0 "Weak" row
    assert guide.documented_default("8b-13b", model_type="instruct") == pytest.approx(
        {"learning_rate": 3e-7, "beta": 2.5, "gamma_beta_ratio": 0.5, "sft_weight": 0.1})
    assert guide.CPU_LR_RANGE.as_tuple() == (1e-4, 1e-2)
    with pytest.raises(ConfigError, match="did you mean '70b\\+'"):
        guide.bucket("70b")


# --- GPU-hour estimate, by hand ------------------------------------------------------------

TOY_ESTIMATE = {
    "name": "est", "size_bucket": "cpu",
    "base": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4},
    "params": {"learning_rate": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2}},
    "resources": {"num_workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 1},
    "search": {"num_samples": 10, "objective": "eval/success_rate", "mode": "max",
               "scheduler": "fifo", "grace_period": 10, "reduction_factor": 2, "max_t": 80},
    "estimate": {"train_pairs": 1280, "params_billion": 1.0, "tokens_per_pair": 100,
                 "mfu": 0.5, "peak_tflops": 1000},
}


def test_estimate_gpu_hours_by_hand():
    e = estimate_gpu_hours(load(TOY_ESTIMATE))
    # batch 2 x 2 workers x 4 = 16; 1280 / 16 = 80 steps; 80 x 16 x 100 = 128,000 tokens
    assert e["effective_batch"] == 16 and e["steps_per_trial"] == 80
    assert e["tokens_per_trial"] == 128_000
    # 6 x 1e9 x 128,000 = 7.68e14 FLOPs; / (1000e12 x 0.5) = 1.536 s = 4.2667e-4 GPU-hours
    assert e["flops_per_trial"] == pytest.approx(7.68e14)
    assert e["gpu_hours_per_trial"] == pytest.approx(1.536 / 3600)
    assert e["wall_hours_per_trial"] == pytest.approx(1.536 / 3600 / 2)  # 2 GPUs per trial
    assert e["gpu_hours_upper_bound"] == pytest.approx(10 * 1.536 / 3600)
    assert e["gpu_hours_asha_estimate"] is None  # fifo: no early stopping


def test_estimate_asha_discount_by_hand():
    data = copy.deepcopy(TOY_ESTIMATE)
    data["search"]["scheduler"] = "asha"
    e = estimate_gpu_hours(load(data))
    # rungs at 10, 20, 40 (eta 2): all run 10 steps, 1/2 the next 10, 1/4 the next 20, 1/8 the
    # last 40 -> 10 + 5 + 5 + 5 = 25 steps per trial on average
    assert e["asha_expected_steps_per_trial"] == pytest.approx(25)
    assert e["gpu_hours_asha_estimate"] == pytest.approx(10 * 25 * 1.536 / 80 / 3600)
    data["search"]["max_t"] = 40  # the scheduler stops every trial at 40 steps
    assert estimate_gpu_hours(load(data))["steps_per_trial"] == 40


def test_estimate_missing_is_an_error():
    data = copy.deepcopy(TOY_ESTIMATE)
    del data["estimate"]
    with pytest.raises(ConfigError, match="estimate"):
        estimate_gpu_hours(load(data))


def test_estimate_7b_h100_default_assumptions():
    e = estimate_gpu_hours(load(SPACES / "7b.yaml"))
    # 478 steps x 128 x 800 tokens x 6 x 7.24e9 / (989e12 x 0.35) / 3600
    expected = 478 * 128 * 800 * 6 * 7.24e9 / (989e12 * 0.35) / 3600
    assert e["gpu_hours_per_trial"] == pytest.approx(expected)
    assert math.isclose(e["gpu_hours_upper_bound"], 32 * expected)


def test_import_is_light():
    code = ("import sys, simpo_ray.search.space, simpo_ray.guide; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'optuna')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_dry_run_states_the_objectives_noise_at_the_first_rung():
    """A rate over n generated prompts: SE up to 0.5/sqrt(n) (cpu-tiny: 128 prompts, 0.0442), and
    ceil((0.5/0.03)^2) = 278 prompts to bring it under 0.03. The LC win rate's is 1.2x that (0.075
    measured at 64 prompts): the real spaces' 400 prompts give 1.2 x 0.025 = 0.030, nothing more
    to add; at 64 it would be 0.075 and ceil((0.6/0.03)^2) = 400 prompts. What one evaluation
    generates: 400 / 4 workers = 100 per worker, in batches of 50 on the 1b-3b space."""
    from simpo_ray.search.plan import _objective_noise

    [tiny] = _objective_noise(load(SPACES / "cpu-tiny.yaml", overrides={"base.generation_eval_samples": 128}))
    assert tiny == ("objective noise: eval/success_rate over 128 generated prompts has a standard error of about "
                    "0.044 (0.5/sqrt(n)) at the first asha rung (step 200); 278 prompts would bring it under "
                    "0.03 (2.2x the generation per evaluation); each evaluation generates 128 answers per worker "
                    "in 1 batch(es)")
    [all_prompts] = _objective_noise(load(SPACES / "cpu-tiny.yaml"))  # the space's own: all 512
    assert "over 512 generated prompts has a standard error of about 0.022" in all_prompts
    assert "would bring it under" not in all_prompts
    for name in ("1b-3b", "7b", "8b-13b", "13b-30b"):
        [big] = _objective_noise(load(SPACES / f"{name}.yaml"))
        assert "over 400 generated prompts has a standard error of about 0.030" in big, big
        assert "would bring it under" not in big
    [small] = _objective_noise(load(SPACES / "1b-3b.yaml"))
    assert small.endswith("each evaluation generates 100 answers per worker in 2 batch(es) of up to 512 new tokens")
    [old] = _objective_noise(load(SPACES / "7b.yaml", overrides={"base.generation_eval_samples": 64}))
    assert "standard error of about 0.075" in old and "400 prompts would bring it under 0.03 (6.2x" in old


def test_the_dry_run_refuses_an_optimizer_that_is_not_installed_as_the_run_does(monkeypatch):
    import importlib.util

    from simpo_ray.search.plan import dry_run

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    _, refusals = dry_run(load(SPACES / "cpu-tiny.yaml", overrides={"base.optim": "paged_adamw_8bit"}))
    assert any(r.startswith("optim: 'paged_adamw_8bit' is bitsandbytes' AdamW, and bitsandbytes is not installed")
               for r in refusals), refusals
