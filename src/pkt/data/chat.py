"""Chat data: conversations (system turn, multi-turn), prompt rendering, tokenisation with assistant-only labels.

Data. The PKT splits are two-turn :class:`~pkt.data.jsonl.ChatExample` rows (user, assistant). Data a user
brings (``--data``) may be any conversation: an optional first ``system`` turn, then ``user`` and
``assistant`` turns alternating, ending with an assistant turn. :func:`load_chat_data` reads it from a
JSONL file (``{"messages": [...]}`` per line, like the splits) or from a Hugging Face dataset with a
``messages`` column (a ``save_to_disk`` directory, or a hub id when online). Every problem is reported as
``<file>:<line>: ...`` (JSONL) or ``<dataset> row <i>: ...`` (datasets, ``i`` as in ``dataset[i]``).

Two prompt styles:
  * ``"chat"`` (default): the model's own chat template (``tokenizer.apply_chat_template``), which renders
    the system turn as the model was trained to see it (Qwen2.5: ``<|im_start|>system\\n...<|im_end|>``;
    without one, Qwen's template inserts its default system prompt).
  * ``"tulu"``: the format of the PKT papers' training code (open-instruct's Tulu format):
    ``<|system|>\\n{system}\\n`` (only when there is a system turn), then per exchange
    ``<|user|>\\n{user}\\n<|assistant|>\\n{answer}<eos>\\n``. For the two-turn splits this is exactly
    ``<|user|>\\n{user}\\n<|assistant|>\\n{answer}<eos>`` as before.

Labels: ``-100`` everywhere except the assistant turns — all of them (``assistant_turns="all"``, open-instruct's
rule) or only the last (``"last"``) — unless ``train_on_inputs`` (the reference code's flag for MMLU, whose
answer is one letter; it crashes there, here it works). The text is tokenised segment by segment
(prompt, answer, prompt, answer, ...) and concatenated, so each label boundary is exact whatever the BPE
merges would do across it; each answer ends with the end-of-turn token so that a fine-tuned model stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pkt.data.jsonl import ChatExample, parse_messages, read_jsonl_rows
from pkt.errors import DataError, PktError

STYLES = ("chat", "tulu")
ASSISTANT_TURNS = ("all", "last")
IGNORE = -100


@dataclass(frozen=True)
class Conversation:
    """A validated conversation: [system], user, assistant, (user, assistant)*."""

    turns: tuple[tuple[str, str], ...]  # (role, content)
    meta: dict = field(default_factory=dict)

    def messages(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.turns]

    @property
    def user(self) -> str:
        """The last user turn (what the final answer answers)."""
        return next(c for r, c in reversed(self.turns) if r == "user")

    @property
    def assistant(self) -> str:
        """The final answer."""
        return self.turns[-1][1]


def messages_of(example) -> list[dict]:
    return example.messages()


def parse_conversation(obj, where: str) -> Conversation:
    """Validate one row (:func:`pkt.data.jsonl.parse_messages`); ``where`` (file:line or dataset row) starts
    every error message."""
    turns, meta = parse_messages(obj, where)
    return Conversation(turns, meta)


def read_conversations(path: str | Path) -> list[Conversation]:
    """A chat-messages JSONL file of conversations; errors name ``file:line``."""
    return read_jsonl_rows(path, parse_conversation)


def _from_dataset(ds, name: str) -> list[Conversation]:
    if "messages" not in ds.column_names:
        raise DataError(f"{name}: no 'messages' column (columns: {', '.join(ds.column_names)})")
    rows = [parse_conversation(row, f"{name} row {i}") for i, row in enumerate(ds)]
    if not rows:
        raise DataError(f"{name}: empty dataset (no examples)")
    return rows


def load_chat_data(spec: str | Path, split: str = "train") -> list[Conversation]:
    """Conversations from a JSONL file, a ``datasets`` ``save_to_disk`` directory, or a hub dataset id.

    For a dataset with several splits (a ``DatasetDict`` or a hub id) ``split`` is used.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return read_conversations(path)
    import datasets

    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(f"{path}: not a JSONL file nor a dataset saved with save_to_disk") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r} (splits: {', '.join(ds)})")
            ds = ds[split]
        return _from_dataset(ds, f"{path}[{split}]" if split else str(path))
    if path.suffix or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise DataError(f"{spec}: no such file or directory (and not a hub dataset id owner/name)")
    try:
        ds = datasets.load_dataset(spec, split=split)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear line
        raise DataError(f"hub dataset {spec} (split {split!r}) could not be loaded: {str(e).splitlines()[0]}") from None
    return _from_dataset(ds, f"{spec}[{split}]")


# ---- rendering --------------------------------------------------------------------------------------------

def _tulu(messages: list[dict], eos: str, add_generation_prompt: bool) -> str:
    text = ""
    for m in messages:
        if m["role"] == "assistant":
            text += f"<|assistant|>\n{m['content']}{eos}\n"
        else:  # system and user turns are rendered alike, each under its own tag
            text += f"<|{m['role']}|>\n{m['content']}\n"
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def render_prompt(user: str | list[dict], tokenizer, style: str = "chat", assistant_prefix: str = "") -> str:
    """The text the model sees before its answer (ends where the assistant starts writing).

    ``user`` is the user's message, or the whole conversation so far (system and earlier turns included).
    """
    messages = [{"role": "user", "content": user}] if isinstance(user, str) else list(user)
    if style == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise PktError("prompt style 'chat' needs a tokenizer with a chat template; use style 'tulu'")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    elif style == "tulu":
        text = _tulu(messages, tokenizer.eos_token or "", add_generation_prompt=True)
    else:
        raise PktError(f"prompt style {style!r}: expected one of {', '.join(STYLES)}")
    return text + assistant_prefix


def response_suffix(tokenizer, style: str) -> str:
    """What ends an assistant turn, so a fine-tuned model learns to stop: the eos token in both styles
    (chat templates close the turn with it, e.g. Qwen's <|im_end|>)."""
    return tokenizer.eos_token or ""


def render(example, tokenizer, style: str = "chat") -> tuple[str, str]:
    """(prompt, response) texts of the final answer; the response includes the end-of-turn token."""
    msgs = messages_of(example)
    return render_prompt(msgs[:-1], tokenizer, style), msgs[-1]["content"] + response_suffix(tokenizer, style)


def segments(example, tokenizer, style: str = "chat", assistant_turns: str = "all") -> list[tuple[str, bool]]:
    """The conversation as consecutive (text, labelled) pieces: context, answer, context, answer, ...

    Each context piece is what the prompt of the next answer adds to the text so far; that requires the
    template to render a conversation's prefix as a prefix of its rendering (true of Qwen2.5, Llama and the
    Tulu format; templates that rewrite earlier turns are refused).
    """
    if assistant_turns not in ASSISTANT_TURNS:
        raise PktError(f"assistant_turns {assistant_turns!r}: expected one of {', '.join(ASSISTANT_TURNS)}")
    msgs = messages_of(example)
    answers = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    suffix = response_suffix(tokenizer, style)
    # a final answer cut by a generation budget (meta "open_end", e.g. a truncated teacher answer for KD) is
    # not closed: closing it would teach the model to stop mid-answer
    open_end = bool(getattr(example, "meta", None) and example.meta.get("open_end"))
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, a in enumerate(answers):
        prompt = render_prompt(msgs[:a], tokenizer, style)
        if not prompt.startswith(done):
            raise PktError(f"the {style!r} chat template does not render conversation turn {a} as an extension of "
                           "the turns before it; multi-turn labels need a prefix-stable template")
        response = msgs[a]["content"] + ("" if open_end and k == len(answers) - 1 else suffix)
        pieces.append((prompt[len(done):], False))
        pieces.append((response, assistant_turns == "all" or k == len(answers) - 1))
        done = prompt + response
    return pieces


def tokenize_example(
    example,
    tokenizer,
    style: str = "chat",
    max_length: int = 1024,
    train_on_inputs: bool = False,
    assistant_turns: str = "all",
) -> dict[str, list[int]]:
    ids: list[int] = []
    labelled: list[bool] = []
    pieces = segments(example, tokenizer, style, assistant_turns)
    n_last = 0
    for text, lab in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        labelled += [lab] * len(piece)
        n_last = len(piece)
    # Keep the final answer: if too long, cut from the left (oldest context first), and cut the final
    # answer itself from the right only when it alone exceeds max_length.
    if len(ids) > max_length:
        if n_last >= max_length:
            start = len(ids) - n_last
            ids, labelled = ids[start:start + max_length], labelled[start:start + max_length]
        else:
            ids, labelled = ids[len(ids) - max_length:], labelled[len(labelled) - max_length:]
    labels = list(ids) if train_on_inputs else [t if lab else IGNORE for t, lab in zip(ids, labelled)]
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


def batches(examples: list, tokenizer, batch_size: int, style: str = "chat",
            max_length: int = 1024, train_on_inputs: bool = False, padding_side: str = "right",
            assistant_turns: str = "all"):
    """Yield padded batches of tokenised examples in order."""
    feats = [tokenize_example(e, tokenizer, style, max_length, train_on_inputs, assistant_turns) for e in examples]
    for i in range(0, len(feats), batch_size):
        yield collate(feats[i: i + batch_size], tokenizer.pad_token_id, padding_side)


def with_answer(example, answer: str, meta: dict | None = None):
    """The same conversation with its final answer replaced (e.g. by a teacher's answer for KD)."""
    meta = {**example.meta, **(meta or {})}
    if isinstance(example, ChatExample):
        return ChatExample(example.user, answer, meta)
    return Conversation(example.turns[:-1] + (("assistant", answer),), meta)


def data_identity(spec) -> dict | None:
    """What a cached stage's key records of user data: where it is and, for local data, a hash of its content
    (a changed file must not reuse a stage trained on the old one; a hub id is named only)."""
    import hashlib

    if spec is None:
        return None
    path = Path(str(spec)).expanduser()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    if not files:
        return {"source": str(spec)}
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return {"source": str(spec), "sha256": h.hexdigest()}
