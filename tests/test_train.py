"""The training loop on real Ray Train workers, on the bundled task."""

import math

import pytest
import torch


from simpo_ray.config import TrainConfig
from simpo_ray.infra.launch import final_metrics, run_training

BASE = dict(model_name_or_path="bundled:tiny", dataset_mixer={"bundled:sort": 1.0}, max_length=64,
            max_prompt_length=32, max_eval_samples=256, per_device_train_batch_size=16,
            per_device_eval_batch_size=64, generation_eval_samples=128, beta=2.0,
            gamma_beta_ratio=0.5, sft_weight=0.5, learning_rate=1e-3, warmup_ratio=0.1)


def _curve(result, metric):
    """{step: value} from the run's history.jsonl (every report, not only checkpointed ones)."""
    from pathlib import Path

    from simpo_ray.infra.launch import read_history

    rows = read_history(Path(result.path) / "history.jsonl")
    return {int(r["step"]): r[metric] for r in rows if metric in r}


@pytest.mark.slow
def test_two_worker_ddp_training_improves_held_out_metrics(ray_cluster, tmp_path):
    cfg = TrainConfig(**BASE, max_steps=300, eval_steps=150, output_dir=str(tmp_path / "final"),
                      reward_model_name_or_path="bundled:reward")
    result = run_training(cfg, num_workers=2, storage_path=str(tmp_path), name="ddp")
    assert result.error is None
    final = final_metrics(result)
    assert final == result.metrics  # the last report carried the final checkpoint
    assert final["status"] == "completed" and final["step"] == 300
    # DDP over 2 workers: each optimizer step consumes a batch on each worker.
    assert final["samples"] == 300 * 16 * 2
    pref = _curve(result, "eval/preference_accuracy")
    success = _curve(result, "eval/success_rate")
    assert set(pref) == {0, 150, 300}
    assert pref[300] > pref[0] + 0.03, pref
    assert success[300] > success[0] + 0.05, success
    # Generation quality at step 0 and every eval; at step 0 the 2 workers' gathered answers
    # give what one process computes for the same 128 prompts.
    lc, win = _curve(result, "eval/reward_win_rate_lc"), _curve(result, "eval/reward_win_rate")
    assert set(lc) == set(win) == set(_curve(result, "eval/gen_length")) == {0, 150, 300}
    assert len(set(_curve(result, "eval/baseline_reward_mean").values())) == 1  # one fixed baseline
    assert win[0] == pytest.approx(_step0_win_rate(cfg), abs=2 / 128)
    # Checkpoints hold the model and optimizer shards (torch.distributed.checkpoint) and the
    # scheduler, counters and config as JSON/YAML; any of them exports to a plain HF model.
    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as d:
        import os

        from transformers import AutoModelForCausalLM

        from simpo_ray.train.checkpoints import export_pretrained

        files = set(os.listdir(d))
        assert {".metadata", "trainer_state.json", "train_config.yaml"} <= files, files
        assert any(f.endswith(".distcp") for f in files) and not any(f.endswith(".pt") and "rng" not in f
                                                                      for f in files)
        exported = export_pretrained(d, tmp_path / "exported")
    assert AutoModelForCausalLM.from_pretrained(exported).num_parameters() > 0
    # output_dir (the reference trainer's key) holds the final model as a plain HF directory.
    final_model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    exported_model = AutoModelForCausalLM.from_pretrained(exported)
    for (k, a), (_, b) in zip(final_model.state_dict().items(), exported_model.state_dict().items()):
        assert torch.equal(a, b), k


def _step0_win_rate(cfg: TrainConfig) -> float:
    """The untrained model's win rate against the chosen answers, computed in this process."""
    from transformers import AutoModelForCausalLM

    from simpo_ray.bundled.evaluate import generate_answers
    from simpo_ray.infra.launch import check_inputs
    from simpo_ray.train.model import load_tokenizer, resolve_model_path
    from simpo_ray.train.reward import RewardScorer

    rows = check_inputs(cfg).prompt_rows(cfg.generation_eval_samples)
    assert len(rows) == 128
    tok = load_tokenizer(cfg)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model_name_or_path))
    # As the workers prompt: with the empty system turn the training data's prompts have
    # (`auto_insert_empty_system_msg` and a template that knows a system role). Prompting without
    # it, as this reference did, moved the win rate by 2.5 of 128 prompts with some builds of
    # the bundled models.
    from simpo_ray.data.tokens import inserts_system_turn

    system_turn = cfg.auto_insert_empty_system_msg and inserts_system_turn(tok)
    answers = generate_answers(model, tok, [r["prompt"] for r in rows], system_turn=system_turn)
    scorer = RewardScorer("bundled:reward")
    policy = scorer.score([r["turns"] for r in rows], answers)
    baseline = scorer.score([r["turns"] for r in rows], [r["baseline"] for r in rows])
    won = [0.5 if a == r["baseline"] else float(p > b) + 0.5 * (p == b)
           for a, r, p, b in zip(answers, rows, policy, baseline)]
    return sum(won) / len(won)


@pytest.mark.slow
def test_planted_divergence_is_reported_not_trained_on(ray_cluster, tmp_path):
    # A planted divergence: lr 1e30 with no warmup overflows fp32 on the first update, so the next
    # loss is NaN. (Realistic "too high" rates, 1e-2 to 1e4 here, collapse the model instead: the
    # loss plateaus and the success rate falls to 0, which analysis diagnoses, but nothing is NaN.)
    cfg = TrainConfig(**{**BASE, "learning_rate": 1e30, "warmup_ratio": 0.0},
                      max_steps=60, eval_steps=10)
    result = run_training(cfg, num_workers=1, storage_path=str(tmp_path), name="diverge")
    final = final_metrics(result)
    assert final["status"] == "diverged" and final["diverged"] == 1
    assert 1 <= final["step"] < 10
    # The objective metrics carry their worst value, so a searcher ranks the trial last.
    assert final["eval/success_rate"] == 0.0 and final["eval/preference_accuracy"] == 0.0


@pytest.mark.slow
def test_loss_threshold_counts_as_divergence(ray_cluster, tmp_path):
    cfg = TrainConfig(**BASE, max_steps=20, eval_steps=10, divergence_loss_threshold=1e-3)
    result = run_training(cfg, num_workers=1, storage_path=str(tmp_path), name="explode")
    final = final_metrics(result)
    assert final["status"] == "diverged" and final["step"] == 1
    assert not math.isnan(final["startup_s"])


# --- the loop's small rules, without Ray ---------------------------------------------------------

def test_max_grad_norm_zero_means_no_clipping():
    # In the reference trainer's (HF) key names 0 turns clipping off; clip_grad_norm_(..., 0)
    # would zero every gradient instead.
    from simpo_ray.train.parallel import clip_grad_norm

    model = torch.nn.Linear(4, 3)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    norm = clip_grad_norm(model, 0.0)
    assert norm > 0
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))
    clip_grad_norm(model, float(norm) / 2)
    assert torch.allclose(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])),
                          norm / 2, rtol=1e-4)


def test_progress_lines_say_nothing_where_there_is_no_value_yet():
    from simpo_ray.train.evaluate import log_line as _log_line, progress_line as _progress_line, setup_line as _setup_line

    step0 = _progress_line({"step": 0, "total_steps": 10, "eval/loss": 0.69, "eval/preference_accuracy": 0.5,
                            "eval/rewards/margins": 0.1})
    assert "loss —" in step0 and "nan" not in step0
    assert _log_line(20, 100, {"loss": 0.5, "rewards/margins": 1.0, "tokens": 300.0}, 1e-3, 1.0) == (
        "[simpo-ray] step 20/100  loss 0.5000  reward margin 1.000  lr 0.001  300 tok/s")
    cfg = TrainConfig(bf16=True, gradient_checkpointing=True, parallel="fsdp", fsdp_cpu_offload=True)
    assert _setup_line(cfg, "fsdp", 4, torch.device("cpu")) == (
        "[simpo-ray] fsdp over 4 worker(s), CPU offload on cpu; precision bf16 compute over fp32 master "
        "weights; gradient checkpointing on; dropout off")
