"""Checkpoints without Ray: what is in them, that a hostile one is refused, and the export command."""

from __future__ import annotations

import json
import os
import pickle

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from simpo_ray.train import checkpoints
from simpo_ray.config import TrainConfig


def _trained(tmp_path):
    """A small Llama (bundled tokenizer) after one optimizer step: (model, optimizer, scheduler, cfg)."""
    model_dir = tmp_path / "model"
    LlamaForCausalLM(LlamaConfig(vocab_size=51, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, tie_word_embeddings=True)).save_pretrained(model_dir)
    from simpo_ray.bundled.tokenizer import build_tokenizer

    build_tokenizer(model_dir)
    cfg = TrainConfig(model_name_or_path=str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 51, (2, 8))).logits.sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler, cfg


@pytest.fixture()
def checkpoint(tmp_path):
    """A 1-process checkpoint of a small Llama saved with a tokenizer-less config (bundled tokenizer)."""
    model, optimizer, scheduler, cfg = _trained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DCP's "assuming the intent is to save in a single process" is ours to drop
        checkpoints.save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, {"step": 3}, cfg, rank=0)
    return tmp_path / "ckpt", model


def test_checkpoint_holds_shards_json_and_no_pickled_objects(checkpoint):
    path, model = checkpoint
    files = set(os.listdir(path))
    assert files == {".metadata", "__0_0.distcp", "rng_state_0.pt", "trainer_state.json", "train_config.yaml"}
    assert json.loads((path / "trainer_state.json").read_text())["counters"] == {"step": 3}
    torch.load(path / "rng_state_0.pt", weights_only=True)  # a tensor, loadable without unpickling code


def test_export_command_writes_a_loadable_model(checkpoint, tmp_path):
    from simpo_ray.export import main

    path, model = checkpoint
    assert main([str(path), str(tmp_path / "hf")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for (k, a), b in zip(model.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), k
    assert (tmp_path / "hf" / "tokenizer.json").exists()


def test_export_of_a_non_checkpoint_is_one_line(tmp_path, capsys):
    from simpo_ray.export import main

    assert main([str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no checkpoint; expected a simpo-ray checkpoint" in err


class _Exploit:
    marker = "/tmp/simpo-ray-pwned"

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(autouse=True)
def _no_marker():
    if os.path.exists(_Exploit.marker):
        os.remove(_Exploit.marker)
    yield
    assert not os.path.exists(_Exploit.marker), "a checkpoint ran code"


def _dotted_global_metadata() -> bytes:
    """A pickle (protocol 4) whose STACK_GLOBAL names a module DCP's metadata lives in and the
    dotted attribute path `os.system` under it: a prefix allow-list lets it through, and pickle
    resolves it to os.system through `torch.distributed.checkpoint.filesystem.os`."""
    import pickletools  # noqa: F401  (documents the opcodes below)

    mod, name, cmd = (b"torch.distributed.checkpoint.filesystem", b"os.system", f"touch {_Exploit.marker}".encode())
    return (b"\x80\x04" + b"\x8c" + bytes([len(mod)]) + mod + b"\x8c" + bytes([len(name)]) + name + b"\x93"
            + b"\x8c" + bytes([len(cmd)]) + cmd + b"\x85" + b"R" + b".")


def _gadget_checkpoint(tmp_path, checkpoint, where: str):
    """A copy of `checkpoint` rewritten by DCP with a pickled gadget where a real checkpoint has
    plain data (`optim`: the learning rate in param_groups) or a tensor (`model`: a weight)."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path, model = checkpoint
    bad = tmp_path / f"bad-{where}"
    shutil.copytree(path, bad)
    for f in bad.glob("*.distcp"):
        f.unlink()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)  # as the real checkpoint's run
    model(torch.randint(0, 51, (2, 8))).logits.sum().backward()
    optimizer.step()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if where == "optim":
        optim_sd["param_groups"][0]["lr"] = _Exploit()
    else:
        model_sd["model.norm.weight"] = _Exploit()
    with pytest.warns(UserWarning):
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(bad))
    return bad, model


def test_a_checkpoint_whose_metadata_runs_code_is_refused(checkpoint):
    path, model = checkpoint
    (path / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    from simpo_ray.errors import UserError

    with pytest.raises(UserError, match=r"\.metadata: .*refers to (posix|os)\.system.*refusing"):
        checkpoints.load_checkpoint(path, model, optimizer, scheduler, rank=0)
    assert not os.path.exists("/tmp/simpo-ray-pwned")


def _resume(path, model):
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return checkpoints.load_checkpoint(path, model, optimizer, scheduler, rank=0)


def _export(path, out):
    from simpo_ray.export import main

    return main([str(path), str(out)])


@pytest.mark.parametrize("how", ["resume", "export"])
def test_a_dotted_global_in_the_metadata_is_refused(checkpoint, tmp_path, how, capsys):
    from simpo_ray.errors import UserError

    path, model = checkpoint
    (path / ".metadata").write_bytes(_dotted_global_metadata())
    if how == "resume":
        with pytest.raises(UserError, match=r"refers to torch\.distributed\.checkpoint\.filesystem\.os\.system.*refusing"):
            _resume(path, model)
    else:
        assert _export(path, tmp_path / "out") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "refusing to load it" in err


@pytest.mark.parametrize("how", ["resume", "export"])
@pytest.mark.parametrize("where", ["optim", "model"])
def test_a_gadget_among_the_checkpoints_bytes_is_refused(checkpoint, tmp_path, how, where, capsys):
    """DCP stores non-tensor entries as pickled bytes and its own planner unpickles them with
    `weights_only=False`: a gadget in the optimizer's param_groups, or a model weight declared
    as bytes, would run on resume or export. Both are refused in one line; nothing runs (the
    autouse fixture checks the marker)."""
    from simpo_ray.errors import UserError

    bad, model = _gadget_checkpoint(tmp_path, checkpoint, where)
    if how == "resume":
        with pytest.raises(UserError, match=r"not plain data \(it refers to (posix|os)\.system\).*refusing") as e:
            _resume(bad, model)
        assert "\n" not in str(e.value)
    else:
        code = _export(bad, tmp_path / "out")
        err = capsys.readouterr().err
        if where == "optim":  # export reads the model's tensors only: the optimizer's bytes are never read
            assert code == 0 and err == ""
        else:
            assert code == 2 and err.count("\n") == 1 and "not plain data" in err, err


def test_a_real_checkpoint_still_resumes_with_its_optimizer_state(checkpoint, tmp_path):
    """The safe planner reads the optimizer's plain param_groups as before (a fresh model and
    optimizer, as a resumed worker has)."""
    path, _ = checkpoint
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    optimizer = torch.optim.AdamW(model.parameters(), lr=5.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    assert checkpoints.load_checkpoint(path, model, optimizer, scheduler, rank=0) == {"step": 3}
    assert optimizer.param_groups[0]["lr"] == 1e-3 and optimizer.state  # restored from the checkpoint



def test_a_resume_keeps_the_checkpoints_global_batch_or_refuses_in_one_line():
    from simpo_ray.config import TrainConfig
    from simpo_ray.errors import UserError
    from simpo_ray.train.checkpoints import batches_done_here, keep_recipe, recipe

    written = TrainConfig(model_name_or_path="bundled:tiny", per_device_train_batch_size=4,
                          gradient_accumulation_steps=2, num_train_epochs=1, max_steps=-1)
    saved = {"batch_in_epoch": 6, "recipe": recipe(written, 2, 50)}  # 2 x 4 x 2 = 16 pairs a step
    here = TrainConfig(model_name_or_path="bundled:tiny", per_device_train_batch_size=2,
                       gradient_accumulation_steps=2, num_train_epochs=1, max_steps=-1)
    assert keep_recipe(saved, written, 2) == (written, 50, "")             # as written: nothing to say
    cfg, total, note = keep_recipe(saved, here, 4)                       # 4 x 2 x 2: the same 16 pairs
    assert cfg.gradient_accumulation_steps == 2 and total == 50 and "accumulation 2 (was 2 x 4 x 2)" in note
    cfg, total, note = keep_recipe(saved, here, 1)                       # 1 x 2 -> accumulation 8
    assert cfg.gradient_accumulation_steps == 8 and total == 50
    assert note.startswith("resumed on 1 worker(s) x 2 per device: gradient accumulation 8") and "16 pairs" in note
    assert batches_done_here(saved, cfg, 1) == 6 * 4 * 2 // 2            # 48 pairs in: 24 batches of 2
    with pytest.raises(UserError) as err:
        keep_recipe(saved, here, 3)                                      # 6 pairs a micro-batch: 16 % 6
    assert "\n" not in str(err.value) and "global batch of 16 pairs" in str(err.value)
    assert keep_recipe({"batch_in_epoch": 3}, here, 3) == (here, None, "")  # older checkpoints: as before


def test_the_recipe_is_read_from_a_ray_checkpoint_without_downloading_it(tmp_path):
    """The worker peeks at the checkpoint's counters through Ray's filesystem (one small file);
    `as_directory` would download a remote checkpoint whole, before `_resume` downloads it again."""
    import json

    import ray.train

    from simpo_ray.train.checkpoints import STATE_FILE
    from simpo_ray.train.loop import _saved_counters

    counters = {"step": 6, "batch_in_epoch": 6, "recipe": {"world": 2, "per_device": 4, "accumulation": 1,
                                                           "total_steps": 12}}
    (tmp_path / STATE_FILE).write_text(json.dumps({"scheduler": {}, "counters": counters}))
    assert _saved_counters(ray.train.Checkpoint.from_directory(str(tmp_path)), None) == counters
    assert _saved_counters(None, str(tmp_path)) == counters
    assert _saved_counters(ray.train.Checkpoint.from_directory(str(tmp_path / "missing")), None) is None


# ---------------------------------------------------------------- export of a run or a search

def _ckpt_name(step: int) -> str:
    return f"checkpoint_2026-01-01_00-00-{step:02d}.000000"  # Ray Train's name: its date and time


def _write_run(tmp_path, run, scores: dict[int, float], *, kept: tuple[int, ...], metric: str):
    """A Train run directory as a run leaves it: a checkpoint for each step in `kept` (the others
    deleted by retention), each model's final norm filled with its step (so an exported model says
    which checkpoint it came from), and history.jsonl with every report's score and checkpoint path
    (the path the run had, elsewhere: the run may have moved since)."""
    import warnings

    model, optimizer, scheduler, cfg = _trained(tmp_path)
    run.mkdir(parents=True)
    rows = [{"step": 0, metric: 0.0}]
    for step, score in sorted(scores.items()):
        if step in kept:
            with torch.no_grad():
                model.model.norm.weight.fill_(float(step))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # DCP's single-process notice
                checkpoints.save_checkpoint(run / _ckpt_name(step), model, optimizer, scheduler, {"step": step},
                                            cfg, rank=0)
        rows.append({"step": step, metric: score, "checkpoint_path": f"/elsewhere/{run.name}/{_ckpt_name(step)}"})
    (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _search_json(exp, mode: str) -> str:
    """exp/search.json of the bundled tiny space with `mode`; returns its objective."""
    import dataclasses
    from pathlib import Path

    from simpo_ray.search.plan import load
    from simpo_ray.search.records import SearchRecord

    space_file = Path(__file__).resolve().parent.parent / "search_spaces" / "cpu-tiny.yaml"
    record = dataclasses.replace(SearchRecord.from_space(load(space_file), space_file, exp.name), mode=mode)
    record.write(str(exp))
    return record.objective


# Reported scores by step: steps 15 and 25 (the highest and the lowest) were deleted by retention.
SCORES = {10: 0.50, 15: 0.99, 20: 0.90, 25: 0.01, 30: 0.70, 40: 0.60}
KEPT = (10, 20, 30, 40)


@pytest.mark.parametrize("mode, best", [("max", 20), ("min", 10)])
def test_export_of_a_trials_run_takes_its_best_kept_checkpoint_by_the_search_objective(tmp_path, mode, best, capsys):
    from simpo_ray.export import choose_checkpoint, main

    exp = tmp_path / "exp"
    exp.mkdir()
    metric = _search_json(exp, mode)
    run = _write_run(tmp_path, exp / "train_runs" / "train-abc_00001", SCORES, kept=KEPT, metric=metric)
    choice = choose_checkpoint(run)
    assert choice.path == run / _ckpt_name(best)
    assert choice.why == f"best by {metric} = {SCORES[best]:g} at step {best}"
    if mode == "max":  # the command: one line says which, and the model is that checkpoint's
        assert main([str(run), str(tmp_path / "hf")]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == f"[simpo-ray] {run}: best by {metric} = 0.9 at step 20 ({_ckpt_name(20)})"
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
        assert torch.all(exported.model.norm.weight == 20.0)


def test_export_of_a_standalone_run_takes_its_latest_checkpoint(tmp_path):
    """`python -m simpo_ray.train` keeps its latest checkpoints (no score): the latest, whatever the
    reports' values; without a history.jsonl too."""
    from simpo_ray.export import Choice, choose_checkpoint

    run = _write_run(tmp_path, tmp_path / "results" / "simpo-train-1", SCORES, kept=KEPT,
                     metric="eval/preference_accuracy")
    assert choose_checkpoint(run) == Choice(run / _ckpt_name(40), "latest, step 40")
    (run / "history.jsonl").unlink()
    assert choose_checkpoint(run).why == "latest, step 40"


def test_export_of_a_search_takes_its_best_trials_best_checkpoint_even_moved(tmp_path):
    """trials.csv's best trial (b: the higher best value, though a has the higher final one) and
    its best_checkpoint, recorded where the search ran; the experiment has moved since."""
    import pandas as pd

    from simpo_ray.export import choose_checkpoint

    exp = tmp_path / "exp"
    exp.mkdir()
    metric = _search_json(exp, "max")
    for tid in ("a", "b"):
        _write_run(tmp_path / tid, exp / "train_runs" / f"train-{tid}", SCORES, kept=KEPT, metric=metric)
    pd.DataFrame([
        {"trial_id": "a", "status": "completed", "steps": 40, "objective": metric, "mode": "max",
         "best_objective": 0.80, "objective_value": 0.80, "best_step": 40,
         "best_checkpoint": f"/old/exp/train_runs/train-a/{_ckpt_name(40)}"},
        {"trial_id": "b", "status": "completed", "steps": 40, "objective": metric, "mode": "max",
         "best_objective": 0.90, "objective_value": 0.60, "best_step": 20,
         "best_checkpoint": f"/old/exp/train_runs/train-b/{_ckpt_name(20)}"},
    ]).to_csv(exp / "trials.csv", index=False)
    choice = choose_checkpoint(exp)
    assert choice.path == exp / "train_runs" / "train-b" / _ckpt_name(20)
    assert choice.why == f"best trial b, best by {metric} = 0.9 at step 20"


def test_a_folder_without_a_checkpoint_is_one_line_naming_it(tmp_path, capsys):
    from simpo_ray.export import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "history.jsonl").write_text('{"step": 0}\n')
    (run / "checkpoint_2026-01-01_00-00-00.000000").mkdir()  # emptied: not a checkpoint
    assert main([str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {run}: holds no checkpoint; expected a simpo-ray "
                                                   "checkpoint")
    assert not (tmp_path / "out").exists()
    # A search none of whose trials ranks: one line, naming its table.
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "trials.csv").write_text("trial_id,status,best_objective\nx,errored,\n")
    assert main([str(exp), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{exp / 'trials.csv'}: no trial ranks" in err
