"""Generation quality: the reward scorer, win rates, the length-controlled fit, the split of the
prompts across workers, and the bundled reward model."""

import json
import math
import os

import numpy as np
import pytest
import torch

from simpo_ray.train import generation
from simpo_ray.train.reward import RewardScorer, lc_win_rate, win_metrics, wins

# A chat template whose rendering ends with the answer's last character: the planted model's
# pooled token is that character.
PLAIN_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>' + m['content'] }}"
                  "{% else %}{{ '<|assistant|>' + m['content'] }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A Llama sequence classifier that scores +1 when the answer ends in "9", else -1: its
    attention and MLP outputs are zero, so the last hidden state is the last token's embedding
    (normalised), which is all-ones for "9" and all minus-ones otherwise; the head averages it.
    Its config's pad id is the id of "9", so naive padding would pool the wrong token."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from simpo_ray.bundled.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("planted")
    tok = build_tokenizer(path)
    tok.chat_template = PLAIN_TEMPLATE
    tok.save_pretrained(path)
    nine = tok.convert_tokens_to_ids("9")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      num_labels=1, pad_token_id=nine, tie_word_embeddings=False)
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.fill_(-1.0)
        emb[nine] = 1.0
        model.score.weight.fill_(1.0 / 8)
    model.save_pretrained(path)
    return path


def test_planted_reward_model_gives_the_hand_computed_win_rate(planted):
    scorer = RewardScorer(str(planted), batch_size=3)
    user = [{"role": "user", "content": "sort: 931"}]
    # (policy answer, baseline answer, the win by hand: ends in 9 beats not; equal ends tie)
    cases = [("139", "13", 1.0), ("1", "19", 0.0), ("39", "1239", 0.5), ("13", "13", 0.5),
             ("12345679", "1", 1.0), ("3", "31", 0.5)]
    policy = scorer.score([user] * len(cases), [c[0] for c in cases])
    baseline = scorer.score([user] * len(cases), [c[1] for c in cases])
    assert policy == pytest.approx([1, -1, 1, -1, 1, -1], abs=1e-5)
    assert baseline == pytest.approx([-1, 1, 1, -1, -1, -1], abs=1e-5)
    expected = [c[2] for c in cases]
    same = [p == b for p, b, _ in cases]
    m = win_metrics(policy, baseline, [len(c[0]) for c in cases], [len(c[1]) for c in cases],
                    [1] * 6, [1] * 6, same_text=same)
    assert m["eval/reward_win_rate"] == pytest.approx(sum(expected) / len(expected))
    assert m["eval/reward_mean"] == pytest.approx(0.0, abs=1e-5)


def test_identical_answers_tie_even_when_batching_moves_the_score():
    w = wins([1.0000001, 0.3, 0.2], [1.0, 0.3, 0.5], same_text=[True, False, False])
    assert list(w) == [0.5, 0.5, 0.0]


def test_lc_fit_equals_an_independent_logistic_regression():
    """sklearn, soft labels as AlpacaEval feeds them (each row twice, weighted w and 1 - w), an
    L2 penalty on both coefficients: C = 1 / (l2 * n)."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    n = 400
    d = rng.normal(20, 60, n)
    w = np.where(rng.random(n) < 1 / (1 + np.exp(-(0.3 + 0.8 * np.tanh(d / d.std())))), 1.0, 0.0)
    w[:40] = 0.5  # ties
    fit = lc_win_rate(w, d, np.zeros(n), l2=0.01)
    x = np.tanh(d / d.std(ddof=1))  # pandas' std, as AlpacaEval
    X = np.concatenate([np.stack([np.ones(n), x], 1)] * 2)
    y = np.concatenate([np.ones(n), np.zeros(n)])
    sk = LogisticRegression(C=1 / (0.01 * n), fit_intercept=False, tol=1e-12, max_iter=10000)
    sk.fit(X, y, sample_weight=np.concatenate([w, 1 - w]))
    assert [fit.intercept, fit.length_coef] == pytest.approx(list(sk.coef_[0]), abs=1e-5)
    assert fit.win_rate_lc == pytest.approx(1 / (1 + np.exp(-sk.coef_[0][0])), abs=1e-6)


def test_lc_is_one_half_when_length_explains_every_win_and_the_raw_rate_when_none():
    rng = np.random.default_rng(1)
    n = 4000
    d = rng.normal(80, 60, n)  # the policy is mostly longer ...
    by_length = (rng.random(n) < 1 / (1 + np.exp(-3 * np.tanh(d / d.std())))).astype(float)  # ... and wins by it
    assert by_length.mean() > 0.75
    assert lc_win_rate(by_length, d, np.zeros(n)).win_rate_lc == pytest.approx(0.5, abs=0.04)
    # No length effect (lengths spread around the baseline's, so zero difference is inside the data).
    no_effect = (rng.random(n) < 0.7).astype(float)
    spread = rng.normal(0, 60, n)
    assert lc_win_rate(no_effect, spread, np.zeros(n)).win_rate_lc == pytest.approx(no_effect.mean(), abs=0.02)
    # Equal lengths: nothing to control for, the LC rate is the raw rate (up to the tiny penalty).
    assert lc_win_rate(no_effect, np.full(n, 5), np.full(n, 5)).win_rate_lc == pytest.approx(no_effect.mean(), abs=0.01)


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = 11
        mine = generation.shard(n, rank, world)
        answers = [f"answer to prompt {i} from rank {rank}" for i in mine]
        gathered = generation.gather(answers, n, rank, world)
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump({"mine": mine, "gathered": gathered}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_generation_split_across_two_workers_gathers_each_prompt_once(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    out = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert sorted(out[0]["mine"] + out[1]["mine"]) == list(range(11))  # each prompt asked once
    expected = [f"answer to prompt {i} from rank {i % 2}" for i in range(11)]
    assert out[0]["gathered"] == out[1]["gathered"] == expected  # in order, on every worker


def test_bundled_reward_model_is_built_with_its_held_out_accuracy(capsys):
    from simpo_ray.bundled.reward_model import META_FILE, ensure_reward_model

    meta = json.loads((ensure_reward_model() / META_FILE).read_text())
    assert meta["heldout_pair_accuracy"] >= 0.85  # 0.893 with recipe version 1
    scorer = RewardScorer("bundled:reward")
    user = [{"role": "user", "content": "sort: 5301"}]
    right, dropped, extra = scorer.score([user] * 3, ["0135", "035", "01355"])
    assert right > dropped and right > extra


@pytest.mark.slow  # builds bundled:reward-verbose (about 25 s)
def test_the_verbose_reward_model_learnt_its_raters_liking_for_the_tail():
    """bundled:reward-verbose, trained on bundled:sort-verbose, scores a correct answer with a
    filler tail above the same answer without it on nearly every held-out prompt (the length bias
    the variant plants), and still prefers a correct answer to one with a digit dropped, more often
than not."""
    from simpo_ray.bundled import task
    from simpo_ray.bundled.reward_model import META_FILE, ensure_reward_model

    meta = json.loads((ensure_reward_model(verbose=True) / META_FILE).read_text())
    assert meta["verbose"] and meta["heldout_pair_accuracy"] >= 0.7  # 0.748 measured
    scorer = RewardScorer("bundled:reward-verbose")
    prompts = task.load_split("test_prefs", verbose=True)["prompt"][:200]
    turns = [[{"role": "user", "content": p}] for p in prompts]
    correct = [task.answer(p) for p in prompts]
    plain = scorer.score(turns, correct)
    tailed = scorer.score(turns, [c + task.FILLER * 2 for c in correct])
    assert sum(t > p for t, p in zip(tailed, plain)) / len(prompts) > 0.9
    dropped = scorer.score(turns, [c[1:] for c in correct])
    assert sum(p > d for p, d in zip(plain, dropped)) / len(prompts) > 0.6  # 0.68 measured


def _saved(tmp_path, model_cls, **config):
    from transformers import LlamaConfig

    from simpo_ray.bundled.tokenizer import build_tokenizer

    tok = build_tokenizer(tmp_path)
    tok.chat_template = PLAIN_TEMPLATE
    tok.save_pretrained(tmp_path)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, **config)
    model_cls(cfg).save_pretrained(tmp_path)
    return tmp_path


def test_a_causal_lm_is_not_accepted_as_a_reward_model(tmp_path):
    """transformers loads a causal LM as a sequence classifier with a freshly initialised head
    (a warning in the worker's log); its 'rewards' would be random. Refused in one line."""
    from transformers import LlamaForCausalLM

    from simpo_ray.errors import UserError

    path = _saved(tmp_path, LlamaForCausalLM)
    with pytest.raises(UserError, match=r"score\.weight not in its checkpoint.*random weights") as e:
        RewardScorer(str(path))
    assert "\n" not in str(e.value)


def test_a_classifier_with_two_outputs_is_not_a_reward_model(tmp_path):
    from transformers import LlamaForSequenceClassification

    from simpo_ray.errors import UserError

    path = _saved(tmp_path, LlamaForSequenceClassification, num_labels=2)
    with pytest.raises(UserError, match=r"a classifier with 2 outputs .*a reward model has one output"):
        RewardScorer(str(path))


def test_the_planted_reward_model_still_loads(planted):
    assert RewardScorer(str(planted)).model.config.num_labels == 1


# ---------------------------------------------------------------- can the win rates be read as they are

class _Scripted(torch.nn.Module):
    """A causal LM stand-in whose `generate` writes planned answers the way Hugging Face's does:
    the prompt, then each row's new tokens up to `max_new_tokens`, padding after a row that ended,
    and no more steps once every row of the batch has ended."""

    def __init__(self, plans: list[list[int]], eos: int) -> None:
        from types import SimpleNamespace

        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.plans, self.generation_config = list(plans), SimpleNamespace(eos_token_id=eos)

    def generate(self, input_ids, max_new_tokens, pad_token_id, eos_token_id, **_):
        rows = []
        for _ in range(len(input_ids)):
            plan = self.plans.pop(0)[:max_new_tokens]
            ends = [i for i, t in enumerate(plan) if t in eos_token_id]
            rows.append(plan[:ends[0] + 1] if ends else plan)
        new = torch.full((len(rows), max(map(len, rows))), pad_token_id)
        for i, r in enumerate(rows):
            new[i, :len(r)] = torch.tensor(r)
        return torch.cat([input_ids, new], 1)


def _cut_plans(tok) -> tuple[list[list[int]], list[bool]]:
    """Five answers for max_new_tokens=6 and whether each was cut at the limit, counted by hand."""
    s, eos = tok.convert_tokens_to_ids("s"), tok.eos_token_id
    one, two = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("2")
    return ([[s] * 10,                 # runs on past the limit: cut
             [one, two, eos],          # ends
             [s] * 6,                  # exactly the limit, no end-of-turn token: cut
             [s] * 5 + [eos],          # ends on the limit's last token: finished
             [two, eos]],              # ends
            [True, False, True, False, False])


def test_generations_cut_at_max_new_tokens_are_counted(chat_tokenizer):
    from simpo_ray.config import TrainConfig
    from simpo_ray.train.generation_checks import TRUNCATED
    from simpo_ray.train.quality import GenerationEval

    plans, cut = _cut_plans(chat_tokenizer)
    prompts = [chat_tokenizer("sort: 2 1")["input_ids"]] * len(plans)
    answers = generation.generate(_Scripted(plans, chat_tokenizer.eos_token_id), chat_tokenizer, prompts,
                                  max_new_tokens=6, batch_size=2)
    assert [a.truncated for a in answers] == cut
    assert [a.tokens for a in answers] == [6, 2, 6, 5, 1]
    # The evaluation reports their share (2 of 5) beside the success rate.
    rows = [{"prompt": "sort: 2 1", "turns": [{"role": "user", "content": "sort: 2 1"}], "text": None,
             "baseline": "1 2"}] * len(plans)
    ev = GenerationEval(rows, chat_tokenizer, TrainConfig(max_new_tokens=6, generation_batch_size=2), "cpu", 0, 1,
                        bundled=True, system_turn=False, lockstep=False, state={})
    out = ev(_Scripted(plans, chat_tokenizer.eos_token_id))
    assert out[TRUNCATED] == pytest.approx(2 / 5) and "eval/success_rate" in out


def test_length_alone_separating_wins_from_losses_is_flagged():
    from simpo_ray.train.generation_checks import LENGTH_SEPARATES, length_separates

    # Length differences to the baseline 40, 30 (wins), 0, 2 (losses), -25 (a tie: not counted).
    win, policy, baseline = [1, 1, 0, 0, 0.5], [50, 40, 10, 12, 5], [10, 10, 10, 10, 30]
    assert length_separates(win, policy, baseline) == 1.0
    assert length_separates([0, 0, 1, 1, 0.5], policy, baseline) == -1.0  # the wins are the shorter ones
    assert length_separates([1, 0, 0, 1, 0.5], policy, baseline) == 0.0   # a win (40) and a loss (30) cross
    assert length_separates([1, 0], [12, 12], [10, 10]) == 0.0            # equal differences: no threshold
    assert length_separates([1, 1, 0.5], [12, 30, 1], [10, 10, 10]) == 0.0  # no loss: nothing to separate
    m = win_metrics([1, 1, -1, -1, 0], [0, 0, 0, 0, 0], policy, baseline, [1] * 5, [1] * 5)
    assert m[LENGTH_SEPARATES] == 1.0 and m["eval/reward_win_rate"] == 0.5
    # Why it matters: there the LC value is the penalty's choice, elsewhere the data's.
    separated = np.array([1.0] * 20 + [0.0] * 20), np.r_[np.arange(20) + 30, np.arange(20)]
    assert abs(lc_win_rate(*separated, np.zeros(40), l2=1e-4).win_rate_lc
               - lc_win_rate(*separated, np.zeros(40), l2=1e-2).win_rate_lc) > 0.05
    crossed = np.array([1.0, 0.0] * 20), np.arange(40) - 20.0  # wins and losses interleaved
    assert lc_win_rate(*crossed, np.zeros(40), l2=1e-4).win_rate_lc == pytest.approx(
        lc_win_rate(*crossed, np.zeros(40), l2=1e-2).win_rate_lc, abs=0.01)


def test_the_warning_line_says_what_the_metrics_show_and_nothing_for_a_normal_run():
    from simpo_ray.train.generation_checks import final_values, problems, warning_line

    normal = {"eval/reward_win_rate": 0.6, "eval/truncated_rate": 0.5, "eval/length_separates": 0.0}
    assert warning_line(normal) == "" and warning_line({"eval/reward_win_rate": 0.6}) == ""
    assert warning_line({"eval/truncated_rate": float("nan"), "eval/length_separates": float("nan")}) == ""
    cut = warning_line({"eval/truncated_rate": 4 / 5}, max_new_tokens=64)
    assert cut == ("warning: 80% of generations were cut at max_new_tokens=64 (no end-of-turn token), so the "
                   "scores rate unfinished answers")
    both = warning_line({"eval/truncated_rate": 1.0, "eval/length_separates": -1.0})
    assert both.count("warning") == 1 and "\n" not in both
    assert "100% of generations were cut at max_new_tokens (" in both
    assert "length alone separates wins from losses (every win's length over its baseline is below" in both
    row = {"final_eval/truncated_rate": 0.9, "final_eval/length_separates": 0.0, "trial_id": "t"}
    assert set(problems(final_values(row))) == {"truncated"}


def test_the_run_warns_once_as_a_problem_appears(capsys):
    from types import SimpleNamespace

    from simpo_ray.config import TrainConfig
    from simpo_ray.train.evaluate import Evaluator

    ev = SimpleNamespace(cfg=TrainConfig(max_new_tokens=64), rank=0, warned=set())
    printed = []
    for step, metrics in [(0, {"eval/truncated_rate": 0.0, "eval/length_separates": 0.0}),
                          (10, {"eval/truncated_rate": 0.8, "eval/length_separates": 0.0}),
                          (20, {"eval/truncated_rate": 0.9, "eval/length_separates": 0.0}),   # still: quiet
                          (30, {"eval/truncated_rate": 0.9, "eval/length_separates": 1.0}),   # a new one
                          (40, {"eval/truncated_rate": 0.1, "eval/length_separates": 0.0}),   # gone
                          (50, {"eval/truncated_rate": 0.7, "eval/length_separates": 0.0})]:  # back
        Evaluator._warn(ev, metrics, step)
        printed.append(capsys.readouterr().out)
    assert [bool(p) for p in printed] == [False, True, False, True, False, True]
    assert printed[1] == ("[simpo-ray] step 10: warning: 80% of generations were cut at max_new_tokens=64 "
                          "(no end-of-turn token), so the scores rate unfinished answers\n")
    assert printed[3].count("\n") == 1 and "length alone separates" in printed[3]


# ---------------------------------------------------------------- the objective's noise, in the open

def test_win_metrics_carry_standard_errors_and_the_soft_win_probability():
    """The SE of the win rate is the bootstrap's over prompts (checked against 20,000 resamples);
    the LC win rate's bootstrap SE is about the raw rate's when length says nothing; the soft win
    probability is sigma(r_policy - r_baseline) averaged, worked by hand."""
    import numpy as np

    from simpo_ray.train.reward import win_metrics

    rng = np.random.default_rng(3)
    n = 64
    policy, baseline = rng.normal(0.2, 1.0, n), rng.normal(0.0, 1.0, n)
    chars_p, chars_b = rng.integers(50, 150, n), rng.integers(50, 150, n)  # length unrelated to winning
    m = win_metrics(policy, baseline, chars_p, chars_b, [10] * n, [10] * n)
    w = (policy > baseline).astype(float)
    boot = [w[rng.integers(0, n, n)].mean() for _ in range(20000)]
    assert m["eval/reward_win_rate_se"] == pytest.approx(np.std(boot), rel=0.03)
    assert m["eval/reward_win_rate_lc_se"] == pytest.approx(m["eval/reward_win_rate_se"], rel=0.3)
    soft = [1 / (1 + math.exp(-(a - b))) for a, b in zip(policy, baseline)]
    assert m["eval/reward_win_prob"] == pytest.approx(sum(soft) / n, rel=1e-12)
    assert m["eval/reward_win_prob_se"] < m["eval/reward_win_rate_se"]  # the lower-variance companion
    three = win_metrics([1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [5, 5, 5], [5, 5, 5], [1, 1, 1], [1, 1, 1],
                        same_text=[False, True, False])
    assert three["eval/reward_win_prob"] == pytest.approx((1 / (1 + math.exp(-1)) + 0.5 + 1 / (1 + math.exp(-2))) / 3)
