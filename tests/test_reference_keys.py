"""The reference's keys reach what they configure (issue 25): the optimizer and its warmup, the
dtype a checkpoint is read and exported in, the Hub revision of every from_pretrained, Liger's
kernels, output_dir. Each test checks a fact computed independently of the code under test."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from simpo_ray.config import TrainConfig
from simpo_ray.errors import ConfigError, UserError
from simpo_ray.train import model as M
from simpo_ray.train.optim import build_optimizer, warmup_steps


def _save_llama(path, tokenizer, *, layers=2, positions=64, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=positions, tie_word_embeddings=True)
    LlamaForCausalLM(config).to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, chat_tokenizer):
    return _save_llama(tmp_path_factory.mktemp("tiny_llama"), chat_tokenizer)


def _stored(path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as written on disk (safetensors), read without transformers."""
    return load_file(str(path / "model.safetensors"))


# --- optimizer keys reach AdamW ---------------------------------------------------------------

@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_adam_keys_reach_the_optimizer_and_its_first_step(optim):
    cfg = TrainConfig(learning_rate=0.1, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, weight_decay=0.1,
                      optim=optim)
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = build_optimizer(cfg, [p])
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"], group["lr"]) == ((0.8, 0.95), 1e-6, 0.1, 0.1)
    assert bool(group["fused"]) is (optim == "adamw_torch_fused")
    # AdamW's first step by hand: decay p *= 1 - lr*wd = 0.99; m = (1-b1) g, v = (1-b2) g^2, bias-corrected
    # to g and g^2; step = lr * g / (|g| + eps) = 0.1 * 1e-6 / (1e-6 + 1e-6) = 0.05 (eps matters: g = 1e-6).
    p.grad = torch.tensor([1e-6])
    opt.step()
    assert p.item() == pytest.approx(0.99 - 0.05, abs=1e-6)


def test_warmup_steps_overrides_warmup_ratio_in_the_schedule():
    from transformers import get_scheduler

    def lrs(cfg, total=10):  # the learning rate after each step, as the training loop builds the scheduler
        opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])
        sched = get_scheduler(cfg.lr_scheduler_type, opt, num_warmup_steps=warmup_steps(cfg, total),
                              num_training_steps=total)
        out = []
        for _ in range(total):
            opt.step()
            sched.step()
            out.append(sched.get_last_lr()[0])
        return out

    base = dict(learning_rate=1.0, lr_scheduler_type="linear", warmup_ratio=0.5)
    # warmup_steps 3 (ratio ignored): k/3 up to step 3, then (10 - k) / 7 down to 0
    assert lrs(TrainConfig(**base, warmup_steps=3)) == pytest.approx(
        [1 / 3, 2 / 3, 1.0, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0.0])
    # warmup_steps 0: ceil(0.5 x 10) = 5 warmup steps
    assert lrs(TrainConfig(**base)) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 0.8, 0.6, 0.4, 0.2, 0.0])


def test_bitsandbytes_optimizer_is_built_as_hf_builds_it(monkeypatch):
    # bitsandbytes is not installed here: a stand-in records the call (the real class is untested).
    calls = []
    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW=lambda params, **kw: calls.append(kw) or "bnb")
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    cfg = TrainConfig.__new__(TrainConfig)  # skip validation's find_spec: the module is only in sys.modules
    cfg.__dict__.update(TrainConfig().to_dict(), optim="paged_adamw_8bit", adam_beta2=0.98)
    assert build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))]) == "bnb"
    assert calls == [dict(optim_bits=8, is_paged=True, lr=cfg.learning_rate, betas=(0.9, 0.98), eps=1e-8,
                          weight_decay=0.0)]


# --- torch_dtype: the dtype a checkpoint is read in; training keeps fp32 master weights -------

def test_pure_bf16_updates_vanish_at_simpo_learning_rates_fp32_master_weights_move():
    # bf16 has 8 significant bits: next to 1.0 its values are 2**-7 = 0.0078 apart, so a 1e-6 step
    # rounds back to 1.0. AdamW's first step is lr * sign(g): 1e-6.
    bf16 = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.bfloat16))
    bf16.grad = torch.tensor([1.0], dtype=torch.bfloat16)
    torch.optim.AdamW([bf16], lr=1e-6).step()
    assert bf16.item() == 1.0
    # What training does: the weight read in bf16, cast to an fp32 master copy, stepped in fp32.
    master = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.bfloat16).float())
    master.grad = torch.tensor([1.0])
    build_optimizer(TrainConfig(learning_rate=1e-6), [master]).step()
    assert master.item() == pytest.approx(1.0 - 1e-6, abs=6e-8)  # fp32's spacing below 1.0: 6e-8


def test_training_reads_in_torch_dtype_and_trains_fp32(tiny_dir):
    stored = _stored(tiny_dir)
    key = "model.layers.0.mlp.up_proj.weight"
    model = M.load_model(TrainConfig(model_name_or_path=str(tiny_dir), torch_dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    trained = dict(model.named_parameters())[key].detach()
    assert torch.equal(trained, stored[key].to(torch.bfloat16).float())  # read in bf16 ...
    assert not torch.equal(trained, stored[key])                         # ... not in the stored fp32
    default = M.load_model(TrainConfig(model_name_or_path=str(tiny_dir)))
    assert torch.equal(dict(default.named_parameters())[key].detach(), stored[key])


def test_auto_reads_the_stored_dtype(tmp_path, chat_tokenizer):
    path = _save_llama(tmp_path / "bf16", chat_tokenizer, dtype=torch.bfloat16)
    assert {t.dtype for t in _stored(path).values()} == {torch.bfloat16}
    cfg = TrainConfig(model_name_or_path=str(path), torch_dtype="auto")
    assert {p.dtype for p in M.load_model(cfg, for_training=False).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in M.load_model(cfg).parameters()} == {torch.float32}
    assert M.export_dtype(cfg) == torch.bfloat16
    # An explicit float32 wins over bf16's inference default.
    explicit = TrainConfig(model_name_or_path=str(path), torch_dtype="float32", bf16=True)
    assert {p.dtype for p in M.load_model(explicit, for_training=False).parameters()} == {torch.float32}


def test_fsdp_rank0_copy_is_read_in_torch_dtype_into_fp32_shards(tiny_dir):
    import gc

    import torch.distributed as dist

    from simpo_ray.train import parallel
    from simpo_ray.train.logps import PolicyLogps

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    cfg = TrainConfig(model_name_or_path=str(tiny_dir), torch_dtype="bfloat16", max_length=64, max_prompt_length=32)
    key = "model.layers.0.mlp.up_proj.weight"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    policy = None
    try:
        policy = PolicyLogps(parallel.empty_model(cfg), compile=False)
        parallel.shard(policy, cfg, torch.device("cpu"), 1)
        parallel._fill_from_rank0(policy.model, cfg, rank=0)
        shard = dict(policy.model.named_parameters())[key].full_tensor().detach()
        assert shard.dtype == torch.float32
        assert torch.equal(shard, _stored(tiny_dir)[key].to(torch.bfloat16).float())
    finally:
        del policy
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.parametrize("torch_dtype, bf16, expected", [
    ("bfloat16", False, torch.bfloat16), ("float32", True, torch.float32), (None, True, torch.bfloat16),
    (None, False, torch.float32)])
def test_final_model_is_saved_in_the_export_dtype(tmp_path, tiny_dir, chat_tokenizer, torch_dtype, bf16, expected):
    from simpo_ray.train.loop import _save_final_model

    cfg = TrainConfig(model_name_or_path=str(tiny_dir), torch_dtype=torch_dtype, output_dir=str(tmp_path / "out"))
    model = M.load_model(cfg)
    _save_final_model(model, chat_tokenizer, cfg.replace(bf16=bf16), rank=0)
    assert {t.dtype for t in _stored(tmp_path / "out").values()} == {expected}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == str(expected).split(".")[1]


# --- model_revision: revision= of every from_pretrained --------------------------------------

@pytest.fixture
def hub_cache(tmp_path, monkeypatch, chat_tokenizer):
    """A Hugging Face cache holding Hub model org/tiny at two revisions (tests run offline, so
    the cache is what the Hub would serve): v1 has 1 layer, 32 positions and its own chat
    template; main has 2 layers and 64 positions."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--org--tiny"
    for ref, commit, layers in (("v1", "a" * 40, 1), ("main", "b" * 40, 2)):
        snapshot = _save_llama(repo / "snapshots" / commit, chat_tokenizer, layers=layers, positions=32 * layers)
        config = json.loads((snapshot / "tokenizer_config.json").read_text())
        config["chat_template"] = f"{ref}: {chat_tokenizer.chat_template}"
        (snapshot / "tokenizer_config.json").write_text(json.dumps(config))
        (snapshot / "chat_template.jinja").unlink(missing_ok=True)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_model_revision_reaches_every_from_pretrained(hub_cache):
    from simpo_ray.train import memory, parallel

    cfg = TrainConfig(model_name_or_path="org/tiny", model_revision="v1", max_length=32, max_prompt_length=16)
    assert M.load_tokenizer(cfg).chat_template.startswith("v1: ")
    assert M.model_position_limit(cfg) == (32, "max_position_embeddings")
    assert M.load_model(cfg).config.num_hidden_layers == 1
    assert len(parallel.empty_model(cfg).model.layers) == 1
    assert memory.shape_for(cfg).layers == 1
    with pytest.raises(UserError, match=r"max_length: 48 is above .*\(max_position_embeddings: 32\)"):
        M.check_position_limit(cfg.replace(max_length=48))
    main = cfg.replace(model_revision=None)  # the cache's main: the revision is what chose v1 above
    assert M.load_tokenizer(main).chat_template.startswith("main: ")
    assert M.load_model(main).config.num_hidden_layers == 2


def test_model_revision_of_a_local_model_is_refused(tiny_dir):
    with pytest.raises(UserError) as info:
        M.load_tokenizer(TrainConfig(model_name_or_path=str(tiny_dir), model_revision="v1", max_length=64,
                                     max_prompt_length=32))
    assert str(info.value) == (f"model_revision: 'v1' selects a revision of a Hub model, but model_name_or_path "
                               f"'{tiny_dir}' is local; remove model_revision")
    # alignment-handbook's recipes set "main": a local copy loads
    assert M.load_tokenizer(TrainConfig(model_name_or_path=str(tiny_dir), model_revision="main", max_length=64,
                                        max_prompt_length=32)) is not None


# --- use_liger_kernel -------------------------------------------------------------------------

def test_liger_kernel_needs_a_cuda_device(tiny_dir):
    model = M.load_model(TrainConfig(model_name_or_path=str(tiny_dir)))
    with pytest.raises(UserError, match="use_liger_kernel: true, but this run has no GPU"):
        M.apply_liger_kernel(model, torch.device("cpu"))


def test_liger_kernel_wiring_with_a_stand_in(tiny_dir, monkeypatch):
    # liger_kernel is not installed here (no CUDA): a stand-in with liger-kernel 0.8.5's names checks
    # what simpo-ray asks of it. Liger's own kernels run only on a GPU machine (untested here).
    calls = []
    transformers_mod = types.ModuleType("liger_kernel.transformers")
    transformers_mod._apply_liger_kernel_to_instance = lambda **kw: calls.append(kw)
    patch_mod = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch_mod.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": None, "qwen2": None}
    for name, mod in (("liger_kernel", types.ModuleType("liger_kernel")),
                      ("liger_kernel.transformers", transformers_mod),
                      ("liger_kernel.transformers.monkey_patch", patch_mod)):
        monkeypatch.setitem(sys.modules, name, mod)
    model = M.load_model(TrainConfig(model_name_or_path=str(tiny_dir)))
    M.apply_liger_kernel(model, torch.device("cuda"))
    assert calls == [dict(model=model, fused_linear_cross_entropy=False, cross_entropy=False)]
    model.config.model_type = "gpt2"
    with pytest.raises(UserError, match="no kernels for model type 'gpt2' \\(it has: llama, qwen2\\)"):
        M.apply_liger_kernel(model, torch.device("cuda"))


# --- output_dir -------------------------------------------------------------------------------

def test_output_dir_is_claimed_and_another_configs_refused(tmp_path):
    from simpo_ray.config import load_train_config
    from simpo_ray.infra.launch import OUTPUT_CONFIG, claim_output_dir

    out = tmp_path / "final"
    first = TrainConfig(output_dir=str(out))
    claim_output_dir(first)
    assert load_train_config(out / OUTPUT_CONFIG) == first.replace(output_dir=str(out.absolute()))
    (out / "model.safetensors").write_bytes(b"the first run's model")
    claim_output_dir(first)  # the same config again (a rerun): its own directory
    second = first.replace(learning_rate=1e-3)
    with pytest.raises(UserError) as info:
        claim_output_dir(second)
    assert str(info.value) == (f"output_dir: '{out}' holds the model of a run of another config; choose another "
                               "output_dir, empty it, or set overwrite_output_dir: true to write over it")
    claim_output_dir(second.replace(overwrite_output_dir=True))
    assert load_train_config(out / OUTPUT_CONFIG).learning_rate == 1e-3
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and holds no simpo-ray run's output"):
        claim_output_dir(first.replace(output_dir=str(other)))


def test_train_cli_refuses_an_output_dir_of_another_run_before_ray(tmp_path, capsys):
    import yaml

    from simpo_ray.cli import train_main
    from simpo_ray.infra.launch import claim_output_dir

    out = tmp_path / "final"
    claim_output_dir(TrainConfig(output_dir=str(out), learning_rate=1e-3, max_length=64, max_prompt_length=32))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": "bundled:tiny", "output_dir": str(out)}))
    assert train_main(["--config", str(config), "--storage-path", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert "max_length not set: 64" in err  # the minimal config's default, said once
    assert f"output_dir: '{out}' holds the model of a run of another config" in err


def test_a_search_refuses_output_dir_in_base():
    from simpo_ray.search.plan import load

    space = {"size_bucket": "cpu", "base": {"model_name_or_path": "bundled:tiny", "output_dir": "outputs/x"},
             "params": {"beta": {"distribution": "uniform", "low": 2.0, "high": 10.0}}}
    with pytest.raises(ConfigError, match="base.output_dir: 'outputs/x' cannot apply in a search: a search keeps "
                                          "each trial's model as its checkpoints"):
        load(space)
    del space["base"]["output_dir"]
    space["base"]["run_name"] = "x"
    loaded = load(space)
    # the space's base sets no max_length: the model's limit, as a training config's
    assert (loaded.default_config().max_length, loaded.default_config().max_prompt_length) == (64, 32)
    assert any(n.startswith("base.max_length not set: 64") for n in loaded.notes)
    assert "base: ignored (the reference trainer's own settings, no meaning here): run_name" in loaded.notes


def test_report_to_selects_a_searchs_loggers_or_refuses_a_missing_client(monkeypatch):
    """HF's values: a name or a list, all (the installed ones), none; a client that is not installed
    is one line before Ray starts, naming the package."""
    import importlib.util

    from simpo_ray.search import loggers

    assert loggers.backends(None) == () and loggers.backends("none") == () and loggers.backends(["none"]) == ()
    assert loggers.backends("mlflow") == ("mlflow",)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert loggers.backends("all") == ("tensorboard", "mlflow")
    with pytest.raises(ConfigError, match=r"report_to: wandb needs the wandb package \(pip install wandb\)"):
        loggers.check_installed(loggers.backends(["tensorboard", "wandb"]))
    assert [type(c).__name__ for c in loggers.callbacks((), "/tmp/exp", "s")] == ["TensorBoardAtStep"]
    assert loggers.mlflow_uri("/tmp/exp") == "sqlite:////tmp/exp/mlflow.db"
    monkeypatch.setattr(loggers, "_USER_MLFLOW_URI", "http://mlflow.internal:5000")  # set before the search
    assert loggers.mlflow_uri("/tmp/exp") == "http://mlflow.internal:5000"


def test_report_to_wandb_without_a_login_is_refused_before_the_search(monkeypatch, tmp_path):
    """Ray's W&B logger would fail inside Tune, after the data is prepared, without an API key."""
    import importlib.util

    from simpo_ray.search import loggers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real(name, *a))
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(ConfigError, match=r"^report_to: wandb needs a W&B login \(WANDB_API_KEY, or `wandb login`\), "
                                          r"or WANDB_MODE=offline"):
        loggers.check_installed(("wandb",))
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")  # `wandb login`
    loggers.check_installed(("wandb",))
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    loggers.check_installed(("wandb",))
