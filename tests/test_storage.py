"""`io.Storage` (one place that tells a local directory from a URI), the run history's one
writer and reader (`infra.history`), and the pure space loader (`search.space.load_space` reads
nothing but the YAML; `search.plan.resolve` applies start points and the warm start)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from simpo_ray.errors import UserError
from simpo_ray.infra.history import history_callback, read_history
from simpo_ray.io import Storage

TINY = Path(__file__).resolve().parent.parent / "search_spaces" / "cpu-tiny.yaml"


@pytest.mark.parametrize("uri", [False, True], ids=["local", "file-uri"])
def test_storage_reads_writes_appends_and_lists_the_same_through_a_path_or_a_uri(tmp_path, uri):
    """The URI branch runs for real through pyarrow's local filesystem (`file://`), the same code
    an `s3://` storage takes."""
    root = f"file://{tmp_path}" if uri else str(tmp_path)
    st = Storage(root)
    assert st.is_remote is uri
    assert st.read_text("missing.json") is None and not st.exists("missing.json")
    st.write_text("search.json", '{"a": 1}\n')
    st.write_text("search.json", '{"a": 2}\n')  # replaced whole
    st.append_text("runs/x/history.jsonl", "1\n")
    st.append_text("runs/x/history.jsonl", "2\n")
    assert json.loads((tmp_path / "search.json").read_text()) == {"a": 2}  # on disk, independently
    assert (tmp_path / "runs" / "x" / "history.jsonl").read_text() == "1\n2\n"
    assert st.read_text("search.json") == '{"a": 2}\n' and st.exists("search.json")
    (tmp_path / "experiment_state-2.json").write_text("{}")
    (tmp_path / "experiment_state-1.json").write_text("{}")
    assert st.names("experiment_state-") == ["experiment_state-1.json", "experiment_state-2.json"]
    assert st.path("a", "b.csv") == f"{root.rstrip('/')}/a/b.csv"
    assert not list(tmp_path.glob(".search.json.*"))  # no temporary file left by the atomic write


def test_a_local_root_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Storage("results").root == str(tmp_path / "results")
    assert Storage("s3://bucket/simpo/").root == "s3://bucket/simpo"


def test_history_keeps_every_report_around_a_line_cut_by_a_crash(tmp_path, caplog):
    """A crash mid-append leaves half a line; the next append must not glue its report to it,
    and the reader skips the half line, saying so, and keeps every whole report."""
    path = tmp_path / "run" / "history.jsonl"
    writer = history_callback(path)
    writer.after_report(None, [{"step": 1, "loss": 0.5}], None)
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # SIGKILL mid-append
    writer.after_report(None, [{"step": 2, "loss": 0.4}], None)  # the restarted run's report
    with caplog.at_level(logging.WARNING, logger="simpo_ray.infra.history"):
        rows = read_history(path)
    assert rows == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    assert any("1 line(s) cut short" in r.getMessage() for r in caplog.records)
    assert read_history(tmp_path / "nothing" / "history.jsonl") == []


def test_loading_a_space_reads_nothing_but_the_yaml(tmp_path):
    """`load_space` with a warm start naming a directory that does not exist succeeds (it reads
    nothing else) and leaves the start points to the planning step, which then fails in one line."""
    from simpo_ray.search.plan import load, resolve
    from simpo_ray.search.space import load_space

    missing = str(tmp_path / "no-such-search")
    space = load_space(TINY, warm_start=[missing])
    assert space.points_to_evaluate == [] and space.warm is None and not space.resolved
    assert missing in space.search.warm_start
    with pytest.raises(UserError, match="warm start"):
        resolve(space)
    resolved = load(TINY)
    assert resolved.resolved and resolved.point_labels[0].startswith("guide default")
    assert resolve(resolved) is resolved and len(resolved.points_to_evaluate) == len(load(TINY).points_to_evaluate)


@pytest.mark.parametrize("bad", ["../../x", "/abs/path", ".", "..", "a/b", "a\nb", "", "-flag", "x" * 129, "a b"])
def test_names_that_would_leave_the_storage_path_are_refused_in_one_line(bad, tmp_path, capsys):
    from simpo_ray.cli import tune_main
    from simpo_ray.io import check_name

    with pytest.raises(UserError, match="one path component"):
        check_name(bad)
    rc = tune_main(["--space", str(TINY), "--storage-path", str(tmp_path / "results"), f"--name={bad}", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --name: ") and err.count("\n") == 1
    assert not (tmp_path / "results").exists() and not (tmp_path / "x").exists()


def test_a_space_naming_itself_outside_the_storage_path_is_refused(tmp_path):
    import yaml

    from simpo_ray.errors import ConfigError
    from simpo_ray.search.space import load_space

    data = yaml.safe_load(TINY.read_text())
    data["name"] = "../../elsewhere"
    with pytest.raises(ConfigError, match=r"name: '\.\./\.\./elsewhere' is not allowed"):
        load_space(data)
    for good in ("cpu-tiny", "run_1.2", "A" * 128):
        data["name"] = good
        assert load_space(data).name == good
