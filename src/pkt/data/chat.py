"""Prompt rendering and tokenisation with response-only labels.

Two prompt styles:
  * ``"chat"`` (default): the model's own chat template (``tokenizer.apply_chat_template``).
  * ``"tulu"``: the format of the PKT papers' training code, ``<|user|>\\n{user}\\n<|assistant|>\\n``.

Labels are ``-100`` on the prompt unless ``train_on_inputs`` (the reference code's flag for MMLU, whose
answer is one letter; it crashes there, here it works). Prompt and response are tokenised separately and
concatenated, so the label boundary is exact whatever the BPE merges would do across it.
"""

from __future__ import annotations

import torch

from pkt.data.jsonl import ChatExample
from pkt.errors import PktError

STYLES = ("chat", "tulu")
IGNORE = -100


def render_prompt(user: str, tokenizer, style: str = "chat", assistant_prefix: str = "") -> str:
    """The text the model sees before its answer (ends where the assistant starts writing)."""
    if style == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise PktError("prompt style 'chat' needs a tokenizer with a chat template; use style 'tulu'")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    elif style == "tulu":
        text = f"<|user|>\n{user}\n<|assistant|>\n"
    else:
        raise PktError(f"prompt style {style!r}: expected one of {', '.join(STYLES)}")
    return text + assistant_prefix


def response_suffix(tokenizer, style: str) -> str:
    """What ends an assistant turn, so a fine-tuned model learns to stop: the eos token in both styles
    (chat templates close the turn with it, e.g. Qwen's <|im_end|>)."""
    return tokenizer.eos_token or ""


def render(example: ChatExample, tokenizer, style: str = "chat") -> tuple[str, str]:
    """(prompt, response) texts; the response includes the end-of-turn token."""
    return render_prompt(example.user, tokenizer, style), example.assistant + response_suffix(tokenizer, style)


def tokenize_example(
    example: ChatExample,
    tokenizer,
    style: str = "chat",
    max_length: int = 1024,
    train_on_inputs: bool = False,
) -> dict[str, list[int]]:
    prompt, response = render(example, tokenizer, style)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    # Keep the answer: if too long, cut the prompt from the left, then the response from the right.
    keep_prompt = max(0, min(len(p_ids), max_length - len(r_ids)))
    p_ids = p_ids[len(p_ids) - keep_prompt:]
    r_ids = r_ids[: max_length - len(p_ids)]
    ids = p_ids + r_ids
    labels = list(ids) if train_on_inputs else [IGNORE] * len(p_ids) + list(r_ids)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def collate(features: list[dict], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of tokenised examples into a batch (labels padded with -100)."""
    width = max(len(f["input_ids"]) for f in features)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        n = width - len(f["input_ids"])
        pads = {"input_ids": [pad_id] * n, "attention_mask": [0] * n, "labels": [IGNORE] * n}
        for key in out:
            seq = f.get(key, f["input_ids"] if key == "labels" else None)
            out[key].append(pads[key] + list(seq) if padding_side == "left" else list(seq) + pads[key])
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def batches(examples: list[ChatExample], tokenizer, batch_size: int, style: str = "chat",
            max_length: int = 1024, train_on_inputs: bool = False, padding_side: str = "right"):
    """Yield padded batches of tokenised examples in order."""
    feats = [tokenize_example(e, tokenizer, style, max_length, train_on_inputs) for e in examples]
    for i in range(0, len(feats), batch_size):
        yield collate(feats[i: i + batch_size], tokenizer.pad_token_id, padding_side)
