"""The real-model path, as a new user meets it: model directories in the real formats (a Llama
with a byte-level BPE tokenizer and a Llama-3 chat template; a Llama with a SentencePiece-style
Metaspace tokenizer and a Zephyr template), data in the exact `HuggingFaceH4/ultrafeedback_binarized`
schema and in the Hub's file layout (`data/train_prefs-00000-of-00001.parquet`), and the
reference's own gemma-2 config.

Tokenisation is checked against the rule of the SimPO reference (princeton-nlp/SimPO
`run_simpo.py` + `simpo_trainer.py`), written out here on its own: the ids of a pair are the
tokenizer's ids of the whole rendered conversation (`apply_chat_template(messages,
tokenize=False)`, an empty system turn in front where the template mentions "system" or
"<|im_start|>"), encoded once, BOS in front if missing, EOS appended if the text does not end in
it; the prompt turns' rendering is masked, so the assistant header is labelled.

The slow part runs the CLIs on it (`simpo_ray.train` with `output_dir`, a 3-trial
`simpo_ray.tune` search, `analysis`) as subprocesses, once, in one module fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from simpo_ray.data import sources as data
from simpo_ray.bundled import task
from simpo_ray.config import TrainConfig, load_train_config
from simpo_ray.data.collate import IGNORE_INDEX
from simpo_ray.train.model import load_tokenizer
from simpo_ray.data.prepare import load_prepared, prepare_datasets
from simpo_ray.data.tokens import tokenize_row, tokenize_split

ROOT = Path(__file__).resolve().parents[1]

# Meta-Llama-3-8B-Instruct's template (no "system" in it: no system turn is inserted).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ "
    "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Zephyr's (alignment-handbook DEFAULT_CHAT_TEMPLATE; the reference's chat_templates.json
# "mistral-base"): role markers are plain text, every turn ends with EOS and a newline.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
# princeton-nlp/SimPO training_configs/gemma-2-9b-it-simpo.yaml, as published (model and data
# are put in by the test: no Hub here).
GEMMA2_REFERENCE_CONFIG = r"""
# Model arguments
model_name_or_path: google/gemma-2-9b-it
torch_dtype: null
attn_implementation: eager

# Data training arguments
chat_template: "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] | trim + '\n\n' %}{% set messages = messages[1:] %}{% else %}{% set system_message = '' %}{% endif %}{% for message in messages %}{% if loop.index0 == 0 %}{% set content = system_message + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + content | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
dataset_mixer:
  princeton-nlp/gemma2-ultrafeedback-armorm: 1.0
dataset_splits:
- train
- test
preprocessing_num_workers: 12

# SimPOTrainer arguments
bf16: true
beta: 10
gamma_beta_ratio: 0.5
do_eval: true
evaluation_strategy: steps
eval_steps: 400
gradient_accumulation_steps: 16
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: False
hub_model_id: simpo-exps
learning_rate: 8.0e-7
log_level: info
logging_steps: 5
lr_scheduler_type: cosine
max_length: 2048
max_prompt_length: 1800
num_train_epochs: 1
optim: adamw_torch
output_dir: outputs/gemma-2-9b-it-simpo
run_name: gemma-2-9b-it-simpo
per_device_train_batch_size: 2
per_device_eval_batch_size: 4
push_to_hub: false
save_strategy: "steps"
save_steps: 1000000
report_to:
- wandb
save_total_limit: 20
seed: 42
warmup_ratio: 0.1
"""
N_TRAIN, N_TEST = 240, 40
MAX_POSITIONS = 2048  # RoPE: no position weights, so the reference's max_length 2048 fits for free


# --------------------------------------------------------------------------- building blocks


def task_texts(n: int = 600) -> list[str]:
    rows = task.load_split("train_prefs").select(range(n))
    return [t for r in rows for t in (r["prompt"], r["chosen"][-1]["content"], r["rejected"][-1]["content"])] + [
        "user assistant system", "<|user|>\n", "<|assistant|>\n", "<|system|>\n", "Sort the digits, please."]


def byte_level_bpe(out_dir: Path) -> PreTrainedTokenizerFast:
    """Llama-3 style: byte-level BPE (GPT-2 pre-tokenizer regex), `<|begin_of_text|>` added by the
    tokenizer and by the template, `<|eot_id|>` as EOS (the Instruct model's)."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(task_texts(), trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    core.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                        special_tokens=[("<|begin_of_text|>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|end_of_text|>")
    tok.chat_template = LLAMA3_TEMPLATE
    tok.save_pretrained(out_dir)
    return tok


def metaspace_sentencepiece(out_dir: Path) -> PreTrainedTokenizerFast:
    """Llama-2 / Mistral (Zephyr) style: SentencePiece-like BPE over `▁`-marked words (Metaspace,
    prepend_scheme "first"), `<s>` added by the tokenizer, `</s>` as EOS."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    core.train_from_iterator(task_texts(), trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = ZEPHYR_TEMPLATE
    tok.save_pretrained(out_dir)
    return tok


def llama_dir(path: Path, tok) -> Path:
    """A small LlamaForCausalLM built from config (random init), saved with its tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MAX_POSITIONS,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def reward_dir(path: Path, tok) -> Path:
    """A small LlamaForSequenceClassification (one output, random init) with its own tokenizer."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                         num_labels=1, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def ultrafeedback_rows(split: str, n: int) -> list[dict]:
    """Rows in HuggingFaceH4/ultrafeedback_binarized's schema, from the bundled task's pairs; every
    tenth one a longer conversation (a system turn and an earlier exchange)."""
    rows = []
    for i, r in enumerate(task.load_split(split).select(range(n))):
        turns = [{"role": "user", "content": r["prompt"]}]
        if i % 10 == 3:
            turns = [{"role": "system", "content": "Answer with the digits only."},
                     {"role": "user", "content": "sort: 21"}, {"role": "assistant", "content": "12"}] + turns
        chosen = turns + [r["chosen"][-1]]
        rows.append({"prompt": r["prompt"], "prompt_id": f"{split}-{i:05d}", "chosen": chosen,
                     "rejected": turns + [r["rejected"][-1]], "messages": chosen,
                     "score_chosen": 8.0, "score_rejected": 4.5})
    return rows


def hub_layout(root: Path) -> Path:
    """The files of a `huggingface-cli download --repo-type dataset` of ultrafeedback_binarized."""
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("---\nlicense: mit\n---\n# UltraFeedback Binarized (a test copy)\n")
    for split, n in (("train_prefs", N_TRAIN), ("test_prefs", N_TEST)):
        pq.write_table(pa.Table.from_pylist(ultrafeedback_rows(split, n)),
                       root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def whole_conversation(tok, chosen: list[dict]) -> tuple[list[int], int]:
    """(token ids, number of masked prompt ids) of one response by the reference's rule, spelled
    out here (see the module docstring)."""
    template = tok.chat_template
    msgs = list(chosen)
    if msgs[0]["role"] != "system" and ("system" in template or "<|im_start|>" in template):
        msgs.insert(0, {"role": "system", "content": ""})
    prompt_text = tok.apply_chat_template(msgs[:-1], tokenize=False)
    full_text = tok.apply_chat_template(msgs, tokenize=False)
    assert full_text.startswith(prompt_text)
    ids = tok(full_text, add_special_tokens=False)["input_ids"]
    prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt)] == prompt  # these tokenizers merge nothing across the boundary
    if tok.bos_token_id is not None and ids[:1] != [tok.bos_token_id]:
        ids, prompt = [tok.bos_token_id] + ids, [tok.bos_token_id] + prompt
    if ids[-1] != tok.eos_token_id:
        ids = ids + [tok.eos_token_id]
    return ids, len(prompt)


def assert_by_the_rule(tok, raw: dict, out: dict) -> None:
    for side in ("chosen", "rejected"):
        ids, n_prompt = whole_conversation(tok, raw[side])
        assert out[f"{side}_input_ids"] == ids, (side, tok.convert_ids_to_tokens(out[f"{side}_input_ids"]))
        assert out[f"{side}_labels"] == [IGNORE_INDEX] * n_prompt + ids[n_prompt:]


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict:
    """The two real-format model directories and the hub-layout data (seconds to build)."""
    root = tmp_path_factory.mktemp("real_format")
    return {
        "llama3-bpe": llama_dir(root / "llama3-bpe", byte_level_bpe(root / "tok-bpe")),
        "zephyr-sentencepiece": llama_dir(root / "zephyr-sp", metaspace_sentencepiece(root / "tok-sp")),
        "data": hub_layout(root / "ultrafeedback_binarized"),
        # A reward model with another tokenizer and template than the Llama-3 policy's.
        "reward": reward_dir(root / "reward-sp", metaspace_sentencepiece(root / "tok-rm")),
        "root": root,
    }


def run_config(model: Path, dataset: Path, **overrides) -> dict:
    return {"model_name_or_path": str(model), "dataset_mixer": {str(dataset): 1.0},
            "dataset_splits": ["train_prefs", "test_prefs"], "max_length": 256, "max_prompt_length": 128,
            "max_steps": 20, "eval_steps": 10, "logging_steps": 5, "learning_rate": 1e-3, "warmup_ratio": 0.1,
            "per_device_train_batch_size": 8, "per_device_eval_batch_size": 20, "max_eval_samples": 40,
            "generation_eval_samples": 0, "sft_weight": 0.5, **overrides}


# --------------------------------------------------------------------------- tokenisation (fast)


@pytest.mark.parametrize("kind", ["llama3-bpe", "zephyr-sentencepiece", "bundled"])
def test_ids_are_the_whole_conversation_encoded_once(formats, chat_tokenizer, kind):
    tok = chat_tokenizer if kind == "bundled" else load_tokenizer(TrainConfig(model_name_or_path=str(formats[kind])))
    raw = ultrafeedback_rows("test_prefs", 30)
    ds = data.normalise(datasets.Dataset.from_list(raw), "uf")
    out, stats = tokenize_split(ds, tok, max_length=512, max_prompt_length=256)
    assert (stats.kept, stats.prompt_truncated, stats.response_truncated) == (30, 0, 0)
    for r, o in zip(raw, out):
        assert_by_the_rule(tok, r, o)


def test_sentencepiece_answer_has_no_spurious_word_marker(formats):
    """Encoding the answer on its own (what simpo-ray did) starts it with a `▁`-marked piece
    that never occurs there in the conversation; encoded once, it does not."""
    tok = load_tokenizer(TrainConfig(model_name_or_path=str(formats["zephyr-sentencepiece"])))
    user = {"role": "user", "content": "sort: 5301"}
    row = {"prompt": "sort: 5301", "chosen": [user, {"role": "assistant", "content": "0135"}],
           "rejected": [user, {"role": "assistant", "content": "01355"}]}
    answer_alone = tok("<|assistant|>\n0135</s>\n", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(answer_alone)[0].startswith("▁")  # the trap exists
    out = tokenize_row(row, tok, 256, 128)
    labelled = [t for t in out["chosen_labels"] if t != IGNORE_INDEX]
    assert not tok.convert_ids_to_tokens(labelled)[0].startswith("▁")
    # The reference: the header is labelled, the turn ends "</s>\n", and EOS is appended after it.
    assert tok.decode(labelled) == "<|assistant|>\n0135</s>\n</s>"
    prompt = out["chosen_input_ids"][: len(out["chosen_input_ids"]) - len(labelled)]
    assert prompt[0] == tok.bos_token_id  # the tokenizer's BOS (the template writes none)
    assert tok.decode(prompt[1:]) == "<|system|>\n</s>\n<|user|>\nsort: 5301</s>\n"  # an empty system turn


def test_llama3_template_gets_no_system_turn_and_labels_the_header(formats):
    tok = load_tokenizer(TrainConfig(model_name_or_path=str(formats["llama3-bpe"])))
    row = data.normalise(datasets.Dataset.from_list(ultrafeedback_rows("test_prefs", 1)), "uf")[0]
    out = tokenize_row(row, tok, 256, 128)
    labelled = [t for t in out["chosen_labels"] if t != IGNORE_INDEX]
    answer = row["chosen"][-1]["content"]
    assert tok.decode(labelled) == f"<|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>"
    assert tok.decode(out["prompt_input_ids"]) == (
        f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{row['prompt']}<|eot_id|>")


def test_reference_gemma2_config_loads_and_tokenises(formats, tmp_path, capsys):
    """The reference's gemma-2-9b-it-simpo.yaml as published (its chat_template key, its
    trainer-only keys), with a local model and data put in. No key is dropped silently: each is
    a TrainConfig field holding the file's value, or named in the one warning line."""
    from simpo_ray.config import FIELDS

    raw = yaml.safe_load(GEMMA2_REFERENCE_CONFIG)
    raw["model_name_or_path"] = str(formats["llama3-bpe"])
    raw["dataset_mixer"] = {str(formats["data"]): 1.0}
    raw["dataset_splits"] = ["train_prefs", "test_prefs"]
    path = tmp_path / "gemma-2-9b-it-simpo.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    capsys.readouterr()
    cfg = load_train_config(path)
    assert cfg.chat_template == raw["chat_template"] and cfg.max_length == 2048
    [warning] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    named = set(warning.split("no meaning here): ")[1].split(", "))
    assert named == set(raw) - set(FIELDS), named
    for key in set(raw) & set(FIELDS):
        assert getattr(cfg, key) == raw[key], key
    assert named <= {"do_eval", "evaluation_strategy", "gradient_checkpointing_kwargs", "hub_model_id",
                     "push_to_hub", "log_level", "run_name", "save_strategy"}  # none changes what is trained
    tok = load_tokenizer(cfg)
    assert tok.chat_template == raw["chat_template"]
    rows = ultrafeedback_rows("test_prefs", 5)
    out, _ = tokenize_split(data.normalise(datasets.Dataset.from_list(rows), "uf"), tok, cfg.max_length,
                            cfg.max_prompt_length)
    for r, o in zip(rows, out):
        assert_by_the_rule(tok, r, o)  # the template mentions "system": an empty system turn goes in
        labelled = tok.decode([t for t in o["chosen_labels"] if t != IGNORE_INDEX])
        assert labelled == f"<start_of_turn>model\n{r['chosen'][-1]['content']}<end_of_turn>\n<|eot_id|>"


@pytest.mark.parametrize("kind", ["llama3-bpe", "zephyr-sentencepiece"])
def test_pipeline_reads_the_hub_layout_and_tokenises_by_the_rule(formats, kind, tmp_path):
    """`launch.check_inputs`' path (load_tokenizer + prepare_datasets) on the hub-layout parquet."""
    cfg = load_train_config(run_config(formats[kind], formats["data"]))
    tok = load_tokenizer(cfg)
    prepared = prepare_datasets(cfg, tok, cache_dir=tmp_path / "cache")
    assert (prepared.num_train, prepared.num_eval) == (N_TRAIN, N_TEST)
    candidates: dict[str, list[dict]] = {}
    for split, n in (("train_prefs", N_TRAIN), ("test_prefs", N_TEST)):
        for r in ultrafeedback_rows(split, n):
            candidates.setdefault(r["prompt"], []).append(r)
    for path in (prepared.train_path, prepared.eval_path):
        for o in load_prepared(path):
            assert any(_by_the_rule(tok, r, o) for r in candidates[o["prompt"]]), o["prompt"]


def _by_the_rule(tok, raw, out) -> bool:
    try:
        assert_by_the_rule(tok, raw, out)
        return True
    except AssertionError:
        return False


# --------------------------------------------------------------------------- the CLIs (slow)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # never join the test session's cluster
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


# What a normal run must not print: tracebacks, Ray's own messages and start-up lines (Train's
# controller, the process group, token auth), and colour codes written to a file or a pipe.
RAY_INTERNAL = ("Traceback", "(raylet)", "GetTimeoutError", "(TrainController", "Setting up process group",
                "Token authentication is enabled", "\x1b[")


@pytest.fixture(scope="module")
def cli_runs(formats) -> dict:
    """`simpo_ray.train` (with output_dir) on the Llama-3-format model, then a 3-trial search on
    it and `analysis` of the search: each once, as a subprocess."""
    root = formats["root"] / "runs"
    root.mkdir()
    model, dataset = formats["llama3-bpe"], formats["data"]
    out = {"output_dir": root / "final-model", "results": root / "results"}
    train_cfg = root / "train.yaml"
    train_cfg.write_text(yaml.safe_dump(run_config(model, dataset, output_dir=str(out["output_dir"])),
                                        sort_keys=False))
    out["train"] = _run("simpo_ray.train", "--config", str(train_cfg), "--storage-path", str(out["results"]),
                        "--name", "train-real-format")
    space = yaml.safe_load((ROOT / "search_spaces" / "cpu-tiny.yaml").read_text())
    space["name"] = "real-format"
    space["base"] = {k: v for k, v in run_config(model, dataset).items() if k not in space["params"]}
    # The generation-quality objective: the policy answers 8 held-out prompts, the reward model
    # judges them against the chosen answers; ASHA stops on it at step 10.
    space["base"].update({"reward_model_name_or_path": str(formats["reward"]), "generation_eval_samples": 8,
                          "max_new_tokens": 8})
    space["search"].update({"num_samples": 3, "objective": "eval/reward_win_rate_lc", "scheduler": "asha",
                            "grace_period": 10, "reduction_factor": 2, "max_t": 20, "max_failures": 0,
                            "checkpoint_keep": 1})
    space.pop("estimate", None)
    space_file = root / "space.yaml"
    space_file.write_text(yaml.safe_dump(space, sort_keys=False))
    out["tune"] = _run("simpo_ray.tune", "--space", str(space_file), "--storage-path", str(out["results"]))
    out["analysis"] = _run("analysis", str(out["results"] / "real-format"), "--out", str(root / "report"),
                           timeout=120)
    out["report"] = root / "report"
    return out


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


@pytest.mark.slow
def test_train_cli_runs_and_saves_a_loadable_model_to_output_dir(cli_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = cli_runs["train"]
    assert proc.returncode == 0, _explain(proc)
    assert not [s for s in RAY_INTERNAL if s in proc.stdout + proc.stderr], _explain(proc)
    assert str(cli_runs['output_dir']) in proc.stdout  # where the model went is printed
    model = AutoModelForCausalLM.from_pretrained(cli_runs["output_dir"])
    assert isinstance(model, LlamaForCausalLM) and model.config.hidden_size == 64
    assert AutoTokenizer.from_pretrained(cli_runs["output_dir"]).chat_template == LLAMA3_TEMPLATE


@pytest.mark.slow
def test_three_trial_search_and_analysis_cli_run_cleanly(cli_runs):
    import pandas as pd

    for step in ("tune", "analysis"):
        proc = cli_runs[step]
        assert proc.returncode == 0, _explain(proc)
        assert not [s for s in RAY_INTERNAL if s in proc.stdout + proc.stderr], _explain(proc)
    exp = cli_runs["results"] / "real-format"
    trials = pd.read_csv(exp / "trials.csv")
    assert len(trials) == 3 and set(trials["status"]) <= {"completed", "stopped_early"}
    assert "completed" in set(trials["status"])
    assert json.loads((exp / "search.json").read_text())["objective"] == "eval/reward_win_rate_lc"
    curves = pd.read_csv(exp / "curves.csv")
    for tid, g in curves.groupby("trial_id"):
        measured = g.dropna(subset=["eval/reward_win_rate_lc"])
        assert sorted(measured["step"]) == [0, 10] + ([20] if len(g) == 3 else []), tid
        assert measured["eval/reward_win_rate_lc"].between(0, 1).all() and (measured["eval/gen_length"] <= 8).all()
    assert (cli_runs["report"] / "recommendations.md").is_file()


@pytest.mark.slow
def test_the_search_and_its_analysis_warn_when_the_best_trials_answers_were_cut_or_won_by_length(cli_runs):
    """8 new tokens at most: the search's summary warns beside the best trial exactly when its
    report at its best step had most generations cut at max_new_tokens or length separating wins
    from losses, and the analysis beside its final values (both read from the written tables)."""
    import pandas as pd

    exp = cli_runs["results"] / "real-format"
    curves = pd.read_csv(exp / "curves.csv", dtype={"trial_id": str})
    assert curves["eval/truncated_rate"].dropna().between(0, 1).all()
    assert set(curves["eval/length_separates"].dropna()) <= {-1.0, 0.0, 1.0}
    best = pd.read_csv(exp / "trials.csv", dtype={"trial_id": str}).sort_values("rank").iloc[0]
    at = curves[(curves["trial_id"] == best["trial_id"]) & (curves["step"] == best["best_step"])].iloc[-1]
    def bad(cut, separates):  # NaN: not measured, nothing to say
        return bool(cut > 0.5) or bool(pd.notna(separates) and separates != 0)

    bad_then = bad(at["eval/truncated_rate"], at["eval/length_separates"])
    assert (f"best trial {best['trial_id']} at step {best['best_step']:.0f}: warning:" in cli_runs["tune"].stdout) == bad_then
    bad_finally = bad(best["final_eval/truncated_rate"], best["final_eval/length_separates"])
    md = (cli_runs["report"] / "recommendations.md").read_text()
    assert (f"⚠ Best trial `{best['trial_id']}`'s final model: warning:" in md) == bad_finally


@pytest.mark.slow
def test_export_takes_a_run_or_a_search_directory_and_says_which_checkpoint(cli_runs, tmp_path):
    import pandas as pd

    from simpo_ray.infra.history import read_history

    run = cli_runs["results"] / "train-real-format"
    proc = _run("simpo_ray.export", str(run), str(tmp_path / "from-run"))
    assert proc.returncode == 0, _explain(proc)
    last = read_history(run / "history.jsonl")[-1]  # a standalone run keeps its latest checkpoints
    assert f"{run}: latest, step {last['step']} ({Path(last['checkpoint_path']).name})" in proc.stdout
    assert (tmp_path / "from-run" / "config.json").is_file()

    exp = cli_runs["results"] / "real-format"
    best = pd.read_csv(exp / "trials.csv", dtype={"trial_id": str}).sort_values("rank").iloc[0]
    proc = _run("simpo_ray.export", str(exp), str(tmp_path / "from-search"))
    assert proc.returncode == 0, _explain(proc)
    assert f"{exp}: best trial {best['trial_id']}, best by eval/reward_win_rate_lc = " in proc.stdout
    assert (tmp_path / "from-search" / "config.json").is_file()
