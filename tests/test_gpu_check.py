"""bench/gpu_check.py --dry-run: the GPU check's own code path (FSDP2 and DDP SimPO steps, the
memory plan beside them) on a tiny Llama on the CPU, run as the GPU box will run it: a fresh
process in which ray, datasets and optuna cannot be imported (that machine has none of them)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    # sitecustomize runs at start-up: these imports then fail as on a box without the packages.
    (blocker / "sitecustomize.py").write_text(
        "import sys\nfor _name in ('ray', 'datasets', 'optuna'):\n    sys.modules[_name] = None\n")
    env = dict(os.environ)
    paths = [str(blocker), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["HF_HUB_OFFLINE"] = "1"
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads(out.read_text())
    rows = {r["strategy"]: r for r in result["rows"]}
    assert set(rows) == {"fsdp", "ddp"}, result["rows"]
    for strategy, r in rows.items():
        assert r["status"] == "ok", (strategy, r.get("error"))
        assert len(r["step_times_s"]) == 2 and math.isfinite(r["step_s"]) and r["step_s"] > 0
        assert all(math.isfinite(x) for x in r["losses"]) and r["healthy"]
        assert r["losses"][-1] < r["losses"][0], (strategy, r["losses"])  # same batches, lr 1e-3
        assert math.isfinite(r["plan_total_gb"]) and r["plan_total_gb"] > 0
        assert r["plan_parts_gb"]["overhead"] == 0  # no CUDA overhead planned on a CPU
        assert r["tokens_per_step"] == 2 * 2 * 32 * 2
    # Both arms start from the same seeded weights: their first losses agree up to bf16 rounding
    # (bf16 parameters under FSDP, bf16 autocast over fp32 under DDP).
    assert rows["fsdp"]["losses"][0] == pytest.approx(rows["ddp"]["losses"][0], rel=1e-2)
    # The table on stdout (each row as it comes, then all of them again in one block): one row per
    # strategy, memory columns marked as unavailable on a CPU.
    table = [line for line in proc.stdout.splitlines() if line.startswith("| tiny-llama |")]
    assert len(table) == 4 and len(set(table)) == 2, proc.stdout
    assert all("n/a (cpu)" in line for line in table), proc.stdout
    assert result["header"]["project_modules"].keys() == {"memory", "loss", "logps", "parallel", "model", "step"}
