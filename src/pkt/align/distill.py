"""Sequence-level knowledge distillation (SeqKD): language-based transfer, for comparison with parametric transfer.

The teacher answers the training prompts (greedy, batched) to completion within a token budget; the
student is then LoRA-fine-tuned on those answers with exactly the budget of the ``lora`` baseline
(sequence-level KD, "online distillation" in the Seeking paper's terms). Only the *data* differs from
plain LoRA SFT, so any gap between the two is the effect of learning from the teacher's text instead of
the gold answers.

An answer that reaches the budget without the end-of-turn token is cut mid-answer. Closing it with the
end-of-turn token (what a plain SFT on the text does) would teach the student to stop mid-answer, so such
answers are either dropped (``truncated: drop``, the default) or kept open, without the end-of-turn token
(``truncated: keep``; :func:`pkt.data.chat.segments` honours the ``open_end`` meta flag). The counts of
finished, dropped and open answers are recorded with the data. On-policy distillation (GKD) is
:mod:`pkt.align.gkd`.

Used by ``pkt run`` (one process) and ``pkt kd`` (also under ``accelerate launch``). With several
processes the teacher's generation is split, not repeated: the prompts are cut into the same batches as in
one process and process r answers every world-th batch; the answers are then gathered on every process.
Because the batches (and so the padding) are those of a 1-process run, the answers are identical to it.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch
from typing import Literal

from pydantic import Field

from pkt.config import Settings
from pkt.data.chat import render_prompt, with_answer
from pkt.data.jsonl import ChatExample
from pkt.errors import PktError
from pkt.seeding import seed_everything

KD_FILE = "kd_train.jsonl"
KD_META = "kd_data.json"


TRUNCATED = ("drop", "keep")


class KDConfig(Settings):
    """Teacher-side settings of the KD data (the student side is a :class:`~pkt.align.finetune.FinetuneConfig`)."""

    max_new_tokens: int = Field(256, ge=1)  # budget: an answer still going after this many tokens is truncated
    truncated: Literal["drop", "keep"] = "drop"  # truncated answers: dropped, or kept without end-of-turn
    batch_size: int = Field(8, ge=1)  # prompts per generation batch
    dtype: str = "float32"  # teacher weights


def budget_policy(rows: list[ChatExample], truncated: str) -> tuple[list[ChatExample], dict]:
    """(training rows, counts) from teacher answers flagged ``finished``: truncated ones dropped or kept open."""
    if truncated not in TRUNCATED:
        raise PktError(f"truncated {truncated!r}: expected one of {', '.join(TRUNCATED)}")
    done = [r for r in rows if r.meta.get("finished", True)]
    cut = [r for r in rows if not r.meta.get("finished", True)]
    if truncated == "drop":
        kept = done
    else:  # keep the order of the prompts
        kept = [r if r.meta.get("finished", True) else with_answer(r, r.assistant, {"open_end": True})
                for r in rows]
    counts = {"answers": len(rows), "finished": len(done), "truncated": len(cut),
              "dropped": len(cut) if truncated == "drop" else 0, "kept_open": len(cut) if truncated == "keep" else 0,
              "train_rows": len(kept)}
    if not kept:
        raise PktError(f"every one of the {len(rows)} teacher answers hit the generation budget and was dropped; "
                       "raise max_new_tokens (kd_max_new_tokens) or keep truncated answers")
    return kept, counts


def teacher_answers(teacher, tokenizer, examples: list[ChatExample], *, style: str = "chat",
                    max_new_tokens: int = 256, batch_size: int = 8, progress: bool = True) -> list[ChatExample]:
    """The same prompts with the teacher's greedy answers in place of the gold ones.

    Each answer's meta says whether it ``finished`` (the teacher emitted an end-of-sequence token within
    ``max_new_tokens``) or was cut by the budget. Under ``accelerate launch`` every process must call this
    (it ends in a collective gather); each process generates only its share of the batches and all of
    them return the full list.
    """
    from tqdm.auto import tqdm

    from pkt.dist import dist_state

    state = dist_state()
    world, rank = state.num_processes, state.process_index
    # the conversation up to its final answer (system and earlier turns included), which the teacher replaces
    prompts = [render_prompt(e.messages()[:-1], tokenizer, style) for e in examples]
    # Longest first, in fixed batches: the order generate() itself uses, made explicit here so that a batch
    # holds the same prompts whatever the number of processes (left padding, hence the logits, depend on it).
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    answers: dict[int, tuple[str, bool]] = {}
    bar = tqdm(total=len(prompts), desc="teacher answers (KD data)", unit="prompt",
               disable=not progress or not state.is_main_process)
    for k in range(0, len(batches), world):  # one round: a batch for each process (the last may lack some)
        turn = batches[k:k + world]
        if rank < len(turn):
            b = turn[rank]
            outs = greedy_answers(teacher, tokenizer, [prompts[i] for i in b], max_new_tokens)
            answers.update(zip(b, outs))
        bar.update(sum(map(len, turn)))  # the other processes advance at about the same pace
    bar.close()
    if world > 1:
        from accelerate.utils import gather_object

        for part in gather_object([answers]):
            answers.update(part)
    return [with_answer(e, answers[i][0].strip(), {"answer_source": "teacher",
                                                         "finished": answers[i][1]})
            for i, e in enumerate(examples)]


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[tuple[str, bool]]:
    """(answer text, finished) for one left-padded batch: greedy, stopped by the model's end tokens.

    The decoding of :func:`pkt.evaluate.generate.generate` at temperature 0, plus whether each answer
    ended with an end token before the budget (generate() returns the text only).
    """
    from pkt.evaluate.generate import _eos_ids, encode_left_padded

    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    batch = encode_left_padded(tokenizer, prompts, next(model.parameters()).device)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=pad,
                         eos_token_id=eos, do_sample=False, temperature=None, top_p=None, top_k=None)
    new = out[:, batch["input_ids"].shape[1]:]
    finished = [any(t in eos for t in row) for row in new.tolist()]
    return list(zip(tokenizer.batch_decode(new, skip_special_tokens=True), finished))


def _reusable(path: Path, meta: dict, examples: list[ChatExample]) -> list[ChatExample] | str:
    """The cached answers at ``path`` if they were made for these prompts and settings, else why not."""
    import json

    from pkt.data.chat import read_conversations

    meta_path = path.with_name(KD_META)
    if meta_path.is_file():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        diff = [f"{k}={old.get(k)!r} (now {v!r})" for k, v in meta.items() if old.get(k) != v]
        if diff:
            return f"{path} was generated with {', '.join(diff)}; delete it or use another --out"
    rows = read_conversations(path)
    if [r.messages()[:-1] for r in rows] != [e.messages()[:-1] for e in examples]:
        return (f"{path}: its {len(rows)} prompts are not the {len(examples)} selected training prompts; "
                "delete it or use another --out")
    return rows


def kd_data(teacher_ref, examples: list[ChatExample], path: str | Path, cfg: KDConfig, *, style: str,
            meta: dict | None = None, progress: bool = True, log=print) -> tuple[list[ChatExample], bool]:
    """(teacher answers for ``examples``, whether they were reused) — cached in the JSONL file ``path``.

    A present file is reused (a re-run resumes after generation) if it holds the same prompts and its
    sidecar ``kd_data.json`` records the same teacher settings. Only the main process touches the files:
    it decides and broadcasts, so every process agrees and no shared filesystem is needed.
    """
    from pkt.dist import dist_state
    from pkt.data.jsonl import write_chat_jsonl
    from pkt.io import write_json
    from pkt.models.load import load_model, load_tokenizer

    state = dist_state()
    path = Path(path)
    meta = {"teacher": str(teacher_ref), "n": len(examples), "style": style, "max_new_tokens": cfg.max_new_tokens,
            "dtype": cfg.dtype, "answers": "to completion within max_new_tokens, flagged finished", **(meta or {})}
    found: list[ChatExample] | str | None = None
    if state.is_main_process and path.is_file():
        try:
            found = _reusable(path, meta, examples)
        except PktError as e:  # a damaged file: every process must fail, not only this one
            found = str(e)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        found = broadcast_object_list([found])[0]
    if isinstance(found, str):
        raise PktError(found)
    if found is not None:
        log(f"reusing {len(found)} teacher answers from {path}")
        return found, True
    t0 = time.perf_counter()
    tok = load_tokenizer(teacher_ref)  # left padding, for batched generation
    # each process holds a whole teacher on its own device (as `pkt run` does on the CPU)
    teacher = load_model(teacher_ref, dtype=cfg.dtype,
                         device_map=None if state.device.type == "cpu" else {"": state.device})
    log(f"teacher answers for {len(examples)} prompts ({state.num_processes} process(es))")
    rows = teacher_answers(teacher, tok, examples, style=style, max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.batch_size, progress=progress)
    del teacher  # the student trains next; the teacher's memory is needed back
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if state.is_main_process:
        # the sidecar first: the JSONL (renamed into place) is what marks the data as complete
        write_json(path.with_name(KD_META), {**meta, "seconds": round(time.perf_counter() - t0, 1)})
        write_chat_jsonl(rows, path)
    return rows, False


def distill_finetune(student_ref, examples: list[ChatExample], ft, out: str | Path, extra: dict | None = None,
                     progress: bool = True) -> dict:
    """SeqKD: LoRA SFT of the student on the teacher's answers with the ``lora`` baseline's init and budget.

    ``examples`` are the training rows after :func:`budget_policy` (truncated answers dropped or open).

    The body ``pkt run`` and ``pkt kd`` share; works under ``accelerate launch`` (see
    :func:`pkt.align.finetune.train_and_save`). Returns the training summary.
    """
    from pkt.align.finetune import train_and_save
    from pkt.align.lora_init import make_lora_model
    from pkt.models.load import load_model, load_tokenizer

    seed_everything(ft.seed)  # the LoRA A init draws from the global RNGs
    tok = load_tokenizer(student_ref, padding_side="right")
    model = make_lora_model(load_model(student_ref, dtype=ft.dtype), "lora", ft.targets, ft.r, ft.alpha, ft.dropout)
    return train_and_save(model, tok, examples, ft, "lora", out,
                          extra={"method": "seqkd", "student": str(student_ref), **(extra or {})},
                          progress=progress)
