"""Knowledge-distillation baseline: language-based transfer, for comparison with parametric transfer.

The teacher answers the training prompts (greedy, batched); the student is then LoRA-fine-tuned on those
answers with exactly the budget of the ``lora`` baseline (sequence-level KD, "online distillation" in
the Seeking paper's terms). Only the *data* differs from plain LoRA SFT, so any gap between the two is the
effect of learning from the teacher's text instead of the gold answers.
"""

from __future__ import annotations

from pkt.data.chat import render_prompt
from pkt.data.jsonl import ChatExample


def teacher_answers(teacher, tokenizer, examples: list[ChatExample], *, style: str = "chat",
                    max_new_tokens: int = 256, batch_size: int = 8, progress: bool = True) -> list[ChatExample]:
    """The same prompts with the teacher's greedy answers in place of the gold ones."""
    from pkt.evaluate.generate import generate

    prompts = [render_prompt(e.user, tokenizer, style) for e in examples]
    outs = generate(teacher, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    temperature=0.0, progress=progress, desc="teacher answers (KD data)")
    return [ChatExample(e.user, o[0].strip(), {**e.meta, "answer_source": "teacher"}) for e, o in zip(examples, outs)]
