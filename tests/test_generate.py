"""Batched, left-padded, KV-cached generation and scoring agree with one-prompt-at-a-time runs."""

from __future__ import annotations

import pytest
import torch

from pkt.evaluate.generate import (GenStats, encode_left_padded, generate, next_token_logprobs, response_nll,
                                   truncate_at_stop)

PROMPTS = ["Question: Natalia sold 48 clips", "def add(a, b):\n", "The answer is", "A. B. C. D.",
           "Complete the following python function. Here is the completed function: ```python\nfor i in range(10):"]


def test_truncate_at_stop():
    assert truncate_at_stop("abc\n```def", ["\n```", "def"]) == "abc"
    assert truncate_at_stop("abc", ["x"]) == "abc"
    assert truncate_at_stop("abc", []) == "abc"


def test_left_padding(tiny_tok):
    b = encode_left_padded(tiny_tok, ["a", "def add(a, b):"], "cpu")
    assert b["attention_mask"][0, 0] == 0 and b["attention_mask"][0, -1] == 1
    assert b["input_ids"][0, 0] == tiny_tok.pad_token_id
    assert b["attention_mask"].sum(1).tolist() == [len(tiny_tok("a")["input_ids"]),
                                                   len(tiny_tok("def add(a, b):")["input_ids"])]


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_batched_greedy_equals_single(kind, tiny_tok):
    from pkt import testing

    model = testing.tiny_model(kind, "student", len(tiny_tok))
    stats = GenStats()
    batched = generate(model, tiny_tok, PROMPTS, max_new_tokens=8, batch_size=3, progress=False, stats=stats)
    single = [generate(model, tiny_tok, [p], max_new_tokens=8, batch_size=1, progress=False)[0] for p in PROMPTS]
    assert batched == single
    assert stats.prompts == len(PROMPTS) and 0 < stats.new_tokens <= 8 * len(PROMPTS)


def test_stop_strings_cut_output(qwen_pair):
    _, model, tok = qwen_pair
    free = generate(model, tok, PROMPTS, max_new_tokens=12, progress=False)
    # pick a character the free-running model produced and use it as a stop string
    stops = [o[0][3] for o in free if len(o[0]) > 4][:2]
    cut = generate(model, tok, PROMPTS, max_new_tokens=12, stop=stops, progress=False)
    for f, c in zip(free, cut):
        assert not any(s in c[0] for s in stops)
        assert f[0].startswith(c[0])


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_continuous_batching_equals_padded(kind, tiny_tok):
    """Continuous batching (2 slots for 5 prompts, so slots are handed on) gives the padded path's greedy text,
    with and without stop strings, and the same token count; the model is unchanged afterwards."""
    from pkt import testing

    model = testing.tiny_model(kind, "student", len(tiny_tok))
    enc = tiny_tok(PROMPTS[1], return_tensors="pt", add_special_tokens=False)
    before = model(**enc).logits
    free = generate(model, tiny_tok, PROMPTS, max_new_tokens=12, batch_size=2, progress=False)
    stops = [o[0][3] for o in free if len(o[0]) > 4][:2]
    assert stops
    first = model.generate(**tiny_tok(PROMPTS[0], return_tensors="pt", add_special_tokens=False),
                           max_new_tokens=4, do_sample=False)[0, -2:]  # what the model writes 3rd and 4th
    for stop, eos in ((None, None), (stops, None), (None, first.tolist())):
        if eos is not None:  # a token the model does produce ends some rows early, at different lengths
            model.generation_config.eos_token_id = eos
        a, b = GenStats(), GenStats()
        padded = generate(model, tiny_tok, PROMPTS, max_new_tokens=12, stop=stop, batch_size=2, progress=False,
                          stats=a)
        cont = generate(model, tiny_tok, PROMPTS, max_new_tokens=12, stop=stop, batch_size=2, progress=False,
                        stats=b, engine="continuous")
        assert cont == padded
        if eos is not None:
            assert b.new_tokens < 12 * len(PROMPTS)
        assert a.new_tokens == b.new_tokens and b.sequences == len(PROMPTS) and b.prompts == len(PROMPTS)
        # the breakdown: each prompt prefilled once; every token after a row's first came from a decoding step
        assert b.prefill_tokens == sum(len(tiny_tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS)
        assert b.row_steps == b.new_tokens - len(PROMPTS) and 0 < b.decode_steps <= b.row_steps <= 2 * b.decode_steps
        assert 0 < b.prefill_seconds < b.seconds
    torch.testing.assert_close(model(**enc).logits, before)
    with pytest.raises(ValueError, match="engine"):
        generate(model, tiny_tok, PROMPTS[:1], engine="vllm", progress=False)


def test_continuous_batching_shares_a_common_prefix(tiny_tok):
    """Prompts behind the same few-shot text: the continuous engine prefills that text once (the suffixes'
    padding then sits between prefix and suffix) and still gives the padded path's answers."""
    from pkt import testing
    from pkt.evaluate import kv_cache as G

    shots = "Q: There are 15 trees in the grove. How many trees are planted? A: The answer is 6.\n\n" * 2
    prompts = [shots + "Q: " + p + " A:" for p in PROMPTS]
    ids = [tiny_tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert G._shared_prefix(ids) >= G._MIN_SHARED_PREFIX
    assert G._shared_prefix([ids[0], ids[0]]) == len(ids[0]) - 1  # every prompt keeps a token of its own
    assert G._shared_prefix([[1] * 40, [2] * 40]) == 0
    model = testing.tiny_model("qwen2", "student", len(tiny_tok))
    for batch in (2, 8):
        padded = generate(model, tiny_tok, prompts, max_new_tokens=10, batch_size=batch, progress=False)
        cont = generate(model, tiny_tok, prompts, max_new_tokens=10, batch_size=batch, progress=False,
                        engine="continuous")
        assert cont == padded
        st = GenStats()
        generate(model, tiny_tok, prompts, max_new_tokens=10, batch_size=batch, progress=False, stats=st,
                 engine="continuous")
        shared = G._shared_prefix(ids)  # prefilled once, then each prompt's own tokens
        assert st.prefill_tokens == shared + sum(len(i) - shared for i in ids)


def test_grouped_scoring_equals_padded(qwen_pair):
    """engine="continuous" scoring: two few-shot headers (each group's cache computed once) and a prompt of its
    own give the padded path's log-probabilities."""
    from pkt.evaluate import kv_cache as G

    _, model, tok = qwen_pair
    heads = ["The following are multiple choice questions about algebra. 1+1? A. 2\n", "Physics questions. " * 6]
    prompts = [h + p for h in heads for p in PROMPTS[:3]] + ["Q: alone A:"]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert sorted(map(len, G._prefix_groups(ids))) == [1, 3, 3]
    cols = [5, 17, 42]
    padded = next_token_logprobs(model, tok, prompts, cols, batch_size=2, progress=False)
    grouped = next_token_logprobs(model, tok, prompts, cols, batch_size=2, progress=False, engine="continuous")
    torch.testing.assert_close(grouped, padded, atol=1e-4, rtol=1e-4)


def test_seeded_sampling(qwen_pair):
    _, model, tok = qwen_pair
    a = generate(model, tok, PROMPTS[:2], max_new_tokens=6, temperature=1.0, num_samples=3, seed=7, progress=False)
    b = generate(model, tok, PROMPTS[:2], max_new_tokens=6, temperature=1.0, num_samples=3, seed=7, progress=False)
    c = generate(model, tok, PROMPTS[:2], max_new_tokens=6, temperature=1.0, num_samples=3, seed=8, progress=False)
    assert a == b and a != c
    assert [len(x) for x in a] == [3, 3]
    with pytest.raises(ValueError):
        generate(model, tok, PROMPTS[:1], num_samples=2, progress=False)


def test_next_token_logprobs_batched_equals_single(qwen_pair):
    _, model, tok = qwen_pair
    ids = [5, 17, 42]
    batched = next_token_logprobs(model, tok, PROMPTS, ids, batch_size=4, progress=False)
    single = torch.cat([next_token_logprobs(model, tok, [p], ids, batch_size=1, progress=False) for p in PROMPTS])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        enc = tok(PROMPTS[1], return_tensors="pt", add_special_tokens=False)
        ref = torch.log_softmax(model(**enc).logits[0, -1], -1)[ids]
    torch.testing.assert_close(batched[1], ref, atol=1e-4, rtol=1e-4)


def _loss_features(tok, pairs):
    """Tokenised (prompt, response) pairs with only the response labelled, as the answer loss scores them."""
    feats = []
    for p, r in pairs:
        pi, ri = tok(p, add_special_tokens=False)["input_ids"], tok(r, add_special_tokens=False)["input_ids"]
        feats.append({"input_ids": pi + ri, "attention_mask": [1] * (len(pi) + len(ri)),
                      "labels": [-100] * len(pi) + ri})
    return feats


def test_response_nll_matches_model_loss(qwen_pair):
    _, model, tok = qwen_pair
    feats = _loss_features(tok, [("Question: 1+1?", " Answer: 2"), ("def add(a, b):", "\n    return a + b\n")])
    res = response_nll(model, feats, tok.pad_token_id, batch_size=2, progress=False)
    for f, (s, n) in zip(feats, res):
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])).loss
        assert n == sum(1 for x in f["labels"] if x != -100)
        assert s / n == pytest.approx(float(loss), rel=1e-4)


def test_answer_loss_benchmark_reference_agrees(qwen_pair):
    """benchmarks/bench_answer_loss.py's reference (logits at every position) and response_nll (logits from the
    first labelled position on) give the same sums and counts, prompts of different lengths in one batch."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench_answer_loss import full_logits_nll

    _, model, tok = qwen_pair
    feats = _loss_features(tok, [("Question: 1+1?", " Answer: 2"),
                                 ("A much longer question about def add(a, b):", " a + b"), ("No answer here", "")])
    ref = full_logits_nll(model, feats, tok.pad_token_id, batch_size=3)
    new = response_nll(model, feats, tok.pad_token_id, batch_size=3, progress=False)
    assert [n for _, n in ref] == [n for _, n in new] and ref[2][1] == 0
    for (a, _), (b, _) in zip(ref, new):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)


def test_response_nll_chunks_rows_under_its_logits_budget(qwen_pair, monkeypatch):
    """With a logits budget of one row, each batch goes through the model row by row: the same sums and counts
    as the whole batch at once, and no forward sees more than one row."""
    import pkt.evaluate.generate as G

    _, model, tok = qwen_pair
    feats = _loss_features(tok, [("Question: 1+1?", " Answer: 2"),
                                 ("A longer question about def add(a, b):", " a + b"), ("x", " y z")])
    whole = response_nll(model, feats, tok.pad_token_id, batch_size=3, progress=False)
    rows, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **kw: rows.append(len(kw["input_ids"])) or forward(*a, **kw))
    monkeypatch.setattr(G, "LOSS_LOGITS_BYTES", 1)
    chunked = response_nll(model, feats, tok.pad_token_id, batch_size=3, progress=False)
    assert rows == [1, 1, 1]
    assert [n for _, n in chunked] == [n for _, n in whole]
    for (a, _), (b, _) in zip(chunked, whole):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)


def test_growing_cache_layer_equals_concatenation():
    """The continuous engine's cache layer writes each step into a buffer with room instead of concatenating:
    the keys/values it returns equal DynamicLayer's at every step, across reallocations (room used up, or the
    tensors replaced from outside as rows join and leave)."""
    from transformers.cache_utils import DynamicLayer

    from pkt.evaluate import kv_cache as G

    g = torch.Generator().manual_seed(0)
    plain, grow = DynamicLayer(), G._growing_layer()()
    first = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    plain.update(*first)
    grow.update(*first)
    buffers = []  # every buffer the layer used (held, so no two share an address)
    steps = 2 * G._ROOM + 3
    for step in range(steps):
        if step == G._ROOM // 2:  # rows leave: the engine replaces the tensors with a copy of some rows
            for layer in (plain, grow):
                layer.keys, layer.values = layer.keys[[0, 2], :, 1:], layer.values[[0, 2], :, 1:]
        k = torch.randn(plain.keys.shape[0], 2, 1, 4, generator=g)
        v = torch.randn(plain.keys.shape[0], 2, 1, 4, generator=g)
        want, got = plain.update(k, v), grow.update(k, v)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
        if not any(b is grow._buf for b in buffers):
            buffers.append(grow._buf)
    # it writes into room: a new buffer at the first step, when the rows were replaced and each time the room ran
    # out (every _ROOM steps), not one per step
    assert len(buffers) <= 2 + steps // G._ROOM + 1 < steps


def test_continuous_batching_equals_padded_when_the_cache_buffers_regrow(tiny_tok, monkeypatch):
    """With 2 columns of room the buffers are reallocated every other step while rows join and leave: the answers
    stay the padded path's."""
    from pkt import testing
    from pkt.evaluate import kv_cache as G

    monkeypatch.setattr(G, "_ROOM", 2)
    model = testing.tiny_model("qwen2", "student", len(tiny_tok))
    padded = generate(model, tiny_tok, PROMPTS, max_new_tokens=16, batch_size=2, progress=False)
    assert generate(model, tiny_tok, PROMPTS, max_new_tokens=16, batch_size=2, progress=False,
                    engine="continuous") == padded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_equal_argmax_on_ties_and_nan(dtype):
    """The decoding step's max(-1) indices are argmax's: first maximum on ties, NaN taken as the maximum."""
    from pkt.evaluate.logits import greedy_tokens

    g = torch.Generator().manual_seed(0)
    ties = torch.randint(0, 4, (64, 5000), generator=g).to(dtype)  # every row has many tied maxima
    nan = torch.randn(8, 300, generator=g).to(dtype)
    nan[::2, 17] = float("nan")
    nan[1, 5] = nan[1, 200] = float("inf")
    for x in (ties, nan, torch.randn(3, 151936, generator=g).to(dtype)):
        assert torch.equal(greedy_tokens(x), x.argmax(-1))


def test_length_chunks():
    from pkt.evaluate.generate import _length_chunks

    assert _length_chunks([7, 3, 5, 1], [400, 310, 290, 60], 0.75) == [[7, 3], [5], [1]]
    assert _length_chunks([7, 3, 5, 1], [400, 310, 290, 60], 0.0) == [[7, 3, 5, 1]]
    assert _length_chunks([], [], 0.75) == []


def test_continuous_prefill_in_length_chunks_equals_padded(tiny_tok, monkeypatch):
    """Prompts of very different lengths joining at once are prefilled in chunks of similar length, each merged
    into the running batch; the answers are still the padded path's, and one prefill per refill gives them too."""
    from pkt import testing
    from pkt.evaluate import generate as G

    prompts = [" ".join(["word"] * k) + p for k, p in zip((60, 45, 30, 18, 9, 2, 0), PROMPTS * 2)]
    model = testing.tiny_model("qwen2", "student", len(tiny_tok))
    padded = generate(model, tiny_tok, prompts, max_new_tokens=10, batch_size=4, progress=False)
    calls = []
    real = G._prefill
    monkeypatch.setattr(G, "_prefill", lambda m, suffixes, *a: calls.append(len(suffixes)) or real(m, suffixes, *a))
    # every prompt joining at once, and 4 rows refilled while others decode (chunks merged into a running batch)
    for batch in (len(prompts), 4):
        count = {}
        for ratio in (0.75, 0.0):
            monkeypatch.setattr(G, "PREFILL_CHUNK", ratio)
            calls.clear()
            cont = generate(model, tiny_tok, prompts, max_new_tokens=10, batch_size=batch, progress=False,
                            engine="continuous")
            assert cont == padded
            assert sum(calls) == len(prompts)
            count[ratio] = len(calls)
        assert count[0.75] > count[0.0] and (batch > 4 or count[0.0] > 1)
