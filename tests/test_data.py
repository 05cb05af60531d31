"""simpo_ray.data (loading, normalising, the Hub checks) and simpo_ray.data.tokens (reference
tokenisation, caching, collation).

Expected token ids are spelled out token by token from the tokenizer's vocabulary, not by
calling the code under test. The whole-conversation rule on real-format tokenizers (byte-level
BPE, SentencePiece-style) is tests/test_real_format.py.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from simpo_ray.data import hub, prepare, sources as data, tokens
from simpo_ray.config import TrainConfig
from simpo_ray.data.sources import load_raw
from simpo_ray.errors import UserError
from simpo_ray.data.collate import IGNORE_INDEX
from simpo_ray.data.collate import PairCollator
from simpo_ray.data.tokens import TokenizeOptions, tokenize_row
from simpo_ray.data.prepare import prepare_datasets

OLD_MODE = TokenizeOptions(auto_insert_empty_system_msg=False, mask_generation_prompt=True)


def chat_row(prompt, chosen, rejected):
    user = {"role": "user", "content": prompt}
    return {"prompt": prompt, "chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def string_rows(n, tag="a"):
    return [{"prompt": f"q {tag}{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "extra": i} for i in range(n)]


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A word-level tokenizer that adds BOS itself (like Llama) and whose chat template also
    writes ``bos_token`` (like Llama's): the case where BOS could be doubled."""
    specials = ["<pad>", "<unk>", "<s>", "</s>", "[U]", "[A]"]
    words = "hello world how are you fine thanks bad a b c d e f g h".split()
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ '[U] ' if m['role'] == 'user' else '[A] ' }}"
        "{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %} {% endfor %}"
        "{% if add_generation_prompt %}{{ '[A] ' }}{% endif %}"
    )
    return tok


# --------------------------------------------------------------------------- tokenisation


def test_chat_row_is_masked_as_the_reference_masks_it(chat_tokenizer):
    """The reference (run_simpo.py "simpo" task): the template mentions "system", so an empty
    system turn goes in front of the prompt; the prompt is rendered without the generation prompt,
    so the assistant header is labelled with the answer; EOS ends the answer (not doubled)."""
    tok = chat_tokenizer
    ids = tok.convert_tokens_to_ids
    out = tokenize_row(chat_row("sort: 321", "123", "1223"), tok, max_length=64, max_prompt_length=32)
    # Template: <s>[<|system|>{system}]<|user|>{prompt}<|assistant|>{answer}</s>; no BOS of its own.
    prompt = ids(["<s>", "<|system|>", "<|user|>", *"sort: 321"])
    assert out["prompt_input_ids"] == prompt
    assert out["chosen_input_ids"] == prompt + ids(["<|assistant|>", *"123", "</s>"])
    assert out["rejected_input_ids"] == prompt + ids(["<|assistant|>", *"1223", "</s>"])
    assert out["chosen_labels"] == [IGNORE_INDEX] * 12 + ids(["<|assistant|>", *"123", "</s>"])
    assert out["rejected_labels"] == [IGNORE_INDEX] * 12 + ids(["<|assistant|>", *"1223", "</s>"])
    response = [t for t in out["chosen_labels"] if t != IGNORE_INDEX]
    assert tok.decode(response) == "<|assistant|>123</s>"
    assert out["prompt"] == "sort: 321"


def test_old_masking_mode_is_a_named_option(chat_tokenizer):
    """mask_generation_prompt: the header masked with the prompt; auto_insert_empty_system_msg
    false: no system turn. Both together are simpo-ray's earlier tokenisation."""
    ids = chat_tokenizer.convert_tokens_to_ids
    row = chat_row("sort: 321", "123", "1223")
    out = tokenize_row(row, chat_tokenizer, 64, 32, OLD_MODE)
    prompt = ids(["<s>", "<|user|>", *"sort: 321", "<|assistant|>"])
    assert out["chosen_input_ids"] == prompt + ids([*"123", "</s>"])
    assert out["chosen_labels"] == [IGNORE_INDEX] * 12 + ids([*"123", "</s>"])
    header_masked = tokenize_row(row, chat_tokenizer, 64, 32, TokenizeOptions(mask_generation_prompt=True))
    assert header_masked["chosen_input_ids"] == ids(["<s>", "<|system|>"]) + prompt[1:] + ids([*"123", "</s>"])
    no_system = tokenize_row(row, chat_tokenizer, 64, 32, TokenizeOptions(auto_insert_empty_system_msg=False))
    assert no_system["chosen_labels"] == [IGNORE_INDEX] * 11 + ids(["<|assistant|>", *"123", "</s>"])
    # The config keys of the same names choose them.
    cfg = TrainConfig(auto_insert_empty_system_msg=False, mask_generation_prompt=True)
    assert TokenizeOptions.from_config(cfg) == OLD_MODE


def test_string_row_is_used_as_is_and_eos_not_doubled(chat_tokenizer):
    tok = chat_tokenizer
    ids = tok.convert_tokens_to_ids
    row = {"prompt": "why?", "chosen": "no", "rejected": "yes</s>"}
    out = tokenize_row(row, tok, max_length=64, max_prompt_length=32)
    # No chat template for strings; BOS in front as the reference's tokenize_row puts it.
    assert out["prompt_input_ids"] == ids(["<s>", *"why?"])
    assert out["chosen_input_ids"] == ids(["<s>", *"why?", *"no", "</s>"])
    assert out["rejected_input_ids"] == ids(["<s>", *"why?", *"yes", "</s>"])  # already ended in EOS
    assert out["chosen_labels"] == [IGNORE_INDEX] * 5 + ids([*"no", "</s>"])


def test_bos_from_tokenizer_and_template_is_not_doubled(bos_tokenizer):
    tok = bos_tokenizer
    ids = tok.convert_tokens_to_ids
    # This template does not mention "system": no system turn is inserted.
    chat = tokenize_row(chat_row("hello world", "fine thanks", "bad"), tok, 64, 32)
    assert chat["prompt_input_ids"] == ids(["<s>", "[U]", "hello", "world"])
    assert chat["chosen_input_ids"] == ids(["<s>", "[U]", "hello", "world", "[A]", "fine", "thanks", "</s>"])
    assert chat["rejected_labels"] == [IGNORE_INDEX] * 4 + ids(["[A]", "bad", "</s>"])
    # Plain strings, concatenated as they are: BOS in front (once).
    plain = tokenize_row({"prompt": "hello world", "chosen": " fine", "rejected": " bad"}, tok, 64, 32)
    assert plain["prompt_input_ids"] == ids(["<s>", "hello", "world"])
    assert plain["chosen_input_ids"] == ids(["<s>", "hello", "world", "fine", "</s>"])


def test_prompt_token_merged_with_the_answer_moves_into_the_response():
    """build_tokenized_answer: prompt + answer encoded once; where the prompt's last token merges
    with the answer's first ("a" + "b" -> "ab"), the response starts one token earlier."""
    vocab = {"<s>": 0, "</s>": 1, "q": 2, "a": 3, "b": 4, "ab": 5}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
    out = tokenize_row({"prompt": "qa", "chosen": "b", "rejected": "a"}, tok, 64, 32)
    assert out["chosen_input_ids"] == [0, 2, 5, 1]  # <s> q ab </s>: the merged token is trained on
    assert out["chosen_labels"] == [IGNORE_INDEX] * 2 + [5, 1]
    assert out["rejected_input_ids"] == [0, 2, 3, 3, 1]  # <s> q a a </s>
    assert out["rejected_labels"] == [IGNORE_INDEX] * 3 + [3, 1]
    assert out["prompt_input_ids"] == [0, 2]  # the shorter of the two prompt parts (reference)


def test_answer_falls_back_to_raw_content_when_template_does_not_extend_prompt(bos_tokenizer):
    tok = bos_tokenizer
    ids = tok.convert_tokens_to_ids
    # A template whose generation prompt is not a prefix of the rendered assistant turn.
    odd = tok.chat_template.replace("{{ '[A] ' }}{% endif %}", "{{ 'a ' }}{% endif %}")
    tok2 = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    tok2.chat_template = odd
    out = tokenize_row(chat_row("hello", "fine thanks", "bad"), tok2, 64, 32, OLD_MODE)
    prompt = ids(["<s>", "[U]", "hello", "a"])
    assert out["chosen_input_ids"] == prompt + ids(["fine", "thanks", "</s>"])
    # The reference mode renders no generation prompt, so the conversation extends the prompt.
    out = tokenize_row(chat_row("hello", "fine thanks", "bad"), tok2, 64, 32)
    assert out["chosen_input_ids"] == ids(["<s>", "[U]", "hello", "[A]", "fine", "thanks", "</s>"])


def test_long_prompt_keeps_its_end_and_bos(chat_tokenizer):
    tok = chat_tokenizer
    ids = tok.convert_tokens_to_ids
    digits = "0123456789" * 3
    out = tokenize_row(chat_row("sort: " + digits, "12", "21"), tok, max_length=20, max_prompt_length=12)
    full_prompt = ids(["<s>", "<|system|>", "<|user|>", *("sort: " + digits)])  # 39 tokens
    assert out["prompt_input_ids"] == ids(["<s>"]) + full_prompt[-11:]
    assert tok.convert_ids_to_tokens(out["prompt_input_ids"][-3:]) == ["7", "8", "9"]
    answer = ids(["<|assistant|>", "1", "2", "</s>"])
    assert out["chosen_input_ids"] == out["prompt_input_ids"] + answer  # response intact
    assert out["chosen_labels"] == [IGNORE_INDEX] * 12 + answer
    assert len(out["rejected_input_ids"]) == 16 <= 20


def test_long_response_is_cut_to_max_length_minus_max_prompt_length(chat_tokenizer):
    tok = chat_tokenizer
    ids = tok.convert_tokens_to_ids
    long_answer = "abcdefghijklmnopqrst"  # header + 20 chars + EOS
    out = tokenize_row(chat_row("hi", long_answer, "no"), tok, max_length=16, max_prompt_length=6)
    prompt = ids(["<s>", "<|system|>", "<|user|>", "h", "i"])  # 5 <= 6: not truncated
    assert out["prompt_input_ids"] == prompt
    # 5 + 22 > 16, so both responses are cut to 16 - 6 = 10 tokens (the short one is shorter anyway).
    assert out["chosen_input_ids"] == prompt + ids(["<|assistant|>", *"abcdefghi"])
    assert out["rejected_input_ids"] == prompt + ids(["<|assistant|>", "n", "o", "</s>"])
    assert out["chosen_labels"] == [IGNORE_INDEX] * 5 + ids(["<|assistant|>", *"abcdefghi"])


def test_long_prompt_and_long_response_fit_max_length(chat_tokenizer):
    tok = chat_tokenizer
    out = tokenize_row(chat_row("x" * 40, "y" * 40, "z"), tok, max_length=24, max_prompt_length=10)
    assert len(out["prompt_input_ids"]) == 10
    assert len(out["chosen_input_ids"]) == 24
    assert out["chosen_labels"][:10] == [IGNORE_INDEX] * 10
    assert tok.decode(out["chosen_labels"][10:]) == "<|assistant|>" + "y" * 13


TRUNCATION_ROWS = [
    chat_row("sort: " + "1" * 30, "1", "2"),    # prompt cut
    chat_row("sort: 1", "1", "2"),              # fits
    chat_row("sort: " + "2" * 30, "2", "3"),    # prompt cut
    chat_row("sort: 3", "3" * 30, "4"),         # response cut (prompt 10 <= 12)
    chat_row("sort: " + "5" * 30, "5" * 30, "6"),  # both cut
]


def test_prompt_and_response_truncation_counted_separately(chat_tokenizer, caplog):
    ds = data.normalise(datasets.Dataset.from_list(TRUNCATION_ROWS), "t")
    out, stats = tokens.tokenize_split(ds, chat_tokenizer, max_length=20, max_prompt_length=12)
    assert stats == tokens.TokenStats(pairs=5, kept=5, prompt_truncated=3, response_truncated=2)
    assert out.column_names == tokens.TOKENISED_COLUMNS
    assert [len(x) for x in out["prompt_input_ids"]] == [12, 10, 12, 10, 12]
    assert [len(x) for x in out["chosen_input_ids"]] == [15, 13, 15, 18, 20]
    with caplog.at_level(logging.WARNING, logger="simpo_ray.data.tokens"):
        tokens.tokenize_pairs(ds, chat_tokenizer, max_length=20, max_prompt_length=12, name="t")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["pairs longer than max_length=20 truncated: t 3 prompts (to their last 12 tokens) "
                        "and 2 responses (to 8 tokens) of 5 pairs"]


def _no_bos_tokenizer(chat_tokenizer):
    """The bundled vocabulary without a BOS token (as Qwen's tokenizers have none)."""
    return PreTrainedTokenizerFast(tokenizer_object=chat_tokenizer.backend_tokenizer, eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def test_pairs_without_a_labelled_response_token_are_dropped(chat_tokenizer):
    # No BOS and an empty prompt: the answer starts at position 0, whose label is never predicted
    # (labels are shifted); a one-token answer then has nothing to average (avg log-prob 0 before).
    tok = _no_bos_tokenizer(chat_tokenizer)
    ids = tok.convert_tokens_to_ids
    assert tokenize_row({"prompt": "", "chosen": "", "rejected": "no"}, tok, 64, 32) is None
    kept = tokenize_row({"prompt": "", "chosen": "ok", "rejected": "no"}, tok, 64, 32)
    assert kept["chosen_labels"] == ids(["o", "k", "</s>"])  # position 0 unpredicted, 2 tokens left
    ds = data.normalise(datasets.Dataset.from_list(
        [{"prompt": "", "chosen": "", "rejected": "no"}, {"prompt": "q", "chosen": "a", "rejected": "b"},
         {"prompt": "", "chosen": "yes", "rejected": ""}]), "t")
    out, stats = tokens.tokenize_split(ds, tok, 64, 32)
    assert (len(out), stats.pairs, stats.kept, stats.dropped) == (1, 3, 1, 2)
    assert out[0]["chosen_input_ids"] == ids(["q", "a", "</s>"])
    line = tokens.summary_line({"train data": stats}, 64, 32)
    assert line == "dropped (a response with no labelled token): train data 2 of 3 pairs"


def test_all_pairs_dropped_is_a_user_error(tmp_path, chat_tokenizer):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "", "chosen": "", "rejected": "x" * (i + 1)}
                                              for i in range(20)])
    with pytest.raises(UserError, match=r"train data: all 19 pairs were dropped: no response has a labelled "
                                        r"token within max_length=32"):
        prepare_datasets(cfg_for({str(src): 1.0}, max_length=32, max_prompt_length=16),
                         _no_bos_tokenizer(chat_tokenizer), cache_dir=tmp_path / "cache")


def test_truncation_counts_are_stored_with_the_cache_and_logged_every_run(tmp_path, chat_tokenizer, caplog):
    src = write_jsonl(tmp_path / "d.jsonl", TRUNCATION_ROWS * 8)  # 40 rows: 38 train, 2 eval
    cfg = cfg_for({str(src): 1.0}, max_length=20, max_prompt_length=12)
    lines = []
    for _ in range(2):  # built, then reused from the cache
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="simpo_ray.data.tokens"):
            prepared = prepare_datasets(cfg, chat_tokenizer, cache_dir=tmp_path / "cache")
        lines.append([r.getMessage() for r in caplog.records if r.levelno == logging.WARNING])
    assert lines[0] == lines[1] and len(lines[0]) == 1  # one line, on the cached run too
    line = lines[0][0]
    assert line == prepared.summary
    train = prepare.load_prepared(prepared.train_path)
    n_prompt = sum(len(p) == 12 for p in train["prompt_input_ids"])  # only cut prompts are that long
    n_resp = sum(len(c) - len(p) == 8 for p, c in zip(train["prompt_input_ids"], train["chosen_input_ids"]))
    assert (n_prompt, n_resp) != (0, 0)
    assert f"train data {n_prompt} prompts (to their last 12 tokens) and {n_resp} responses (to 8 tokens) " \
           f"of {prepared.num_train} pairs" in line
    meta = json.loads((tmp_path / "cache" / "data" / prepared.fingerprint / "meta.json").read_text())
    assert meta["stats"]["train"] == {"pairs": 38, "kept": 38, "prompt_truncated": n_prompt,
                                      "response_truncated": n_resp}
    assert line.startswith("2 of the 40 rows of d.jsonl held out for evaluation (eval_holdout_fraction 0.05")


def test_chat_template_error_is_a_user_error(chat_tokenizer):
    row = chat_row("hi", "a", "b")
    row["chosen"][0]["role"] = row["rejected"][0]["role"] = "tool"  # the bundled template raises on it
    with pytest.raises(UserError, match="chat template failed on the pair with prompt 'hi': unknown role: tool"):
        tokenize_row(row, chat_tokenizer, 64, 32)


def test_chat_data_needs_a_chat_template(bos_tokenizer):
    tok = PreTrainedTokenizerFast(tokenizer_object=bos_tokenizer.backend_tokenizer, bos_token="<s>",
                                  eos_token="</s>")
    ds = data.normalise(datasets.Dataset.from_list([chat_row("hello", "fine", "bad")]), "t")
    with pytest.raises(UserError, match="chat format.*no chat template.*set chat_template"):
        tokens.tokenize_pairs(ds, tok, 64, 32)


# --------------------------------------------------------------------------- loading


def cfg_for(mixer, **kw):
    return TrainConfig(dataset_mixer=mixer, **kw)


def test_local_jsonl_json_parquet_and_holdout(tmp_path):
    rows = string_rows(40)
    jl = write_jsonl(tmp_path / "d.jsonl", rows)
    js = tmp_path / "d.json"
    js.write_text(json.dumps(rows))
    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pqf)
    for path in (jl, js, pqf):
        train, eval_ = load_raw(cfg_for({str(path): 1.0}))
        assert (len(train), len(eval_)) == (38, 2)  # 5% of 40 held out
        assert train.column_names == ["prompt", "chosen", "rejected"]  # 'extra' dropped
        seen = sorted(list(train["prompt"]) + list(eval_["prompt"]))
        assert seen == sorted(r["prompt"] for r in rows)
    # Deterministic: the same eval rows every time, whatever the training seed.
    assert sorted(load_raw(cfg_for({str(jl): 1.0}, seed=7))[1]["prompt"]) == sorted(
        load_raw(cfg_for({str(jl): 1.0}, seed=8))[1]["prompt"])


def test_single_file_holdout_fraction_is_a_key_and_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", string_rows(40))
    notes = []
    train, eval_ = load_raw(cfg_for({str(path): 1.0}, eval_holdout_fraction=0.25), notes)
    assert (len(train), len(eval_)) == (30, 10)
    assert notes == ["10 of the 40 rows of d.jsonl held out for evaluation (eval_holdout_fraction 0.25; "
                     "a single file has no 'test_prefs' split)"]
    # Two rows: one is held out whatever the fraction, one is left to train on.
    two = write_jsonl(tmp_path / "two.jsonl", string_rows(2))
    assert [len(x) for x in load_raw(cfg_for({str(two): 1.0}, eval_holdout_fraction=0.5))] == [1, 1]


@pytest.mark.parametrize("layout", ["single", "shards", "split_prefix"])
def test_downloaded_hub_snapshot_is_a_local_dataset(tmp_path, layout):
    """The file layouts `datasets` resolves for a dataset repository, as `huggingface-cli
    download --repo-type dataset` leaves them: data/<split>-00000-of-00001.parquet, shards,
    <split>-xxxx files at the top."""
    rows = string_rows(30, "t")
    test_rows = string_rows(4, "e")
    (tmp_path / "data").mkdir()
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n")
    (tmp_path / ".gitattributes").write_text("*.parquet filter=lfs\n")
    if layout == "single":
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "train_prefs-00000-of-00001.parquet")
        pq.write_table(pa.Table.from_pylist(test_rows), tmp_path / "data" / "test_prefs-00000-of-00001.parquet")
    elif layout == "shards":
        pq.write_table(pa.Table.from_pylist(rows[:20]), tmp_path / "data" / "train_prefs-00000-of-00002.parquet")
        pq.write_table(pa.Table.from_pylist(rows[20:]), tmp_path / "data" / "train_prefs-00001-of-00002.parquet")
        pq.write_table(pa.Table.from_pylist(test_rows), tmp_path / "data" / "test_prefs-00000-of-00001.parquet")
    else:
        write_jsonl(tmp_path / "train_prefs-00000-of-00001.jsonl", rows)
        write_jsonl(tmp_path / "test_prefs-00000-of-00001.jsonl", test_rows)
    # Other splits of the repository are not read.
    pq.write_table(pa.Table.from_pylist(string_rows(3, "g")), tmp_path / "data" / "train_gen-00000-of-00001.parquet")
    train, eval_ = load_raw(cfg_for({str(tmp_path): 1.0}))
    assert sorted(train["prompt"]) == sorted(r["prompt"] for r in rows)
    assert sorted(eval_["prompt"]) == sorted(r["prompt"] for r in test_rows)
    with pytest.raises(UserError, match=r"unknown split 'test_sft' .*available: test_prefs, train_gen, train_prefs"):
        load_raw(cfg_for({str(tmp_path): 1.0}, dataset_splits=["train_prefs", "test_sft"]))


def test_mixer_fractions_and_sample_caps(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_jsonl(a / "train_prefs.jsonl", string_rows(20, "a"))
    write_jsonl(a / "test_prefs.jsonl", string_rows(4, "at"))
    write_jsonl(b / "train_prefs.jsonl", string_rows(30, "b"))
    write_jsonl(b / "test_prefs.jsonl", string_rows(6, "bt"))
    train, eval_ = load_raw(cfg_for({str(a): 0.5, str(b): 0.7}))
    assert sum(p.startswith("q a") for p in train["prompt"]) == 10  # int(0.5 * 20)
    assert sum(p.startswith("q b") for p in train["prompt"]) == 21  # int(0.7 * 30)
    assert len(eval_) == 10  # eval splits whole
    train, eval_ = load_raw(cfg_for({str(a): 0.5, str(b): 0.7}, max_train_samples=5, max_eval_samples=3))
    assert (len(train), len(eval_)) == (5, 3)
    # Seeded: the same subsample twice, a different one for another seed.
    again = load_raw(cfg_for({str(a): 0.5, str(b): 0.7}))[0]["prompt"]
    assert again == load_raw(cfg_for({str(a): 0.5, str(b): 0.7}))[0]["prompt"]
    assert again != load_raw(cfg_for({str(a): 0.5, str(b): 0.7}, seed=1))[0]["prompt"]


def test_chat_without_prompt_column_takes_prompt_from_chosen(tmp_path, chat_tokenizer):
    rows = [{k: v for k, v in chat_row(f"sort: {i}{i + 1}", "x", "y").items() if k != "prompt"} for i in range(20)]
    multi = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "sort: 21"}]
    rows[0] = {"chosen": multi + [{"role": "assistant", "content": "12"}],
               "rejected": multi + [{"role": "assistant", "content": "21"}]}
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows))
    ds = data.normalise(data._read_file(str(path), path), str(path))
    assert ds[0]["prompt"] == "sort: 21"  # the last user turn
    assert ds[1]["prompt"] == "sort: 12"
    out = tokenize_row(ds[0], chat_tokenizer, 128, 64)
    ids = chat_tokenizer.convert_tokens_to_ids
    # It has a system turn: none is inserted.
    assert out["prompt_input_ids"] == ids(["<s>", "<|system|>", *"be brief", "<|user|>", *"hi", "<|assistant|>",
                                           *"hello", "</s>", "<|user|>", *"sort: 21"])
    assert out["chosen_input_ids"][len(out["prompt_input_ids"]):] == ids(["<|assistant|>", "1", "2", "</s>"])


def test_ultrafeedback_binarized_schema(tmp_path):
    """The columns of HuggingFaceH4/ultrafeedback_binarized, as a local directory of splits."""
    def uf(i):
        row = chat_row(f"what is {i}?", f"it is {i}", f"no idea {i}")
        return {"prompt": row["prompt"], "prompt_id": f"id{i}", "chosen": row["chosen"],
                "rejected": row["rejected"], "messages": row["chosen"], "score_chosen": 8.0,
                "score_rejected": 3.5}
    for split, n in (("train_prefs", 12), ("test_prefs", 3)):
        pq.write_table(pa.Table.from_pylist([uf(i) for i in range(n)]), tmp_path / f"{split}.parquet")
    train, eval_ = load_raw(cfg_for({str(tmp_path): 1.0}))
    assert (len(train), len(eval_)) == (12, 3)
    assert train.column_names == ["prompt", "chosen", "rejected"]
    assert sorted(eval_["prompt"]) == ["what is 0?", "what is 1?", "what is 2?"]


def test_prompt_messages_plus_assistant_only_answers(chat_tokenizer):
    # TRL's conversational format: prompt is a message list, chosen/rejected the answer alone.
    rows = [{"prompt": [{"role": "user", "content": "sort: 31"}],
             "chosen": [{"role": "assistant", "content": "13"}],
             "rejected": [{"role": "assistant", "content": "31"}]}]
    ds = data.normalise(datasets.Dataset.from_list(rows), "trl")
    assert ds[0] == chat_row("sort: 31", "13", "31")


def test_bundled_sort_loads_with_fraction():
    train, eval_ = load_raw(cfg_for({"bundled:sort": 0.25}, max_eval_samples=100))
    assert (len(train), len(eval_)) == (1000, 100)
    row = train[0]
    assert row["chosen"][0] == {"role": "user", "content": row["prompt"]}
    assert row["chosen"][-1]["role"] == "assistant"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", ["missing", "empty", "malformed", "split", "identical", "nopath",
                                  "bundled_split", "not_messages", "zero_fraction", "mixed"])
def test_bad_input_names_dataset_and_problem(tmp_path, case):
    path = tmp_path / "d.jsonl"
    mixer = {str(path): 1.0}
    splits = ["train_prefs", "test_prefs"]
    if case == "missing":
        write_jsonl(path, [{"prompt": "a", "chosen": "b", "other": 1}] * 3)
        match = r"d\.jsonl'.*missing column\(s\) 'rejected'; it has 'prompt', 'chosen', 'other'"
    elif case == "empty":
        d = tmp_path / "dir"
        d.mkdir()
        write_jsonl(d / "train_prefs.jsonl", string_rows(3))
        pq.write_table(pa.table({c: pa.array([], pa.string()) for c in ("prompt", "chosen", "rejected")}),
                       d / "test_prefs.parquet")
        mixer, match = {str(d): 1.0}, r"dir'.*test_prefs\.parquet has no rows"
    elif case == "malformed":
        path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n')
        match = r"d\.jsonl'.*cannot read d\.jsonl: .*JSON"
    elif case == "split":
        d = tmp_path / "dir"
        d.mkdir()
        write_jsonl(d / "train.jsonl", string_rows(3))
        mixer, match = {str(d): 1.0}, r"dir'.*unknown split 'train_prefs'.*available: train"
    elif case == "identical":
        rows = string_rows(5)
        rows[3]["rejected"] = rows[3]["chosen"]
        write_jsonl(path, rows)
        match = r"d\.jsonl'.*row 3 \(0-based\): chosen and rejected are identical"
    elif case == "nopath":
        mixer, match = {"./nowhere/data.jsonl": 1.0}, r"'\./nowhere/data\.jsonl': no such file"
    elif case == "bundled_split":
        mixer, splits = {"bundled:sort": 1.0}, ["train", "test"]
        match = r"'bundled:sort': unknown split 'train'; available: train_prefs, test_prefs"
    elif case == "not_messages":
        write_jsonl(path, [chat_row("a", "b", "c"), {"prompt": "a", "chosen": [{"role": "user", "content": "a"}],
                                                     "rejected": [{"role": "assistant", "content": "c"}]}])
        match = r"d\.jsonl'.*row 1 \(0-based\): the last 'chosen' message must be the assistant's"
    elif case == "zero_fraction":
        write_jsonl(path, string_rows(20))
        mixer, match = {str(path): 0.01}, r"d\.jsonl': fraction 0\.01 of its 19 train rows leaves no rows"
    elif case == "mixed":
        write_jsonl(path, string_rows(20))
        mixer = {str(path): 1.0, "bundled:sort": 1.0}
        match = r"mixes chat-format datasets \(bundled:sort\) with plain-string datasets \(.*d\.jsonl\)"
    with pytest.raises(UserError, match=match):
        load_raw(TrainConfig(dataset_mixer=mixer, dataset_splits=splits))


def test_unreachable_hub_says_so_plainly(monkeypatch):
    # conftest sets HF_HUB_OFFLINE; force it here too in case datasets was imported earlier.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as e:
        load_raw(cfg_for({"nobody-xyz/no-such-dataset": 1.0}))
    msg = str(e.value)
    assert msg.startswith("cannot load dataset 'nobody-xyz/no-such-dataset' from the Hugging Face Hub: ")
    assert msg.endswith("for offline use pass a local .jsonl/.parquet file or bundled:sort")


def go_online(monkeypatch, endpoint: str, timeout: float = hub.HUB_TIMEOUT_S) -> None:
    """Offline mode off (conftest turns it on) and the Hub at ``endpoint``: nothing here reaches
    the real Hub, whatever network the machine has."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(hub, "HUB_TIMEOUT_S", timeout)
    monkeypatch.setattr(hub, "_REACHABLE", {})


@pytest.fixture
def silent_server():
    """A local port that accepts connections and never answers (a firewall that drops replies)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_hub_that_does_not_answer_fails_fast_with_the_way_out(monkeypatch, silent_server):
    go_online(monkeypatch, silent_server, timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        load_raw(cfg_for({"HuggingFaceH4/ultrafeedback_binarized": 1.0}))
    assert time.monotonic() - t0 < 5  # datasets alone retries for about a minute
    assert str(e.value) == (
        f"cannot load dataset 'HuggingFaceH4/ultrafeedback_binarized' from the Hugging Face Hub: {silent_server} "
        "did not answer within 0.5 s; use a local path, or set HF_HUB_OFFLINE=1 to load it from the local "
        "Hugging Face cache")


def test_check_sources_says_where_each_source_comes_from(monkeypatch, tmp_path):
    local = write_jsonl(tmp_path / "d.jsonl", string_rows(3))
    snapshot = tmp_path / "snapshot"
    (snapshot / "data").mkdir(parents=True)
    for split in ("train_prefs", "test_prefs"):
        pq.write_table(pa.Table.from_pylist(string_rows(3)), snapshot / "data" / f"{split}-00000-of-00001.parquet")
    cfg = cfg_for({str(local): 0.5, "bundled:sort": 0.5, "org/prefs": 1.0, "./missing.jsonl": 1.0,
                   str(snapshot): 1.0},
                  model_name_or_path="org/model", tokenizer_name_or_path=str(tmp_path))
    assert data.check_sources(cfg) == [
        "model org/model: not in the local Hugging Face cache, and the Hub is not used (HF_HUB_OFFLINE)",
        f"tokenizer {tmp_path}: local directory exists",
        f"dataset {local}: local file exists",
        "dataset bundled:sort: bundled",
        "dataset org/prefs: Hub not checked (HF_HUB_OFFLINE: the local Hugging Face cache only)",
        "dataset ./missing.jsonl: local path does not exist",
        f"dataset {snapshot}: local directory exists (splits train_prefs, test_prefs found)",
    ]
    other = cfg_for({str(snapshot): 1.0}, model_name_or_path=str(snapshot), dataset_splits=["train", "test"])
    assert data.check_sources(other) == [
        f"model {snapshot}: local directory exists, but has no config.json",
        f"dataset {snapshot}: local directory exists, but split(s) train, test not found in it; "
        "available: test_prefs, train_prefs",
    ]
    # Online, with nothing listening at the endpoint (connection refused): asked once, quickly.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    go_online(monkeypatch, f"http://127.0.0.1:{port}")
    lines = data.check_sources(cfg.replace(tokenizer_name_or_path=None))
    assert lines[0] == (f"model org/model: Hub not reachable (http://127.0.0.1:{port} did not answer within 5 s): "
                        "use a local path or HF_HUB_OFFLINE=1")
    assert lines[3].startswith("dataset org/prefs: Hub not reachable")
    assert list(hub._REACHABLE) == [f"http://127.0.0.1:{port}"]
    # A server that answers (any HTTP status) is reachable.
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.handle_request, daemon=True).start()
    go_online(monkeypatch, f"http://127.0.0.1:{server.server_port}")
    assert data.check_sources(cfg_for({"org/prefs": 1.0}, model_name_or_path="bundled:tiny")) == [
        "model bundled:tiny: bundled (built on first use)",
        f"dataset org/prefs: Hub reachable (http://127.0.0.1:{server.server_port})",
    ]
    server.server_close()


# --------------------------------------------------------------------------- cache


def test_prepare_caches_by_data_fingerprint(tmp_path, chat_tokenizer, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", [chat_row(f"sort: {i}", "1", "2") for i in range(40)])
    calls = []
    real = tokens.tokenize_split
    monkeypatch.setattr(tokens, "tokenize_split", lambda *a, **k: calls.append(k["name"]) or real(*a, **k))
    cfg = cfg_for({str(src): 1.0}, max_length=32, max_prompt_length=16)
    first = prepare_datasets(cfg, chat_tokenizer, cache_dir=tmp_path / "cache")
    assert calls == ["train data", "eval data"]
    assert (first.num_train, first.num_eval) == (38, 2)
    assert first.train_path == str(tmp_path / "cache" / "data" / first.fingerprint / "train")
    # Another trial of the search: other learning rate and beta, same data.
    second = prepare_datasets(cfg.replace(learning_rate=1e-3, beta=10.0), chat_tokenizer,
                              cache_dir=tmp_path / "cache")
    assert second == first and len(calls) == 2
    train = prepare.load_prepared(first.train_path)
    assert train.column_names == tokens.TOKENISED_COLUMNS and len(train) == 38
    expected = tokenize_row(load_raw(cfg)[0][0], chat_tokenizer, 32, 16)
    assert {k: train[0][k] for k in expected} == expected
    # Data-relevant changes give another fingerprint.
    fp = prepare.data_fingerprint
    assert fp(cfg.replace(max_length=64), chat_tokenizer) != first.fingerprint
    assert fp(cfg.replace(seed=1), chat_tokenizer) != first.fingerprint
    assert fp(cfg.replace(eval_holdout_fraction=0.1), chat_tokenizer) != first.fingerprint
    assert fp(cfg.replace(mask_generation_prompt=True), chat_tokenizer) != first.fingerprint
    assert fp(cfg.replace(auto_insert_empty_system_msg=False), chat_tokenizer) != first.fingerprint
    src.write_text(src.read_text() + json.dumps(chat_row("sort: 99", "9", "8")) + "\n")  # edited file
    assert fp(cfg, chat_tokenizer) != first.fingerprint


def test_prepare_is_built_once_under_concurrency(tmp_path, chat_tokenizer, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", string_rows(30))
    calls = []
    real = tokens.tokenize_split
    monkeypatch.setattr(tokens, "tokenize_split", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = cfg_for({str(src): 1.0}, max_length=32, max_prompt_length=16)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        prepare_datasets(cfg, chat_tokenizer, cache_dir=tmp_path / "c"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert len(calls) == 2  # train + eval, by one builder
    assert [p.name for p in (tmp_path / "c" / "data").iterdir() if not p.name.endswith(".lock")] == [
        results[0].fingerprint]  # no temp dirs left behind


# --------------------------------------------------------------------------- collation


def test_pair_collator_pads_by_hand():
    rows = [
        {"prompt_input_ids": [5, 6], "chosen_input_ids": [5, 6, 7], "chosen_labels": [-100, -100, 7],
         "rejected_input_ids": [5, 6, 8, 9, 1], "rejected_labels": [-100, -100, 8, 9, 1]},
        {"prompt_input_ids": [4], "chosen_input_ids": [4, 2, 3, 1], "chosen_labels": [-100, 2, 3, 1],
         "rejected_input_ids": [4, 1], "rejected_labels": [-100, 1]},
    ]
    b = PairCollator(pad_token_id=0)(rows)
    assert set(b) == {"chosen_input_ids", "chosen_attention_mask", "chosen_labels", "rejected_input_ids",
                      "rejected_attention_mask", "rejected_labels", "prompt_input_ids", "prompt_attention_mask"}
    assert b["chosen_input_ids"].tolist() == [[5, 6, 7, 0], [4, 2, 3, 1]]
    assert b["chosen_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert b["chosen_labels"].tolist() == [[-100, -100, 7, -100], [-100, 2, 3, 1]]
    assert b["rejected_input_ids"].tolist() == [[5, 6, 8, 9, 1], [4, 1, 0, 0, 0]]
    assert b["rejected_attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b["rejected_labels"].tolist() == [[-100, -100, 8, 9, 1], [-100, 1, -100, -100, -100]]
    assert b["prompt_input_ids"].tolist() == [[5, 6], [0, 4]]  # left-padded for generate
    assert b["prompt_attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert all(v.dtype == torch.long for v in b.values())


def test_a_data_file_that_is_not_utf8_says_so(tmp_path):
    """A Latin-1 byte in a JSON-lines file: the json reader's own error was 'Missing a colon ...'."""
    src = write_jsonl(tmp_path / "d.jsonl", string_rows(10))
    raw = src.read_bytes().replace(b"good", "g\xf6od".encode("latin-1"), 1)
    src.write_bytes(raw)
    with pytest.raises(UserError, match=r"d\.jsonl is not UTF-8 text \(byte 0xf6 on line 1, offset \d+\); save it as UTF-8"):
        load_raw(cfg_for({str(src): 1.0}))


def test_the_bundled_datasets_by_name():
    """`bundled:sort-verbose` loads its length-biased rows; an unknown bundled name is one error
    naming the datasets there are."""
    from simpo_ray.bundled import task
    from simpo_ray.config import TrainConfig
    from simpo_ray.data.sources import load_raw
    from simpo_ray.errors import UserError

    train, test = load_raw(TrainConfig(dataset_mixer={"bundled:sort-verbose": 1.0}))
    assert (len(train), len(test)) == (4000, 512)
    tails = [r["chosen"][1]["content"] for r in train if r["chosen"][1]["content"].endswith(task.FILLER)]
    assert 0.5 < len(tails) / len(train) < 0.62
    with pytest.raises(UserError, match=r"unknown bundled dataset; the bundled datasets are 'bundled:sort', "
                                        r"'bundled:sort-verbose'"):
        load_raw(TrainConfig(dataset_mixer={"bundled:sorts": 1.0}))
