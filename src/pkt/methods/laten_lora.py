"""``laten-lora``: the seed paper's PrePKT claim, that pre-alignment reduces the fine-tuning needed afterwards:
the LaTen student of the same task and seed (its delta file survives the pruning of the fused weights), then
exactly ``lora``'s fine-tuning."""

from __future__ import annotations

from pathlib import Path

from pkt.stage import build as build_stage
from pkt.methods.registry import register
from pkt.methods.base import Method, data_setting, finetune_cfg, merged, seeking_cfg, summary


class LatenLoRA(Method):
    name = "laten-lora"
    source = "laten"  # the injected student it fine-tunes (laten-random-lora: LaTen's null's)
    reads = (source,)
    finetunes = True

    def build(self, study, task, seed, inputs):
        from pkt.postpkt import run_postpkt

        c = study.cfg
        laten_ref, _ = study.build(self.source, task, seed, inputs)
        deltas = Path(laten_ref) / "laten_deltas.safetensors"
        ft = finetune_cfg(study, task, seed, self.name)
        payload = {"method": self.name, "task": task, "student": c.student, "finetune": ft.model_dump(),
                   "base_deltas": str(deltas), **data_setting(c)}
        path, _ = study.run_stage(build_stage(self.name, task, seed), payload, lambda d: summary(run_postpkt(
            None, c.student, task, "lora", d / "run", ft, seeking_cfg(study, task), progress=True, log=study.echo,
            data=c.data, base_deltas=deltas), d / "run"),
            reads={"models": [c.student, str(laten_ref)], "data": {task: ["train"]}})
        return merged(path), c.eval_dtype


register(LatenLoRA())
