"""FSDP2 on real Ray Train workers (CPU, gloo): the same training as DDP, half the state per
worker, sharded checkpoints that resume exactly on another worker count, worker restarts, and
a search whose trials shard."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from simpo_ray.config import TrainConfig

pytestmark = pytest.mark.slow

# One global batch of 8 pairs per step: 1 worker x 8 (DDP) or 2 workers x 4 (FSDP). sft_weight 0:
# the SFT term is a token-mean per worker, so with it 2 workers would average two means, not one.
COMMON = dict(model_name_or_path="bundled:tiny", max_length=64, max_prompt_length=32,
              max_eval_samples=64, per_device_eval_batch_size=16, generation_eval_samples=0,
              learning_rate=1e-3, beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.0, warmup_ratio=0.1,
              max_steps=12, eval_steps=6, save_total_limit=5, seed=7)
# Parameters agree to this after 12 steps (measured: 1.2e-7, i.e. fp32 rounding): the gradients
# are summed in another order (reduce-scatter of two half-batch gradients vs one batch), which
# changes the last bits, and AdamW's division by sqrt(v) can amplify such bits for weights whose
# gradient is ~0; 1e-5 leaves room for that and is still 100x below one lr-sized step (1e-3).
PARAM_ATOL = 1e-5
LOSS_RTOL = 1e-5


def _history(run_dir: Path) -> list[dict]:
    from simpo_ray.infra.launch import read_history

    return read_history(run_dir / "history.jsonl") if (run_dir / "history.jsonl").exists() else []


def _params(checkpoint: str | Path, tmp: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from simpo_ray.train.checkpoints import export_pretrained

    out = export_pretrained(checkpoint, tmp / Path(checkpoint).name)
    return {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(out).state_dict().items()}


def _checkpoint_at(run_dir: Path, step: int) -> Path:
    for d in sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir()):
        if json.loads((d / "trainer_state.json").read_text())["counters"]["step"] == step:
            return d
    raise AssertionError(f"no checkpoint of step {step} in {run_dir}")


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    """A: 1-worker DDP; B: 2-worker FSDP (checkpoint at step 6); C: 1-worker FSDP resumed from
    B's step-6 checkpoint. The same global batches in all three. D: B's step 6 resumed on 1
    worker x 4 per device (the global batch of 8 kept by accumulation 2); F: A's step 6 resumed
    on 2 FSDP workers x 2 per device (accumulation 2)."""
    from simpo_ray.infra.launch import run_training

    root = tmp_path_factory.mktemp("fsdp")
    out = {}
    out["A"] = run_training(TrainConfig(**COMMON, per_device_train_batch_size=8, parallel="ddp"),
                            num_workers=1, storage_path=str(root), name="A")
    out["B"] = run_training(TrainConfig(**COMMON, per_device_train_batch_size=4, parallel="fsdp"),
                            num_workers=2, storage_path=str(root), name="B")
    resume = _checkpoint_at(root / "B", 6)
    out["C"] = run_training(TrainConfig(**COMMON, per_device_train_batch_size=8, parallel="fsdp"),
                            num_workers=1, storage_path=str(root), name="C", resume_from=str(resume))
    out["D"] = run_training(TrainConfig(**COMMON, per_device_train_batch_size=4, parallel="fsdp"),
                            num_workers=1, storage_path=str(root), name="D", resume_from=str(resume))
    out["F"] = run_training(TrainConfig(**COMMON, per_device_train_batch_size=2, parallel="fsdp"),
                            num_workers=2, storage_path=str(root), name="F",
                            resume_from=str(_checkpoint_at(root / "A", 6)))
    for r in out.values():
        assert r.error is None, r.error
    return root, out


def test_two_worker_fsdp_trains_like_one_worker_ddp(runs, tmp_path):
    root, r = runs
    a, b = _history(root / "A"), _history(root / "B")
    assert [x["step"] for x in a] == [x["step"] for x in b] == [0, 6, 12]
    for x, y in zip(a, b):
        assert y["eval/loss"] == pytest.approx(x["eval/loss"], rel=LOSS_RTOL)
    for x, y in zip(a[1:], b[1:]):
        assert y["loss"] == pytest.approx(x["loss"], rel=LOSS_RTOL)
    pa, pb = _params(r["A"].checkpoint.path, tmp_path), _params(r["B"].checkpoint.path, tmp_path)
    start = _params(_checkpoint_at(root / "A", 6), tmp_path)
    assert pa.keys() == pb.keys()
    moved = max((pa[k] - start[k]).abs().max().item() for k in pa)
    diff = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    assert diff < PARAM_ATOL and diff < 1e-3 * moved, (diff, moved)


def test_fsdp_halves_the_state_each_worker_holds(runs):
    root, _ = runs
    a, b = _history(root / "A")[-1], _history(root / "B")[-1]
    for key in ("memory/param_bytes", "memory/optimizer_bytes"):
        assert 0.45 < b[key] / a[key] < 0.55, (key, a[key], b[key])  # rank 0's shard: half, + padding


def test_sharded_checkpoint_resumes_exactly_on_one_worker(runs, tmp_path):
    root, r = runs
    files = os.listdir(_checkpoint_at(root / "B", 6))
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(files)  # both workers' shards, one checkpoint
    c = _history(root / "C")
    assert [x["step"] for x in c] == [12]  # no step-0 baseline: it continued from step 6
    assert c[0]["samples"] == 12 * 8
    pb, pc = _params(r["B"].checkpoint.path, tmp_path), _params(r["C"].checkpoint.path, tmp_path)
    assert max((pb[k] - pc[k]).abs().max().item() for k in pb) < PARAM_ATOL


def test_resuming_on_another_worker_count_keeps_the_global_batch(runs, tmp_path):
    """2 workers x 4 resumed on 1 worker x 4, and 1 worker x 8 resumed on 2 workers x 2: gradient
    accumulation (1 -> 2) keeps 8 pairs per step, the data continues where it stopped, and the
    parameters end where the uninterrupted runs' did."""
    root, r = runs
    for resumed, uninterrupted in (("D", "B"), ("F", "A")):
        h = _history(root / resumed)
        assert [x["step"] for x in h] == [12] and h[0]["samples"] == 12 * 8, h
        p, q = _params(r[resumed].checkpoint.path, tmp_path), _params(r[uninterrupted].checkpoint.path, tmp_path)
        assert max((p[k] - q[k]).abs().max().item() for k in p) < PARAM_ATOL, resumed
        assert h[0]["eval/loss"] == pytest.approx(_history(root / uninterrupted)[-1]["eval/loss"], rel=LOSS_RTOL)


def test_a_killed_fsdp_worker_resumes_from_the_sharded_checkpoint(ray_cluster, tmp_path):
    from ray_helpers import live_train_worker_pids

    from simpo_ray.infra.launch import final_metrics, run_training

    cfg = TrainConfig(**{**COMMON, "max_steps": 40, "eval_steps": 4, "save_total_limit": 2},
                      per_device_train_batch_size=4, parallel="fsdp")
    killed: dict = {}
    done = threading.Event()

    def kill_one_worker_after_a_checkpoint():
        while not done.wait(0.05):
            if any(r["step"] >= 4 for r in _history(tmp_path / "killed")):
                workers = live_train_worker_pids()  # this run's two, by Ray's own actor table
                if len(workers) == 2:
                    killed["after"] = _history(tmp_path / "killed")[-1]["step"]
                    os.kill(workers[-1], signal.SIGKILL)
                    return
                killed.setdefault("seen", workers)

    watcher = threading.Thread(target=kill_one_worker_after_a_checkpoint, daemon=True)
    watcher.start()
    try:
        result = run_training(cfg, num_workers=2, storage_path=str(tmp_path), name="killed", max_failures=1)
    finally:
        done.set()  # never let the watcher outlive the test (it would kill the next test's workers)
        watcher.join(timeout=5)
    assert "after" in killed and killed["after"] < 40, killed
    assert result.error is None, result.error
    final = final_metrics(result)
    assert final["status"] == "completed" and final["step"] == 40 and final["restarts"] == 1
    resumed = [r for r in _history(tmp_path / "killed") if r.get("restarts") == 1]
    assert resumed and resumed[0]["step"] > 4  # from a sharded checkpoint, not from step 0


def test_search_with_fsdp_trials_completes_with_asha(ray_cluster, tmp_path):
    import pandas as pd

    from simpo_ray.search.run import run_search

    exp = run_search("search_spaces/cpu-small.yaml", storage_path=str(tmp_path), name="fsdp", verbose=0,
                     num_samples=2, scheduler="asha", overrides={
                         "base.parallel": "fsdp", "resources.num_workers": 2, "base.max_steps": 20,
                         "base.eval_steps": 5, "base.generation_eval_samples": 16,
                         "base.max_eval_samples": 64, "search.grace_period": 5, "search.max_t": 20})
    trials = pd.read_csv(exp / "trials.csv")
    assert len(trials) == 2 and set(trials["status"]) <= {"completed", "stopped_early"}
    assert (trials["status"] == "completed").any()
    ckpt = Path(trials.dropna(subset=["best_checkpoint"])["best_checkpoint"].iloc[0])
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(ckpt))
    # The search exports its best trial's best checkpoint as a plain Hugging Face model.
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(exp / "best_model").num_parameters() > 0


def _grad_bytes_worker(rank: int, world: int, port: int, out_dir: str, no_sync: bool) -> None:
    """One accumulation micro-batch (not the last) of a sharded policy; the gradient elements this
    rank then holds. `no_sync`: FSDP2's no-sync accumulation, as the loop did before."""
    import types

    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from simpo_ray.train import parallel
    from simpo_ray.train.logps import PolicyLogps, simpo_objective
    from simpo_ray.train.step import gradient_sync

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4))
        policy = PolicyLogps(model)
        parallel.shard(policy, types.SimpleNamespace(bf16=False, fsdp_cpu_offload=False), torch.device("cpu"), world)
        with torch.no_grad():
            for p in policy.parameters():
                p.to_local().normal_(0.0, 0.02)
        ids = torch.randint(0, 64, (2, 12))
        labels = ids.clone()
        labels[:, :4] = -100
        batch = {f"{side}_{k}": v for side in ("chosen", "rejected")
                 for k, v in (("input_ids", ids), ("attention_mask", torch.ones_like(ids)), ("labels", labels))}
        if no_sync:
            policy.set_requires_gradient_sync(False)
        with gradient_sync(policy, "fsdp", sync=False):  # the first of two micro-batches
            loss, _ = simpo_objective(policy(**batch), beta=2.0, gamma_beta_ratio=0.5, loss_type="sigmoid",
                                      label_smoothing=0.0, sft_weight=0.5)
            (loss / 2).backward()
        grads = [p.grad for p in policy.parameters() if p.grad is not None]
        sharded = sum(g.to_local().numel() for g in grads)
        # Under no-sync, FSDP2 keeps the full gradients on its private parameter objects: on the
        # unsharded parameter (fp32) or upcast in `unsharded_accumulated_grad` (bf16 compute).
        fsdp_params = [fp for m in policy.modules() if hasattr(m, "_get_fsdp_state")
                       for group in [m._get_fsdp_state()._fsdp_param_group] if group is not None
                       for fp in group.fsdp_params]
        unsharded = sum(g.numel() for fp in fsdp_params
                        for g in (fp.unsharded_accumulated_grad, getattr(fp, "_unsharded_param", None) is not None
                                  and fp._unsharded_param.grad) if isinstance(g, torch.Tensor))
        total = sum(p.numel() for p in policy.parameters())
        with open(os.path.join(out_dir, f"{int(no_sync)}-{rank}.json"), "w") as f:
            json.dump({"held": sharded + unsharded, "total": total, "sharded": sharded}, f)
    finally:
        dist.destroy_process_group()


def test_fsdp_accumulation_keeps_gradients_sharded(tmp_path):
    """Two workers, accumulation 2: after the first micro-batch each rank holds only its shard of
    the gradients (about half of all elements), because the loop reduce-scatters every
    micro-batch. FSDP2's no-sync accumulation, measured beside it, holds all of them: unsharded
    fp32 gradients of the whole model on every rank, the +4N bytes issue 21 measured."""
    import socket

    import torch.multiprocessing as mp

    for no_sync in (False, True):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_grad_bytes_worker, args=(2, port, str(tmp_path), no_sync), nprocs=2, start_method="spawn")
    sharded = [json.loads((tmp_path / f"0-{r}.json").read_text()) for r in range(2)]
    unsharded = [json.loads((tmp_path / f"1-{r}.json").read_text()) for r in range(2)]
    total = sharded[0]["total"]
    assert all(r["held"] == r["sharded"] > 0 for r in sharded)  # only shards, in .grad
    assert sum(r["held"] for r in sharded) == total  # two halves make the whole, nothing twice
    assert all(r["held"] <= 0.55 * total for r in sharded)
    assert all(r["held"] == total for r in unsharded)
