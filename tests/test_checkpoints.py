"""Checkpoints without Ray: what is in them, that a hostile one is refused, and the export command."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from simpo_ray.train import checkpoints
from simpo_ray.config import TrainConfig


@pytest.fixture()
def checkpoint(tmp_path):
    """A 1-process checkpoint of a small Llama saved with a tokenizer-less config (bundled tokenizer)."""
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
    with pytest.warns(UserWarning):  # DCP: "assuming the intent is to save in a single process"
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
    assert err.count("\n") == 1 and "not a simpo-ray checkpoint" in err


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/simpo-ray-pwned",))


def test_a_checkpoint_whose_metadata_runs_code_is_refused(checkpoint):
    path, model = checkpoint
    (path / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    from simpo_ray.errors import UserError

    with pytest.raises(UserError, match=r"\.metadata: .*refers to (posix|os)\.system.*refusing"):
        checkpoints.load_checkpoint(path, model, optimizer, scheduler, rank=0)
    assert not os.path.exists("/tmp/simpo-ray-pwned")
