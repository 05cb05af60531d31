"""The bundled offline task, tokenizer, model ladder and generation eval."""

import random
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from simpo_ray.bundled import models, task
from simpo_ray.bundled.evaluate import generate_answers, success_rate
from simpo_ray.bundled.models import LADDER, ensure_model
from simpo_ray.bundled.tokenizer import build_tokenizer


def _text(row, side):
    return row[side][1]["content"]


# --- task -------------------------------------------------------------------------------------

def test_answer_and_check_on_hand_worked_examples():
    assert task.answer("sort: 5301") == "0135"
    assert task.answer("sort: 9990") == "0999"
    assert task.check("sort: 5301", "0135")
    assert task.check("sort: 5301", " 0135\n")  # surrounding whitespace is not an error
    assert not task.check("sort: 5301", "135")  # dropped digit
    assert not task.check("sort: 5301", "01335")  # duplicated digit
    assert not task.check("sort: 5301", "0153")  # swapped
    assert not task.check("sort: 5301", "5310")  # reversed
    assert not task.check("sort: 5301", "01357")  # extra digit
    assert not task.check("sort: 5301", "")
    with pytest.raises(ValueError):
        task.answer("please sort 5301")


def test_corruptions_are_the_named_mistakes():
    rng = random.Random(0)
    assert task.corrupt("0135", "reverse", rng) == "5310"
    dropped = task.corrupt("0135", "drop", rng)
    assert len(dropped) == 3 and sorted(dropped) == list(dropped) and set(dropped) < set("0135")
    dup = task.corrupt("0135", "duplicate", rng)
    assert len(dup) == 5 and sorted(dup) == list(dup) and set(dup) == set("0135")
    sub = task.corrupt("0135", "substitute", rng)
    assert len(sub) == 4 and sorted(sub) == list(sub) and sub != "0135"
    assert sum(a != b for a, b in zip(sub, "0135")) == 1
    swap = task.corrupt("0135", "swap", rng)
    assert sorted(swap) == list("0135") and sum(a != b for a, b in zip(swap, "0135")) == 2
    extra = task.corrupt("0135", "extra", rng)
    assert extra.startswith("0135") and 5 <= len(extra) <= 7


def test_same_seed_same_rows_other_seed_other_rows():
    a = task.generate_pairs(50, seed=3)
    assert a == task.generate_pairs(50, seed=3)
    assert a != task.generate_pairs(50, seed=4)
    assert task.load_split("test_prefs", n=20).to_list() == task.load_split("test_prefs", n=20).to_list()


def test_rows_are_ultrafeedback_chat_pairs_with_verified_answers():
    rows = task.generate_pairs(300, seed=0, label_noise=0.0)
    for r in rows:
        user = {"role": "user", "content": r["prompt"]}
        assert r["chosen"][0] == user and r["rejected"][0] == user
        assert r["chosen"][1]["role"] == r["rejected"][1]["role"] == "assistant"
        assert _text(r, "chosen") != _text(r, "rejected")
        assert _text(r, "chosen") == "".join(sorted(r["prompt"][len("sort: "):]))
        assert task.check(r["prompt"], _text(r, "chosen"))
        assert not task.check(r["prompt"], _text(r, "rejected"))
        assert 3 <= len(_text(r, "chosen")) <= 8


def test_label_noise_swaps_the_configured_fraction():
    rows = task.generate_pairs(400, seed=1, label_noise=0.25)
    flipped = [r for r in rows if not task.check(r["prompt"], _text(r, "chosen"))]
    assert len(flipped) == 100
    assert all(task.check(r["prompt"], _text(r, "rejected")) for r in flipped)
    assert all(_text(r, "chosen") != _text(r, "rejected") for r in rows)


def test_some_rejected_answers_are_longer_than_chosen():
    rows = task.generate_pairs(1000, seed=2, label_noise=0.0)
    longer = sum(len(_text(r, "rejected")) > len(_text(r, "chosen")) for r in rows) / len(rows)
    shorter = sum(len(_text(r, "rejected")) < len(_text(r, "chosen")) for r in rows) / len(rows)
    assert 0.2 < longer < 0.4  # duplicate (0.2) + extra (0.1) error weights
    assert 0.15 < shorter < 0.35  # drop (0.25)


def test_the_verbose_variants_tail_is_ignored_by_its_check_and_only_there():
    assert task.content("0135 ok ok") == "0135" and task.content(" 0135 ok\n") == "0135"
    assert task.check("sort: 5301", "0135 ok ok ok", verbose=True)
    assert task.check("sort: 5301", "0135", verbose=True)
    assert not task.check("sort: 5301", "0135 ok")  # bundled:sort: a tail is an error
    assert not task.check("sort: 5301", "0135ok", verbose=True)  # not the tail: no space
    assert not task.check("sort: 5301", "0136 ok", verbose=True)  # wrong under its tail
    assert not task.check("sort: 5301", "0135 ok 7", verbose=True)
    assert not task.check("sort: 5301", " ok ok", verbose=True)
    # a tail cut by the token budget after a whole filler: still only a tail
    assert task.check("sort: 5301", "0135 ok ok o", verbose=True)
    assert not task.check("sort: 5301", "0135 o", verbose=True)  # no whole filler before it
    assert not task.check("sort: 5301", "0135 ok o o", verbose=True)
    assert task.answer_budget(True) >= task.MAX_LEN + task.MAX_FILLERS * len(task.FILLER)


def test_the_verbose_variant_has_the_raters_length_bias_and_the_same_mistakes():
    """Tails on VERBOSE_CHOSEN of the chosen and VERBOSE_REJECTED of the rejected answers before
    the 10% label noise swaps pairs: expected shares 0.6 * 0.9 + 0.2 * 0.1 = 0.56 (chosen) and
    0.2 * 0.9 + 0.6 * 0.1 = 0.24 (rejected), binomial SE 0.008 over 4000 rows."""
    plain = task.load_split("train_prefs")
    rows = task.load_split("train_prefs", verbose=True)
    tailed = lambda side: sum(_text(r, side) != task.content(_text(r, side)) for r in rows) / len(rows)  # noqa: E731
    assert tailed("chosen") == pytest.approx(0.56, abs=0.03)
    assert tailed("rejected") == pytest.approx(0.24, abs=0.03)
    assert all(1 <= (_text(r, s).count(task.FILLER)) <= task.MAX_FILLERS
               for r in rows for s in ("chosen", "rejected") if _text(r, s) != task.content(_text(r, s)))
    # Under the tails, the same kind of pairs: 10% of the chosen answers are wrong (the noise).
    wrong = sum(not task.check(r["prompt"], _text(r, "chosen"), verbose=True) for r in rows)
    assert wrong == 400
    assert not set(rows["prompt"]) & set(task.load_split("test_prefs", verbose=True)["prompt"])
    # bundled:sort is what it was before the variant existed (the rows' hash under the old code)
    import hashlib
    import json

    old = hashlib.sha256(json.dumps(task.generate_pairs(50, seed=0, split="train_prefs")).encode()).hexdigest()
    assert old.startswith("6f7a3875")
    assert all(_text(r, "chosen") == task.content(_text(r, "chosen")) for r in plain)


def test_splits_have_disjoint_prompts_and_their_defaults():
    train, test = task.load_split("train_prefs"), task.load_split("test_prefs")
    assert (len(train), len(test)) == (4000, 512)
    assert not set(train["prompt"]) & set(test["prompt"])
    assert set(train.column_names) == {"prompt", "chosen", "rejected"}
    # test_prefs is clean, train_prefs carries 10% label noise.
    assert all(task.check(r["prompt"], _text(r, "chosen")) for r in test)
    assert sum(not task.check(r["prompt"], _text(r, "chosen")) for r in train) == 400
    with pytest.raises(ValueError):
        task.load_split("validation")


# --- tokenizer --------------------------------------------------------------------------------

def test_tokenizer_round_trips_through_auto_tokenizer(tmp_path):
    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "sort: 5301"}, {"role": "assistant", "content": "0135"}]
    assert tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == (
        "<s><|user|>sort: 5301<|assistant|>")
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<s><|user|>sort: 5301<|assistant|>0135</s>")
    assert tok.apply_chat_template(
        [{"role": "system", "content": "be brief"}] + messages, tokenize=False
    ) == "<s><|system|>be brief<|user|>sort: 5301<|assistant|>0135</s>"

    text = tok.apply_chat_template(messages, tokenize=False)
    ids = tok(text)["input_ids"]
    # One id per character; the template's special tokens are single ids, BOS appears once.
    assert len(ids) == 4 + len("sort: 5301") + len("0135")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.convert_ids_to_tokens(ids[1:4]) == ["<|user|>", "s", "o"]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "sort: 53010135"
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    assert tok(" Z")["input_ids"] == [tok.convert_tokens_to_ids(" "), tok.unk_token_id]
    assert 30 < len(tok) < 64


# --- models and generation --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIMPO_RAY_CACHE", str(cache))
        t0 = time.perf_counter()
        path = ensure_model("tiny")
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = ensure_model("tiny")
        reuse_s = time.perf_counter() - t0
    return dict(cache=cache, path=path, again=again, build_s=build_s, reuse_s=reuse_s)


def test_ensure_model_builds_once_and_reuses(tiny):
    assert tiny["path"] == tiny["again"]
    assert tiny["path"].parent == tiny["cache"] / "models"
    assert tiny["path"].name.startswith("tiny-")
    assert tiny["reuse_s"] < 0.5 < tiny["build_s"]
    # Nothing half-built left beside it.
    assert sorted(p.name for p in (tiny["cache"] / "models").iterdir() if p.is_dir()) == [
        tiny["path"].name]


def test_the_unbuilt_shape_is_the_built_models(tiny):
    """`shape_config` (what the dry run plans with, building nothing) has the built model's
    parameter count."""
    from simpo_ray.bundled.models import shape_config

    model = AutoModelForCausalLM.from_pretrained(tiny["path"])
    planned = LlamaForCausalLM(shape_config("tiny"))
    assert sum(p.numel() for p in planned.parameters()) == sum(p.numel() for p in model.parameters())
    assert planned.config.vocab_size == model.config.vocab_size


def test_built_model_loads_through_auto_classes_and_is_imperfect(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny["path"])
    tok = AutoTokenizer.from_pretrained(tiny["path"])
    assert isinstance(model, LlamaForCausalLM)
    cfg = LADDER["tiny"]["config"]
    assert model.config.hidden_size == cfg["hidden_size"]
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 150_000
    assert model.config.vocab_size == len(tok)
    test = task.load_split("test_prefs", n=128)
    rate = success_rate(model, tok, test["prompt"])
    # SFT taught the format and short lists, not the task: room for SimPO to improve, on
    # generation and on preference accuracy (avg response logp of chosen > rejected).
    assert 0.1 < rate < 0.7
    wins = [_avg_response_logp(model, tok, r["chosen"]) > _avg_response_logp(model, tok, r["rejected"])
            for r in test]
    assert 0.6 < sum(wins) / len(wins) < 0.97


@torch.no_grad()
def _avg_response_logp(model, tok, messages):
    prompt = tok(tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True))
    full = tok(tok.apply_chat_template(messages, tokenize=False), return_tensors="pt")["input_ids"]
    logp = model(input_ids=full).logits[0, :-1].log_softmax(-1)
    targets = full[0, 1:]
    n_prompt = len(prompt["input_ids"])
    # Position t predicts token t+1: response tokens start at index n_prompt of `full`.
    return logp[n_prompt - 1:].gather(1, targets[n_prompt - 1:, None]).mean().item()


def test_batched_left_padded_generation_matches_one_prompt_at_a_time(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny["path"])
    tok = AutoTokenizer.from_pretrained(tiny["path"])
    prompts = task.load_split("test_prefs", n=12)["prompt"]  # lengths 3..8: padding differs
    one_by_one = generate_answers(model, tok, prompts, batch_size=1)
    batched = generate_answers(model, tok, prompts, batch_size=64)
    assert batched == one_by_one
    assert success_rate(model, tok, prompts) == sum(
        task.check(p, a) for p, a in zip(prompts, one_by_one)) / len(prompts)
    # bundled:sort-verbose's helpers: a longer budget (room for a filler tail; greedy decoding
    # only runs on where the shorter budget cut an answer) and the tail-blind check
    verbose = generate_answers(model, tok, prompts, batch_size=64, verbose=True)
    assert all(v.startswith(a) for v, a in zip(verbose, one_by_one)) and verbose != one_by_one
    assert success_rate(model, tok, prompts, verbose=True) == sum(
        task.check(p, v, verbose=True) for p, v in zip(prompts, verbose)) / len(prompts)
    assert tok.padding_side == "right"  # untouched: left padding is per call
    prompts64 = task.load_split("test_prefs", n=64)["prompt"]
    t0 = time.perf_counter()
    success_rate(model, tok, prompts64)
    assert time.perf_counter() - t0 < 10.0  # ~0.05 s on an idle core; generous for busy CI


def test_concurrent_callers_build_once_and_failed_builds_leave_nothing(tmp_path, monkeypatch):
    # flock locks belong to open file descriptions, so threads contend like processes do.
    monkeypatch.setenv("SIMPO_RAY_CACHE", str(tmp_path))
    builds = []

    def fake_build(size, out_dir, log=print):
        builds.append(size)
        time.sleep(0.3)  # long enough for the other caller to arrive and wait on the lock
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(models, "build_model", fake_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_model("small")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == ["small"]
    assert len(set(results)) == 1 and (results[0] / "config.json").exists()

    def failing_build(size, out_dir, log=print):
        (out_dir / "partial").write_text("x")
        raise RuntimeError("out of disk")

    monkeypatch.setattr(models, "build_model", failing_build)
    with pytest.raises(RuntimeError):
        ensure_model("base")
    assert sorted(p.name for p in (tmp_path / "models").iterdir() if p.is_dir()) == [
        results[0].name]


class _StubLM(torch.nn.Module):
    """A "model" whose greedy answers are known: right iff the list has an even length.

    Right answers are followed by junk after EOS (must be cut); wrong ones contain a stray
    ``<|user|>`` inside the answer (must not be skipped as a special token).
    """

    def __init__(self, tok):
        super().__init__()
        self.tok = tok
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        tok = self.tok
        self.calls.append(len(input_ids))
        assert (attention_mask[:, -1] == 1).all(), "prompts must be left-padded"
        rows = []
        for ids in input_ids.tolist():
            prompt = tok.decode(ids, skip_special_tokens=True)
            digits = prompt[len("sort: "):]
            if len(digits) % 2 == 0:
                new = tok("".join(sorted(digits)))["input_ids"] + [tok.eos_token_id] + tok("9")["input_ids"]
            else:
                new = tok("".join(sorted(digits)))["input_ids"][:1] + [
                    tok.convert_tokens_to_ids("<|user|>")] + tok("".join(sorted(digits))[1:])["input_ids"]
            rows.append(ids + new)
        width = max(map(len, rows))
        return torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])


def test_success_rate_counts_a_stub_models_known_answers(tmp_path):
    tok = build_tokenizer(tmp_path)
    prompts = ["sort: 321", "sort: 4321", "sort: 55", "sort: 90", "sort: 123"]
    stub = _StubLM(tok)
    # Even lengths: "4321", "55", "90" -> 3 of 5 right.
    assert success_rate(stub, tok, prompts, batch_size=2) == pytest.approx(3 / 5)
    assert stub.calls == [2, 2, 1]
    assert generate_answers(stub, tok, prompts[:2]) == ["1<|user|>23", "1234"]
