"""Tiny random teacher/student pairs and a tiny tokenizer, built in-process in milliseconds.

For fast unit tests and oracle checks only (never for results). The pairs mimic the real cross-scale
setting: the teacher is wider, deeper and has a larger FFN and a *different head_dim* than the student.

* ``"llama"``: multi-head attention, no biases, tied embeddings (like SmolLM2 / Llama-2).
* ``"qwen2"``: grouped-query attention, q/k/v biases, untied lm_head (like Qwen2.5-Coder), and the
  teacher has fewer, larger heads than the student (12×128 vs 14×64 in the real pair).

``TINY_BUDGET`` is the study budget the tests run ``pkt run`` with on such a pair: every stage runs in seconds.
"""

from __future__ import annotations

import torch

_CORPUS = [
    "The capital of France is Paris. Answer the following question.",
    "Question: Natalia sold 48 clips in April and half as many in May. How many in total? Answer: 72",
    "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n",
    "The following are multiple choice questions (with answers) about biology. A. B. C. D. The answer is: C",
    "Complete the following python function. Here is the completed function: ```python\nfor i in range(10):",
    "0123456789 + - * / = ( ) [ ] { } , . ; : ! ? ' \" # $ % &",
]
# A `pkt run` budget for tiny pairs: a few examples, one epoch, rank 2, one LaTen step, 8-token answers.
TINY_BUDGET = dict(train_examples=4, epochs=1, batch_size=2, max_length=160, rank=2, alpha=2, extract_samples=2,
                   laten_choice="fixed", laten_steps=1, laten_batch=2, kd_max_new_tokens=8, eval_limit=3,
                   eval_max_new_tokens=8, loss_examples=3,
                   # the tiny teacher never ends an answer within 8 tokens: keep them open rather than drop all
                   kd_truncated="keep", gkd_max_new_tokens=4)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer with a chat template, trained on a few sentences (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.padding_side = "left"
    return fast


def _llama_cfg(vocab, hidden, inter, layers, heads, kv, head_dim, tied):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=256,
        tie_word_embeddings=tied, rms_norm_eps=1e-6, attention_bias=False,
    )


def _qwen_cfg(vocab, hidden, inter, layers, heads, kv, head_dim):
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
        tie_word_embeddings=False, rms_norm_eps=1e-6,
    )
    cfg.head_dim = head_dim
    return cfg


def tiny_config(kind: str, role: str, vocab_size: int):
    """Config of one side of a tiny pair. kind: 'llama' | 'qwen2'; role: 'teacher' | 'student'."""
    table = {
        ("llama", "teacher"): lambda: _llama_cfg(vocab_size, 64, 160, 4, 4, 4, 16, True),
        ("llama", "student"): lambda: _llama_cfg(vocab_size, 48, 96, 3, 4, 4, 12, True),
        ("qwen2", "teacher"): lambda: _qwen_cfg(vocab_size, 64, 176, 4, 4, 2, 16),
        ("qwen2", "student"): lambda: _qwen_cfg(vocab_size, 48, 112, 3, 6, 2, 8),
    }
    if (kind, role) not in table:
        raise ValueError(f"unknown tiny model {kind}/{role}")
    return table[(kind, role)]()


def tiny_model(kind: str, role: str, vocab_size: int, seed: int = 0):
    """A randomly initialised fp32 causal LM in eval mode (deterministic for a seed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed + (1 if role == "student" else 0))
    cfg = tiny_config(kind, role, vocab_size)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init gives near-uniform outputs; larger weights make gradients and attributions non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 1 and p.shape[-1] > 1:
                p.mul_(4.0) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_pair(kind: str = "qwen2", seed: int = 0):
    """(teacher, student, tokenizer) sharing one tiny tokenizer."""
    tok = tiny_tokenizer()
    vocab = len(tok)
    return tiny_model(kind, "teacher", vocab, seed), tiny_model(kind, "student", vocab, seed), tok


def save_tiny(model, tok, path) -> str:
    """Save a tiny model + tokenizer as an HF directory (so CLI paths can be exercised on it)."""
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def invoke_cli(args, catch_exceptions: bool = True):
    """Run the ``pkt`` command in this process (typer's CliRunner); returns its Result (exit_code, output).

    The command groups are registered once per process: registering twice would list every group twice.
    """
    from typer.testing import CliRunner

    from pkt.cli import _register, app

    if not any(getattr(g, "name", None) == "analyze" for g in app.registered_groups):
        _register()
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=catch_exceptions)
