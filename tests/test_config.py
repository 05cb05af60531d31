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
    ({"learnin_rate": 1e-6}, "unknown key 'learnin_rate' (did you mean 'learning_rate'?)"),
    ({"zzz": 1}, "unknown key 'zzz'"),
    ({"beta": "high"}, "beta: expected float, got 'high'"),
    ({"beta": 0}, "beta: 0.0 is out of range; allowed (0, inf]"),
    ({"beta": True}, "beta: expected float"),
    ({"learning_rate": -1e-6}, "learning_rate: -1e-06 is out of range"),
    ({"max_steps": 2.5}, "max_steps: expected int, got 2.5"),
    ({"max_steps": 0}, "max_steps: 0 is out of range"),
    ({"loss_type": "ipo"}, "loss_type: 'ipo' is not allowed; choose one of 'sigmoid', 'hinge'"),
    ({"lr_scheduler_type": "step"}, "lr_scheduler_type: 'step' is not allowed"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "cannot be used with loss_type 'hinge'"),
    ({"label_smoothing": 0.7}, "label_smoothing: 0.7 is out of range; allowed [0, 0.5]"),
    ({"warmup_ratio": 1.5}, "warmup_ratio: 1.5 is out of range; allowed [0, 1]"),
    ({"max_length": 64, "max_prompt_length": 64}, "max_prompt_length: 64 must be smaller than max_length (64)"),
    ({"dataset_mixer": {"a": 1.5}}, "dataset_mixer.a: fraction 1.5 is out of range"),
    ({"dataset_mixer": {}}, "dataset_mixer: expected a non-empty mapping"),
    ({"dataset_splits": ["train"]}, "dataset_splits: expected [train_split, eval_split]"),
    ({"bf16": "yes"}, "bf16: expected bool, got 'yes'"),
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


def test_reference_infrastructure_keys_are_accepted():
    # princeton-nlp/SimPO configs carry keys for its own logging/hub upload; they must not fail.
    cfg = from_dict({"report_to": ["wandb"], "push_to_hub": False, "save_strategy": "steps", "beta": 2.5})
    assert cfg.beta == 2.5
