"""TrainConfig: the guide's example configs load as they are; errors name key, value, range."""

import pytest
import yaml

from simpo_ray.config import TrainConfig, from_dict, load_train_config
from simpo_ray.errors import ConfigError

# Verbatim from ../shared/reference/simpo-hyperparameters.md, "Complete Example Configs".
MISTRAL_7B_BASE = """
model_name_or_path: mistralai/Mistral-7B-v0.1
dataset_mixer:
  HuggingFaceH4/ultrafeedback_binarized: 1.0

learning_rate: 5e-7
beta: 2.0
gamma_beta_ratio: 0.5
loss_type: sigmoid
sft_weight: 0.0

num_train_epochs: 1
per_device_train_batch_size: 2
gradient_accumulation_steps: 4
warmup_ratio: 0.1
lr_scheduler_type: cosine

bf16: true
gradient_checkpointing: true
"""

LLAMA3_8B_INSTRUCT = """
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
dataset_mixer:
  argilla/distilabel-math-preference-dpo: 1.0

learning_rate: 3e-7
beta: 5.0
gamma_beta_ratio: 0.7
loss_type: sigmoid
sft_weight: 0.1

num_train_epochs: 1
per_device_train_batch_size: 1
gradient_accumulation_steps: 16
warmup_ratio: 0.1
lr_scheduler_type: cosine
"""


def test_guide_examples_load_as_they_are(tmp_path):
    path = tmp_path / "mistral.yaml"
    path.write_text(MISTRAL_7B_BASE)
    cfg = load_train_config(path)
    # PyYAML reads "5e-7" (no dot) as a string: it must still become the float 5e-7.
    assert cfg.learning_rate == 5e-7 and isinstance(cfg.learning_rate, float)
    assert cfg.dataset_mixer == {"HuggingFaceH4/ultrafeedback_binarized": 1.0}
    assert (cfg.beta, cfg.gamma_beta_ratio, cfg.sft_weight) == (2.0, 0.5, 0.0)
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps == 8
    assert cfg.bf16 and cfg.gradient_checkpointing
    llama = load_train_config(yaml.safe_load(LLAMA3_8B_INSTRUCT))
    assert (llama.learning_rate, llama.beta, llama.gamma_beta_ratio, llama.sft_weight) == (3e-7, 5.0, 0.7, 0.1)
    assert llama.gradient_accumulation_steps == 16


def test_round_trip_through_yaml():
    cfg = TrainConfig(learning_rate=1e-3, beta=3.0, max_steps=20)
    again = load_train_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize("data, expected", [
    ({"learnin_rate": 1e-6}, "learnin_rate: unknown key (did you mean 'learning_rate'?)"),
    ({"zzz": 1}, "zzz: unknown key"),
    ({"beta": "high"}, "beta: expected a number, got 'high'"),
    ({"beta": 0}, "beta: 0 is out of range; allowed (0, inf)"),
    ({"beta": True}, "beta: expected a number"),
    ({"learning_rate": -1e-6}, "learning_rate: -1e-06 is out of range"),
    ({"max_steps": 2.5}, "max_steps: expected an integer, got 2.5"),
    ({"max_steps": 0}, "max_steps: 0 is out of range"),
    ({"loss_type": "ipo"}, "loss_type: 'ipo' is not allowed; choose one of sigmoid, hinge"),
    ({"lr_scheduler_type": "step"}, "lr_scheduler_type: 'step' is not allowed"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "cannot be used with loss_type 'hinge'"),
    ({"label_smoothing": 0.7}, "label_smoothing: 0.7 is out of range; allowed [0, 0.5]"),
    ({"warmup_ratio": 1.5}, "warmup_ratio: 1.5 is out of range; allowed [0, 1]"),
    ({"max_length": 64, "max_prompt_length": 64}, "max_prompt_length: 64 must be smaller than max_length (64)"),
    ({"dataset_mixer": {"a": 1.5}}, "dataset_mixer.a: fraction 1.5 is out of range"),
    ({"dataset_mixer": {}}, "dataset_mixer: expected a non-empty mapping"),
    ({"dataset_splits": ["train"]}, "dataset_splits: expected [train_split, eval_split]"),
    ({"bf16": "yes"}, "bf16: expected true or false, got 'yes'"),
    ({"gamma_beta_ratio": float("nan")}, "gamma_beta_ratio: nan is not a finite number"),
])
def test_errors_name_key_value_and_allowed(data, expected):
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert expected in str(info.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_train_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: [1, 2\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line \d+"):
        load_train_config(bad)


def test_reference_infrastructure_keys_are_accepted(capsys):
    # princeton-nlp/SimPO configs carry keys for its own logging/hub upload; they must not fail,
    # and one warning line names what was ignored.
    cfg = load_train_config({"report_to": ["wandb"], "push_to_hub": False, "save_strategy": "steps",
                             "beta": 2.5})
    assert cfg.beta == 2.5 and cfg.report_to == ["wandb"]  # report_to: a search's loggers (test_analysis)
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: config: ignored (the reference trainer's own settings, no meaning here): "
                   "push_to_hub, save_strategy"]


# --- hostile or odd YAML: one line naming the file, before anything is built ------------------

def _load_text(tmp_path, content: bytes | str):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as info:
        load_train_config(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    return message


def test_alias_bomb_is_refused_at_once(tmp_path):
    # Nine levels of nine-fold aliases would expand to 9**9 strings.
    lines = ['a0: &a0 ["x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    lines.append("dataset_splits: *a9")
    import time

    t0 = time.perf_counter()
    message = _load_text(tmp_path, "\n".join(lines) + "\n")
    assert time.perf_counter() - t0 < 1.0
    assert "line 2: YAML aliases (*a0) are not allowed" in message


def test_non_utf8_byte_names_its_offset(tmp_path):
    message = _load_text(tmp_path, b"beta: 2.0\ndescription: caf\xe9\n")
    assert message.endswith("not UTF-8 text: byte 0xe9 at offset 26")


def test_duplicate_key_names_both_lines(tmp_path):
    message = _load_text(tmp_path, "beta: 2.0\nsft_weight: 0.1\nbeta: 5.0\n")
    assert message.endswith("duplicate key 'beta' at lines 1 and 3; keep one")


def test_nested_duplicate_key_is_refused(tmp_path):
    message = _load_text(tmp_path, "dataset_mixer:\n  a.jsonl: 0.5\n  a.jsonl: 1.0\n")
    assert "duplicate key 'a.jsonl' at lines 2 and 3" in message


def test_oversized_file_is_refused_without_reading_it(tmp_path):
    message = _load_text(tmp_path, "beta: 2.0\n" + "# padding\n" * 120_000)
    assert "1.1 MiB is too large for a config (limit 1 MiB)" in message


# --- the reference's keys: honoured, or refused in one line (issue 25) ------------------------

def _pretend_importable(monkeypatch, present: set[str]):
    """`importlib.util.find_spec` answering for liger_kernel, triton and bitsandbytes as if exactly
    `present` were installed (this machine has none of them)."""
    import importlib.util

    real = importlib.util.find_spec
    optional = {"liger_kernel", "triton", "bitsandbytes"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if name in present else None) if name in optional
                        else real(name, *a))


@pytest.mark.parametrize("value", [None, "auto", "bfloat16", "float32"])
def test_torch_dtype_accepted_values(value):
    assert from_dict({"torch_dtype": value}).torch_dtype == value


@pytest.mark.parametrize("value, expected", [
    ("float16", "torch_dtype: 'float16' is not supported: training reads the checkpoint into fp32 master weights"),
    ("fp8", "torch_dtype: 'fp8' is not allowed; choose one of auto, bfloat16, float32 or null (fp32)"),
])
def test_torch_dtype_refusals_name_value_and_choices(value, expected):
    with pytest.raises(ConfigError) as info:
        from_dict({"torch_dtype": value})
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_push_to_hub_true_is_refused_saying_how_to_upload(capsys):
    with pytest.raises(ConfigError) as info:
        load_train_config({"push_to_hub": True, "hub_model_id": "me/simpo-run", "output_dir": "outputs/run"})
    assert str(info.value) == ("config: push_to_hub: true is not supported (allowed: false); simpo-ray uploads nothing "
                               "(a long run should not fail at its end on the network); upload the saved model "
                               "afterwards: hf upload me/simpo-run outputs/run")
    cfg = load_train_config({"push_to_hub": False, "hub_model_id": "me/simpo-run"})
    assert cfg == TrainConfig()
    assert "push_to_hub" in capsys.readouterr().err  # named among the ignored keys


def test_use_flash_attention_2_points_at_attn_implementation():
    with pytest.raises(ConfigError, match="use_flash_attention_2: true is not supported .*write attn_implementation: "
                                          "flash_attention_2 instead"):
        from_dict({"use_flash_attention_2": True})
    from_dict({"use_flash_attention_2": False})


def test_optimizer_keys_have_hf_names_defaults_and_ranges():
    cfg = TrainConfig()
    assert (cfg.optim, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon, cfg.weight_decay, cfg.warmup_steps) == \
        ("adamw_torch", 0.9, 0.999, 1e-8, 0.0, 0)
    # YAML's 1e-6 (no dot) is a string: still a float
    assert from_dict({"adam_epsilon": "1e-6", "optim": "adamw_torch_fused"}).adam_epsilon == 1e-6
    for data, expected in [({"adam_beta1": 1.0}, "adam_beta1: 1 is out of range; allowed [0, 1)"),
                           ({"adam_beta2": -0.1}, "adam_beta2: -0.1 is out of range; allowed [0, 1)"),
                           ({"adam_epsilon": 0}, "adam_epsilon: 0 is out of range; allowed (0, inf)"),
                           ({"warmup_steps": -1}, "warmup_steps: -1 is out of range; allowed [0, inf)"),
                           ({"optim": "adafactor"}, ("optim: 'adafactor' is not supported: SimPO trains here "
                                                     "with AdamW; choose one of adamw_torch, adamw_torch_fused"))]:
        with pytest.raises(ConfigError) as info:
            from_dict(data)
        assert expected in str(info.value)


def test_bitsandbytes_optimizers_need_bitsandbytes(monkeypatch):
    """Refused before a run (`check_packages`, from launch.check_inputs), not when a config is read:
    a checkpoint trained with it still exports on a machine without it."""
    from simpo_ray.config import check_packages

    _pretend_importable(monkeypatch, set())
    cfg = from_dict({"optim": "paged_adamw_8bit"})
    with pytest.raises(ConfigError) as info:
        check_packages(cfg)
    assert str(info.value) == ("optim: 'paged_adamw_8bit' is bitsandbytes' AdamW, and bitsandbytes is not installed "
                               "here (pip install bitsandbytes); or choose adamw_torch or adamw_torch_fused")
    _pretend_importable(monkeypatch, {"bitsandbytes"})
    check_packages(cfg)


def test_use_liger_kernel_refused_where_it_cannot_run(monkeypatch):
    from simpo_ray.config import check_packages

    assert from_dict({"use_liger_kernel": False}).use_liger_kernel is False
    _pretend_importable(monkeypatch, set())
    with pytest.raises(ConfigError) as info:
        check_packages(from_dict({"use_liger_kernel": True}))
    assert str(info.value) == ("use_liger_kernel: true, but liger_kernel and triton cannot be imported here (Liger's "
                               "kernels are Triton kernels for CUDA GPUs: pip install liger-kernel); set "
                               "use_liger_kernel: false")
    _pretend_importable(monkeypatch, {"liger_kernel", "triton"})
    with pytest.raises(ConfigError, match="use_liger_kernel: true, but this run has no GPU"):
        from_dict({"use_liger_kernel": True, "use_gpu": False})
    from simpo_ray.infra.launch import run_resources

    cfg = from_dict({"use_liger_kernel": True})  # use_gpu unset: the run's resources decide
    with pytest.raises(ConfigError, match="this run has no GPU"):
        run_resources(cfg, gpus_per_worker=0)
    assert run_resources(cfg, gpus_per_worker=1).gpus_per_worker == 1


@pytest.mark.parametrize("key, hint", [
    # another trainer's key with the same meaning: its name here is the hint
    ("dataset_num_proc", " (did you mean 'preprocessing_num_workers'? TRL's name for it)"),
    ("cpo_alpha", " (did you mean 'sft_weight'? TRL's weight of the chosen answers' NLL)"),
    # known keys of another meaning: said as such, never a near spelling (gradient_accumulation_steps, use_gpu)
    ("eval_accumulation_steps", ": a transformers TrainingArguments key with no counterpart here"),
    ("use_peft", ": a key of TRL's or alignment-handbook's trainer with no counterpart here"),
    # a typo of no trainer's key: the closest key
    ("learning_rat", " (did you mean 'learning_rate'?)"),
])
def test_did_you_mean_only_for_the_same_meaning(key, hint):
    with pytest.raises(ConfigError) as info:
        from_dict({key: 4})
    assert str(info.value) == f"{key}: unknown key{hint}"


def test_dataloader_num_workers_is_ignored_not_taken_for_num_workers(capsys):
    # HF's data-loader processes: batches come from pre-tokenised rows here; num_workers is Ray's workers.
    cfg = load_train_config({"dataloader_num_workers": 8})
    assert cfg.num_workers == 1
    assert capsys.readouterr().err.strip() == ("warning: config: ignored (the reference trainer's own settings, "
                                               "no meaning here): dataloader_num_workers")


def test_max_length_defaults_to_the_models_position_limit(capsys):
    from simpo_ray.infra.launch import check_inputs
    from simpo_ray.train.model import check_position_limit, model_position_limit

    cfg = load_train_config({"model_name_or_path": "bundled:tiny"}, position_limit=model_position_limit)
    assert (cfg.max_length, cfg.max_prompt_length) == (64, 32)  # bundled models: 64 positions
    assert capsys.readouterr().err.strip() == (
        "note: config: max_length not set: 64, the position limit of model 'bundled:tiny' "
        "(max_position_embeddings: 64), below the default 1024; max_prompt_length 32 (half of it)")
    check_position_limit(cfg)  # what 1024 failed
    assert check_inputs(cfg).num_train > 0  # the run's checks before Ray pass
    given = load_train_config({"model_name_or_path": "bundled:tiny", "max_prompt_length": 40},
                              position_limit=model_position_limit)
    assert (given.max_length, given.max_prompt_length) == (64, 40)
    assert capsys.readouterr().err.strip().endswith("below the default 1024")  # max_prompt_length as given
    with pytest.raises(ConfigError, match="max_prompt_length: 100 must be smaller than max_length, which is unset "
                                          r"and so 64, the position limit of model 'bundled:tiny'"):
        load_train_config({"model_name_or_path": "bundled:tiny", "max_prompt_length": 100},
                          position_limit=model_position_limit)
    # A limit at or above 1024 leaves the reference's default, without a line; a set max_length stays.
    assert load_train_config({}, position_limit=lambda c: (4096, "max_position_embeddings")).max_length == 1024
    assert load_train_config({"max_length": 48, "max_prompt_length": 16},
                             position_limit=lambda c: (32, "n_positions")).max_length == 48
    assert capsys.readouterr().err == ""
