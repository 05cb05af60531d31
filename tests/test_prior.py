"""simpo_ray.transfer.prior: the first trials of a warm-started search drawn around the size
trends' point (`search.warm_start_points: prior`).

The priors' centres and widths are recomputed here from the trials with numpy (a least-squares
line through each size's top-trial mean, the textbook prediction standard error), and the draws
are checked against scipy's truncated normal and log-uniform by Kolmogorov-Smirnov tests. Pure
and fast: no Ray, no torch.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_analysis import TINY_SPACE
from test_transfer import _planted, ladder_dirs, record  # noqa: F401 (record: a fixture)

from simpo_ray import guide
from simpo_ray.search.settings import Param
from simpo_ray.transfer import prior, trends as transfer
from simpo_ray.transfer.model_size import bundled_param_count

TOP = transfer.TOP_K


def by_hand(tops: list[tuple[float, np.ndarray]], x0: float) -> tuple[float, float, float, float]:
    """From (parameter count, top trials' log10 lr) per size: the line's value at x0, its
    prediction standard error (nan below three sizes), the sizes' rms spread, and the step from
    the nearest size's mean."""
    x = np.array([math.log10(n) for n, _ in tops])
    y = np.array([t.mean() for _, t in tops])
    slope, intercept = np.polyfit(x, y, 1)
    centre = intercept + slope * x0
    if len(x) > 2:
        s = math.sqrt(((y - intercept - slope * x) ** 2).sum() / (len(x) - 2))
        se = s * math.sqrt(1 + 1 / len(x) + (x0 - x.mean()) ** 2 / ((x - x.mean()) ** 2).sum())
    else:
        se = math.nan
    rms = math.sqrt(np.mean([np.var(t, ddof=1) for _, t in tops]))
    nearest = int(np.argmin(abs(x - x0)))
    return centre, se, rms, abs(centre - y[nearest])


def test_three_sizes_draw_from_a_normal_of_the_prediction_error_and_the_top_trials_spread(record):  # noqa: F811
    """Three planted sizes: the learning rate's prior is normal(prediction, sqrt(spread^2 + se^2))
    in log10, truncated to the searched range; 4000 draws pass a KS test against scipy's
    truncated normal built from the hand-computed numbers, with a wide range and with a range
    that cuts the prior on both sides."""
    searches = _planted(record, np.random.default_rng(3), (1e8, 1e9, 1e10), 0.3)
    trends = transfer.fit_trends(searches)
    target = 1e11
    tops = [(s.n_params, np.log10(s.trials.sort_values("best_objective", ascending=False)["learning_rate"]
                                  .head(TOP).to_numpy())) for s in searches]
    centre, se, rms, _ = by_hand(tops, math.log10(target))
    sd = math.hypot(rms, se)
    for lo, hi in ((1e-9, 1e-2), (10 ** (centre - 0.5 * sd), 10 ** (centre + sd))):
        params = {"learning_rate": Param("learning_rate", "loguniform", lo, hi)}
        found = prior.priors(trends, target, "7b-8b", params, allow_out_of_range=True)
        lr = found["learning_rate"]
        assert (lr.centre, lr.error, lr.width, lr.sd) == pytest.approx((centre, se, rms, sd), rel=1e-9)
        assert lr.error_from == "the prediction's standard error"
        y = np.log10([p["learning_rate"] for p in prior.draw(found, params, 4000, seed=0)])
        assert y.min() >= math.log10(lo) - 1e-12 and y.max() <= math.log10(hi) + 1e-12
        a, b = (math.log10(lo) - centre) / sd, (math.log10(hi) - centre) / sd
        assert stats.kstest(y, stats.truncnorm(a, b, loc=centre, scale=sd).cdf).pvalue > 1e-3
        # not merely inside the range: a uniform draw over it fails the same test
        uniform = np.random.default_rng(0).uniform(math.log10(lo), math.log10(hi), 4000)
        assert stats.kstest(uniform, stats.truncnorm(a, b, loc=centre, scale=sd).cdf).pvalue < 1e-6


def test_two_sizes_take_the_step_from_the_nearest_size_as_the_error_and_enqueue_after_the_default(tmp_path):
    """Finished tiny and small searches on disk, cpu-base as the target (`plan.load`, the path a
    search takes): 3 draws after the documented default, inside the searched ranges, labelled;
    the same seed gives the same points and another seed others. The learning rate's prior is
    worked out from trials.csv with pandas and numpy: no interval from two sizes, so its error is
    the step from small's (the nearest size's) optimum."""
    from simpo_ray.search.plan import load

    dirs = ladder_dirs(tmp_path, sizes=("tiny", "small"))
    base = TINY_SPACE.with_name("cpu-base.yaml")

    def space(seed: int):
        return load(base, warm_start=[str(d) for d in dirs],
                    overrides={"search.warm_start_points": "prior", "search.seed": seed})

    one, again, other = space(0), space(0), space(1)
    assert one.points_to_evaluate[0] == pytest.approx(one.documented_default())
    assert one.point_labels[1:] == [f"prior draw {i} of 3 (around the size trends' point)" for i in (1, 2, 3)]
    assert one.points_to_evaluate == again.points_to_evaluate
    assert one.points_to_evaluate[1:] != other.points_to_evaluate[1:]
    for point in one.points_to_evaluate[1:] + other.points_to_evaluate[1:]:
        assert all(one.params[p].contains(v) for p, v in point.items()), point
    tops = []
    for d in dirs:
        t = pd.read_csv(d / "trials.csv")
        t = t[t["status"].isin(["completed", "stopped_early"])].sort_values("best_objective", ascending=False)
        size = "tiny" if "tiny" in d.name else "small"
        tops.append((bundled_param_count(size), np.log10(t["learning_rate"].head(TOP).to_numpy())))
    tops.sort(key=lambda t: t[0])
    centre, _, rms, step = by_hand(tops, math.log10(bundled_param_count("base")))
    lo, hi = guide.documented_range("learning_rate", "cpu")
    assert math.log10(lo) < centre < math.log10(hi)  # no clipping to account for
    lines = [line for line in one.warm.lines if line.lstrip().startswith("learning_rate: log10 learning_rate")]
    assert len(lines) == 1 and "the step from cpu/small's optimum (no interval from 2 sizes)" in lines[0]
    assert f"normal({centre:.3g}, sd {math.hypot(rms, step):.2g})" in lines[0], (lines[0], centre, rms, step)
    from simpo_ray.transfer import finished

    trends = transfer.fit_trends(finished.load_finished([str(d) for d in dirs]))
    got = prior.priors(trends, bundled_param_count("base"), "cpu", one.params)["learning_rate"]
    assert (got.centre, got.width, got.error, got.sd) == pytest.approx((centre, rms, step, math.hypot(rms, step)))


def test_a_parameter_without_a_trend_is_drawn_from_its_searched_range():
    """No trend (varied at fewer than two sizes): log-uniform over a log-uniform range, uniform
    over a uniform one, a choice's values, as the searcher's random start draws them (KS against
    scipy's distributions; every choice drawn)."""
    params = {"learning_rate": Param("learning_rate", "loguniform", 1e-6, 1e-4),
              "beta": Param("beta", "uniform", 2.0, 10.0),
              "sft_weight": Param("sft_weight", "choice", 0.0, 1.0, (0.0, 0.1, 1.0))}
    found = {p: prior.Prior(p, None) for p in params}
    points = prior.draw(found, params, 3000, seed=7)
    lr = [p["learning_rate"] for p in points]
    assert stats.kstest(lr, stats.loguniform(1e-6, 1e-4).cdf).pvalue > 1e-3
    assert stats.kstest([p["beta"] for p in points], stats.uniform(2.0, 8.0).cdf).pvalue > 1e-3
    assert set(p["sft_weight"] for p in points) == {0.0, 0.1, 1.0}
    assert "no size trend; drawn from the searched loguniform 1e-06 to 0.0001" in found["learning_rate"].describe(
        params["learning_rate"])


def test_prior_samples_are_validated_and_recorded_only_where_read(tmp_path):
    import yaml

    from simpo_ray.errors import UserError
    from simpo_ray.search.plan import load
    from simpo_ray.search.records import resolved_space, space_differences

    raw = yaml.safe_load(TINY_SPACE.read_text())
    for search, needle in (({"warm_start_points": "prior"}, "search.warm_start_points: 'prior' needs finished"),
                           ({"warm_start_prior_samples": 0}, "search.warm_start_prior_samples: 0")):
        with pytest.raises(UserError, match=needle):
            load(raw | {"search": {**raw["search"], **search}})
    ladder_dirs(tmp_path, sizes=("tiny", "small"))
    base = TINY_SPACE.with_name("cpu-base.yaml")

    def resolved(**search):
        return resolved_space(load(base, warm_start=[str(tmp_path)],
                                   overrides={f"search.{k}": v for k, v in search.items()}))

    # read only under warm_start_points prior, so it differs only there
    assert space_differences(resolved(warm_start_prior_samples=2), resolved(warm_start_prior_samples=4)) == []
    diffs = space_differences(resolved(warm_start_points="prior"),
                              resolved(warm_start_points="prior", warm_start_prior_samples=4))
    assert "search.warm_start_prior_samples: '<unset>' -> 4" in diffs


def test_edges_a_far_centre_a_choice_with_a_trend_and_an_infinite_extrapolation():
    """A centre 4 sd above the searched range: every draw inside it, piled against the top (more
    than 99% in its top sd; KS against scipy's truncated normal). A learning rate searched as a choice snaps
    to the value nearest in log10 (3e-4 lies nearer 1e-4 than 1e-3 in log10, nearer 1e-3 in value).
    An infinite centre (an extrapolation with --allow-out-of-range) lands on the range's bound."""
    lr = Param("learning_rate", "loguniform", 1e-5, 1e-4)
    far = {"learning_rate": prior.Prior("learning_rate", True, centre=-4 + 4 * 0.25, sd=0.25)}
    y = np.log10([p["learning_rate"] for p in prior.draw(far, {"learning_rate": lr}, 2000, seed=1)])
    assert y.min() >= -5 - 1e-12 and y.max() <= -4 + 1e-12
    piled = stats.truncnorm(-8, -4, loc=-3, scale=0.25)  # (lo - c) / sd = -8, (hi - c) / sd = -4
    assert piled.cdf(-4.25) < 0.01 and stats.kstest(y, piled.cdf).pvalue > 1e-3
    choice = {"learning_rate": Param("learning_rate", "choice", 1e-4, 1e-3, (1e-4, 1e-3))}
    exact = {"learning_rate": prior.Prior("learning_rate", True, centre=math.log10(3e-4), sd=0.0)}
    assert prior.draw(exact, choice, 1, seed=0) == [{"learning_rate": 1e-4}]
    infinite = {"learning_rate": prior.Prior("learning_rate", True, centre=math.inf, sd=math.nan)}
    assert prior.draw(infinite, {"learning_rate": lr}, 2, seed=0) == [{"learning_rate": 1e-4}] * 2
