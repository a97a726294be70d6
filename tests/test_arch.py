"""ArchSpec reads dimensions from config and verifies them against the module tree."""

import pytest
import torch.nn as nn

from pkt.errors import ModelError
from pkt.models.arch import LINEAR_KINDS, ArchSpec


def test_tiny_pair_facts_are_read_from_modules(tiny_pair):
    teacher, student, _ = tiny_pair
    t, s = ArchSpec.from_model(teacher), ArchSpec.from_model(student)
    for spec, model in ((t, teacher), (s, student)):
        assert spec.num_layers == len(model.model.layers)
        for kind in LINEAR_KINDS:
            mod = spec.linear(model, spec.num_layers - 1, kind)
            assert isinstance(mod, nn.Linear)
            assert tuple(mod.weight.shape) == spec.weight_shape(kind)
            assert spec.bias[kind] == (mod.bias is not None)
        assert spec.tied_embeddings == (model.lm_head.weight is model.model.embed_tokens.weight)
        assert model.get_submodule(spec.module_name(0, "down")) is spec.linear(model, 0, "down")
    # the pair really differs in every dimension, like the real pair
    assert t.hidden_size > s.hidden_size and t.num_layers > s.num_layers
    assert t.intermediate_size > s.intermediate_size and t.head_dim != s.head_dim


def test_qwen_pair_has_gqa_and_qkv_biases(qwen_pair):
    teacher, student, _ = qwen_pair
    s = ArchSpec.from_model(student)
    assert s.num_kv_heads < s.num_heads and s.gqa_group == s.num_heads // s.num_kv_heads
    assert s.weight_shape("v") == (s.num_kv_heads * s.head_dim, s.hidden_size)
    assert s.bias == {"q": True, "k": True, "v": True, "o": False, "gate": False, "up": False, "down": False}
    assert not s.tied_embeddings


def test_unsupported_architecture_is_one_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ModelError, match="unsupported architecture GPT2LMHeadModel"):
        ArchSpec.from_model(model)


def test_config_that_lies_about_modules_is_caught(llama_pair):
    _, student, _ = llama_pair
    student.config.intermediate_size += 1
    with pytest.raises(ModelError, match="config implies"):
        ArchSpec.from_model(student)


def test_peft_wrapped_model_is_unwrapped(llama_pair):
    from peft import LoraConfig, get_peft_model

    _, student, _ = llama_pair
    spec = ArchSpec.from_model(student)
    wrapped = get_peft_model(student, LoraConfig(r=2, target_modules=["q_proj"]))
    assert ArchSpec.from_model(wrapped) == spec  # every fact, read through the peft wrapper
