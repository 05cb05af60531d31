"""simpo_ray.train.model: path resolution, tokenizer and model loading on a tiny saved Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from simpo_ray.train import model as M
from simpo_ray.config import TrainConfig
from simpo_ray.errors import UserError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, chat_tokenizer):
    """A 2-layer Llama and the bundled tokenizer, saved as a user's model directory would be."""
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(chat_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path


def is_checkpointing(model) -> bool:
    """Whether transformers reports activation (gradient) checkpointing on."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def test_loads_fp32_by_default_on_device(tiny_dir):
    m = M.load_model(TrainConfig(model_name_or_path=str(tiny_dir)), device="cpu")
    assert isinstance(m, LlamaForCausalLM)
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    assert not is_checkpointing(m)
    assert m.config.num_hidden_layers == 2


def test_bf16_checkpointing_and_attention(tiny_dir):
    cfg = TrainConfig(model_name_or_path=str(tiny_dir), bf16=True, gradient_checkpointing=True,
                      attn_implementation="eager")
    m = M.load_model(cfg)
    # Training keeps fp32 master weights (bf16 is compute, via autocast in the loop) ...
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    # ... while inference loads the weights in bf16.
    assert {p.dtype for p in M.load_model(cfg, for_training=False).parameters()} == {torch.bfloat16}
    assert is_checkpointing(m) and m.config.use_cache is False
    assert m.config._attn_implementation == "eager"
    # In training, a checkpointed layer's forward runs twice (again in backward), and every
    # parameter still gets a gradient. (Module hooks do not fire on the recompute: count forward.)
    calls = []
    mlp = m.model.layers[0].mlp
    forward = mlp.forward
    mlp.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    m.train()
    ids = torch.tensor([[2, 4, 10, 11, 5]])
    m(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_bf16_refused_where_unsupported(tiny_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    with pytest.raises(UserError, match="bf16: true, but device cuda does not support bfloat16"):
        M.load_model(TrainConfig(model_name_or_path=str(tiny_dir), bf16=True), device="cuda")


def fits(path, **kw) -> TrainConfig:
    """A config of the model at ``path`` whose max_length fits its 64 positions."""
    return TrainConfig(model_name_or_path=str(path), max_length=64, max_prompt_length=32, **kw)


def test_tokenizer_pad_defaults_to_eos(tiny_dir, tmp_path, chat_tokenizer):
    tok = M.load_tokenizer(fits(tiny_dir))
    assert tok.pad_token == "<pad>" and tok.chat_template == chat_tokenizer.chat_template
    nopad = tmp_path / "nopad"
    chat_tokenizer.save_pretrained(nopad)
    cfg_file = nopad / "tokenizer_config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"pad_token": "<pad>"', '"pad_token": null'))
    tok = M.load_tokenizer(fits(tiny_dir, tokenizer_name_or_path=str(nopad)))
    assert tok.pad_token == tok.eos_token == "</s>"
    assert tok.pad_token_id == tok.eos_token_id


def test_chat_template_key_replaces_the_tokenizers(tiny_dir, chat_tokenizer):
    # The reference's gemma-2-9b-it-simpo.yaml sets one (its get_tokenizer applies it).
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    tok = M.load_tokenizer(fits(tiny_dir, chat_template=template))
    assert tok.chat_template == template != chat_tokenizer.chat_template
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "user: hi</s>assistant: ok</s>"
    assert M.load_tokenizer(fits(tiny_dir)).chat_template == chat_tokenizer.chat_template


def test_max_length_above_the_position_limit_is_refused_before_ray(tmp_path, chat_tokenizer):
    """GPT-2 style (n_positions) and Llama style (max_position_embeddings) limits; the check is
    reached from launch.check_inputs, which the CLIs run before ray.init."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from simpo_ray.infra.launch import check_inputs

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(chat_tokenizer), n_positions=48, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=chat_tokenizer.bos_token_id, eos_token_id=chat_tokenizer.eos_token_id)
                    ).save_pretrained(gpt2)
    chat_tokenizer.save_pretrained(gpt2)
    cfg = TrainConfig(model_name_or_path=str(gpt2), max_length=64, max_prompt_length=32)
    message = (f"max_length: 64 is above the position limit of model '{gpt2}' (n_positions: 48); "
               "set max_length to at most 48")
    with pytest.raises(UserError) as e:
        M.load_tokenizer(cfg)
    assert str(e.value) == message
    with pytest.raises(UserError) as e:
        check_inputs(cfg)
    assert str(e.value) == message
    M.load_tokenizer(cfg.replace(max_length=48))  # at the limit: fine
    with pytest.raises(UserError, match=r"max_length: 1024 is above .*\(max_position_embeddings: 64\)"):
        M.load_tokenizer(TrainConfig(model_name_or_path=str(_llama(tmp_path, chat_tokenizer))))


def _llama(tmp_path, chat_tokenizer):
    path = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(chat_tokenizer), hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
                     ).save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path


def test_hub_model_without_network_fails_fast(monkeypatch, tmp_path):
    """No HF_HUB_OFFLINE and a Hub that does not answer: one line within seconds (transformers
    alone retries for about a minute), naming the way out."""
    import socket
    import time

    from test_data import go_online

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    go_online(monkeypatch, endpoint)
    t0 = time.monotonic()
    for load in (M.load_tokenizer, M.load_model):
        with pytest.raises(UserError) as e:
            load(TrainConfig(model_name_or_path="openai-community/gpt2"))
        assert str(e.value) == (
            f"cannot load model 'openai-community/gpt2' from the Hugging Face Hub: {endpoint} did not answer "
            "within 5 s; use a local path, or set HF_HUB_OFFLINE=1 to load it from the local Hugging Face cache")
    assert time.monotonic() - t0 < 10
    # Offline mode: nothing is asked; transformers' own (quick) cache miss is the error.
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="cannot load tokenizer 'openai-community/gpt2'"):
        M.load_tokenizer(TrainConfig(model_name_or_path="openai-community/gpt2"))


@pytest.mark.parametrize("name, match", [
    ("/no/such/model", "model path '/no/such/model' does not exist"),
    ("./missing-model", "model path './missing-model' does not exist"),
    ("bundled:huge", "unknown bundled model 'bundled:huge'; sizes: tiny, small, base"),
])
def test_bad_model_names(name, match):
    with pytest.raises(UserError, match=match):
        M.load_model(TrainConfig(model_name_or_path=name))


def test_directory_without_model_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match=r"cannot load model '.*': ") as e:
        M.load_model(TrainConfig(model_name_or_path=str(tmp_path)))
    assert "\n" not in str(e.value)


def test_hub_ids_are_left_to_transformers():
    assert M.resolve_model_path("meta-llama/Meta-Llama-3-8B-Instruct") == "meta-llama/Meta-Llama-3-8B-Instruct"


def test_bundled_name_resolves_through_ensure_model(tiny_dir, monkeypatch):
    # Building a real bundled model is bundled/'s test (it SFT-trains for seconds); here the
    # mapping bundled:<size> -> ensure_model(size) -> a directory transformers loads.
    from simpo_ray.bundled import models

    asked = []
    monkeypatch.setattr(models, "ensure_model", lambda size: asked.append(size) or tiny_dir)
    assert M.resolve_model_path("bundled:small") == str(tiny_dir)
    m = M.load_model(TrainConfig(model_name_or_path="bundled:tiny"))
    assert asked == ["small", "tiny"] and isinstance(m, LlamaForCausalLM)


def test_dropout_is_off_by_default_as_in_the_reference(tmp_path):
    # A Llama saved with attention dropout 0.5: loaded for training, two forwards in train mode
    # must agree (the reference trainer's disable_dropout: true); with disable_dropout: false
    # they differ.
    from transformers import LlamaConfig, LlamaForCausalLM

    from simpo_ray.train.model import load_model

    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, attention_dropout=0.5)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 32, (2, 12))
    for disable, same in ((True, True), (False, False)):
        model = load_model(TrainConfig(model_name_or_path=str(tmp_path / "m"), disable_dropout=disable))
        model.train()
        with torch.no_grad():
            a, b = model(ids).logits, model(ids).logits
        assert torch.equal(a, b) is same
