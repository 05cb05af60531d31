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
    assert cfg.beta == 2.5
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: config: ignored (the reference trainer's own settings, no meaning here): "
                   "push_to_hub, report_to, save_strategy"]


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
