"""The embedded real pair: both know Paris, they share one tokenizer, and its MMLU answer letters are tokens.

Marked ``slow`` (loads ~2.4 GB of weights) and ``smoke``: CI runs it beside the fast suite after
``scripts/setup.sh`` has prepared the models.
"""

import pytest
import torch

from pkt.models.arch import ArchSpec
from pkt.models.load import assert_same_tokenizer, is_prepared, load_model, load_tokenizer
from pkt.models.registry import DEFAULT_STUDENT, DEFAULT_TEACHER

pytestmark = [pytest.mark.slow, pytest.mark.smoke]


@pytest.fixture(scope="module")
def tokenizers():
    for name in (DEFAULT_TEACHER, DEFAULT_STUDENT):
        assert is_prepared(name), f"{name} is not prepared: run `pkt models prepare {name}` (scripts/setup.sh does)"
    return load_tokenizer(DEFAULT_TEACHER), load_tokenizer(DEFAULT_STUDENT)


def test_pair_shares_one_tokenizer(tokenizers):
    assert_same_tokenizer(*tokenizers)


def test_tokenizer_check_rejects_a_different_vocabulary(tokenizers, tiny_tok):
    with pytest.raises(Exception, match="tokenizers differ"):
        assert_same_tokenizer(tokenizers[0], tiny_tok)


@pytest.mark.parametrize("name", [DEFAULT_STUDENT, DEFAULT_TEACHER])
def test_both_know_paris(name, tokenizers):
    model = load_model(name)
    tok = tokenizers[0]
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_mmlu_answer_letters_are_single_tokens_with_and_without_a_space(tokenizers):
    """MMLU scoring compares the logits of " A" and "A" (and B, C, D): each must be one token of the real
    vocabulary, or the letter's probability would be read from a word piece."""
    from pkt.evaluate.tasks import mmlu

    tok = tokenizers[1]
    ids = mmlu.letter_token_ids(tok)
    assert [tok.convert_ids_to_tokens(v) for v in ids] == [[f"Ġ{c}", c] for c in "ABCD"]


def test_student_facts_are_read_from_the_model():
    spec = ArchSpec.from_model(load_model(DEFAULT_STUDENT, dtype="bfloat16"))
    assert (spec.num_layers, spec.hidden_size, spec.intermediate_size) == (24, 896, 4864)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (14, 2, 64)
    assert spec.bias["q"] and spec.bias["k"] and spec.bias["v"] and not spec.tied_embeddings
