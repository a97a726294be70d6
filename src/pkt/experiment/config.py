"""The experiment file: teacher, student, tasks, methods, seeds and the budget of every stage.

``pkt run CONFIG.yaml`` validates it into :class:`ExperimentConfig` (unknown keys are errors). The budget
fields are the knobs that decide run time; configs/default.yaml sizes them for ≤ 15 min on 2 CPU cores.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from pkt.config import Settings
from pkt.data.tasks import TASKS

# The default method set, in the order a study runs and reports them. Any method registered in pkt.methods (one
# file each) may be named in a config; this is only what ``methods:`` defaults to.
ALL_METHODS: tuple[str, ...] = ("student", "teacher", "lora", "pissa", "seeking", "seeking-random", "seeking-shuffled",
                                "laten", "laten-lora", "seqkd", "gkd")
# old method names still accepted in a config, with a warning
RENAMED_METHODS = {"kd": "seqkd"}


class Budget(Settings):
    # PostPKT / baselines fine-tuning (paper: r=16, α=16, lr 3e-4, 1000 examples, 5 epochs, batch 64)
    train_examples: int = Field(1000, ge=1)
    epochs: float = Field(5, gt=0)
    batch_size: int = Field(8, ge=1)
    lr: float = 3e-4
    rank: int = Field(16, ge=1)
    alpha: float = 16
    # LoRA dropout: None = each init's own (0.05; 0 for PiSSA, whose adapter holds the student's principal
    # components, so dropout there perturbs the model rather than the update: pkt.align.lora_init)
    dropout: float | None = Field(None, ge=0, lt=1)
    max_length: int = Field(768, ge=16)
    # PiSSA's SVD: None = exact (the paper); K = peft's randomised pissa_niter_K (same output-preserving
    # split W = W_res + BA, top-r subspace approximate), also used for the analysis' PiSSA init
    pissa_niter: int | None = Field(None, ge=1)
    # Seeking extraction
    extract_samples: int = Field(20, ge=1)
    # LaTen (paper: P=16, rate 0.1, λ=1000, step from S3 Table 4). Which (step, rate) is applied:
    # "paper" = the paper's step for the task (pkt.laten.PAPER_STEPS) at laten_rate; "select" = train
    # laten_select_steps steps and pick the step (1..laten_select_steps) × rate (laten_select_rates) with the
    # lowest LM loss on the first laten_select_examples align examples; "fixed" = laten_steps at laten_rate
    laten_choice: Literal["paper", "select", "fixed"] = "paper"
    laten_steps: int = Field(4, ge=1)
    laten_select_steps: int = Field(8, ge=1)
    laten_select_rates: list[Annotated[float, Field(gt=0, le=1)]] = Field([0.1, 0.3, 0.5, 0.7, 0.9, 1.0], min_length=1)
    laten_select_examples: int = Field(16, ge=1)
    # also score the grid (steps 1..trained × laten_select_rates, on laten_select_examples align examples)
    # when the point is the paper's or fixed: a record of how LaTen's effect varies with step and rate,
    # the applied point unchanged
    laten_grid: bool = False
    # the OneCycle schedule spans the steps trained ("trained") or the whole extract split ("extract",
    # the reference's; at a budget of fewer steps than extract examples the lr then stays near lr/25)
    laten_schedule: Literal["trained", "extract"] = "trained"
    laten_batch: int = Field(16, ge=1)
    laten_rate: float = Field(0.1, gt=0, le=1)  # the share of neurons located: in training and at the apply
    # the apply's rate when it differs from the training's (None: laten_rate), and the alignment penalty λ: a
    # point that `pkt study laten-dose` selected (trained at one rate, applied at another; λ 1000 or none)
    laten_apply_rate: Annotated[float, Field(gt=0, le=1)] | None = None
    laten_penalty: float = Field(1000.0, ge=0)
    laten_lr: float = 3e-4
    # knowledge distillation: teacher answers for the train prompts
    kd_max_new_tokens: int = Field(256, ge=1)
    # teacher answers still going at kd_max_new_tokens: dropped, or kept without the end-of-turn token
    kd_truncated: Literal["drop", "keep"] = "drop"
    # on-policy distillation (GKD; the authors' baseline: lmbda 1 = always the student's own samples, beta 0
    # = forward KL), on the LoRA of the fine-tuning budget; continuations up to gkd_max_new_tokens tokens
    gkd_lmbda: float = Field(1.0, ge=0, le=1)
    gkd_beta: float = Field(0.0, ge=0, le=1)
    gkd_temperature: float = Field(0.9, gt=0)
    gkd_max_new_tokens: int = Field(128, ge=1)
    # function-transfer and its nulls (docs/methods.md §9.2; the defaults are pkt.transfer.function_transfer's
    # TransferConfig's): calibration examples of the extract split (None: extract_samples, Seeking's), the
    # student update's ridge and the output map's (each relative to its Gram's trace per width), the map
    # (ridge least squares | procrustes), the monotone CKA layer pairing (else each student layer's own best
    # teacher layer), and a rank cap on each update (None: full rank)
    transfer_examples: int | None = Field(None, ge=1)
    transfer_ridge: float = Field(1e-2, gt=0)
    transfer_map: Literal["ridge", "procrustes"] = "ridge"
    transfer_map_ridge: float = Field(1e-2, gt=0)
    transfer_monotone: bool = True
    transfer_rank: int | None = Field(None, ge=1)
    # Seeking and its controls also transfer embed_tokens and lm_head (the reference's extra targets; needs
    # one vocabulary and a student with untied embeddings)
    seeking_embeddings: bool = False
    # evaluation
    eval_limit: int | None = Field(None, ge=1)
    # the seed of the evaluation subset: None = each training seed draws its own (with eval_limit); a number =
    # one subset for every seed, so that the vanilla models (student, teacher), whose greedy answers do not
    # depend on the seed, are evaluated once and stand for every seed
    eval_seed: int | None = None
    eval_max_new_tokens: int = Field(512, ge=1)
    eval_batch_size: int = Field(8, ge=1)
    # greedy decoding engine (pkt.evaluate.generate): "continuous" = pkt's running batch, which does not make
    # a batch wait for its longest answer (same answers as "padded"; docs/benchmarks.md P9)
    eval_decoding: Literal["padded", "continuous"] = "padded"
    # how each task is prompted and scored (pkt eval --protocol): "pkt" = the PKT papers' format, "standard" =
    # lm-eval's and the model maker's, or a mix such as "pkt,gsm8k=lm-eval-cot" (docs/evaluation.md)
    eval_protocol: str = "pkt"
    # GSM8K / MMLU exemplars in the prompt (None: the protocol's own; pkt's GSM8K with 8 = the PKT papers' 8-shot
    # chain of thought, the exemplars in the training answers' own wording)
    eval_shots: int | None = Field(None, ge=0)
    loss_examples: int = Field(80, ge=1)
    # loss on the prompt tokens too (LaTen's README: MMLU needs it, its answer is one letter); read by
    # fine-tuning (LoRA, PiSSA, Seeking, KD) and Seeking's sensitivity
    train_on_inputs: bool = False

    @field_validator("eval_protocol")
    @classmethod
    def _known_protocol(cls, v: str) -> str:
        from pkt.evaluate.tasks.common import parse_protocol

        parse_protocol(v)  # a ValueError naming the unknown task or protocol becomes a settings error
        return v

    @model_validator(mode="after")
    def _apply_rate_of_a_fixed_point(self):
        if self.laten_apply_rate is not None and self.laten_choice == "select":
            raise ValueError("laten_apply_rate: laten_choice 'select' chooses the rate itself (laten_select_rates); "
                             "use 'paper' or 'fixed'")
        return self


STAGE_KINDS = ("extract", "kd-data", "finetune", "gkd", "laten", "eval", "analysis")


class StageResources(Settings):
    """What one stage asks of a Ray cluster under ``pkt run --executor ray`` (the sequential executor runs
    every stage in its own process and ignores it). No GPU requested: the stage runs on CPUs only."""

    gpus: float = Field(0, ge=0)
    cpus: float = Field(1, ge=0)
    memory_gb: float | None = Field(None, gt=0)  # reserved on the node (Ray's ``memory``); None: no reservation
    # torch threads inside the stage; None: as many as the driver uses, so CPU stages give bit-identical
    # results to the sequential executor's (float reductions depend on the thread count)
    threads: int | None = Field(None, ge=1)


class ExperimentConfig(Settings):
    name: str = "pkt-study"
    teacher: str = "qwen2.5-coder-1.5b-instruct"
    student: str = "qwen2.5-coder-0.5b-instruct"
    tasks: list[str] = ["gsm8k"]
    methods: list[str] = list(ALL_METHODS)
    seeds: list[int] = [0]
    dtype: Literal["float32", "bfloat16"] = "float32"
    # the fine-tuned arms' arithmetic (pkt.align.finetune): "bf16" = forward and backward under bf16 autocast over
    # the float32 weights, whose update and merged model stay float32; "auto" (for demos) = bf16 where this CPU's bf16
    # matrix products are faster (pkt.machine), else "none"
    autocast: Literal["none", "bf16", "auto"] = "none"
    # "auto" (for demos: a study pins its dtypes so that its records compare across machines) is resolved when
    # the config is read, to the dtype whose matrix products run faster on this machine (pkt.machine)
    teacher_dtype: Literal["float32", "bfloat16", "auto"] = "bfloat16"
    # every model (teacher, vanilla and transferred students) is evaluated in this dtype, so the comparison
    # is fair; bf16 is faster on CPUs with AMX and on GPUs, slower than fp32 on AVX-512 alone (P6)
    eval_dtype: Literal["float32", "bfloat16", "auto"] = "bfloat16"
    style: Literal["chat", "tulu"] = "chat"
    analysis: bool = True
    analysis_examples: int = Field(8, ge=2)
    budget: Budget = Budget()
    # per-task changes to the budget (the paper's epochs / lr / train size / seed samples differ by task);
    # a task's budget is `budget` updated by `per_task[task]`, validated like `budget`
    per_task: dict[str, dict] = {}
    # a learning rate per fine-tuned method, in place of the budget's (and per_task's) lr for that method: each
    # init at the rate selected for it on held-out data (`pkt study pilot`), e.g. {seeking-shuffled: 1.0e-4}
    method_lrs: dict[str, Annotated[float, Field(gt=0)]] = {}
    # merged / fused model weights are deleted once evaluated (the stage is rebuilt if ever needed again);
    # true keeps them (each is a full copy of the student)
    keep_checkpoints: bool = False
    # a built model is evaluated in eval_dtype only if at least this fraction of the entries it changed
    # (vs the student) survive the cast to eval_dtype; otherwise in float32 (pkt.evaluate.precision)
    eval_min_surviving: float = Field(0.5, ge=0, le=1)
    # run generated code with rlimits only when namespaces / a dedicated uid are unavailable
    allow_weak_sandbox: bool = False
    # each training loop's per-step log besides its own JSONL (pkt.tracking): tensorboard, offline under the
    # stage directory | trackio | wandb | mlflow | none
    report_to: str = "tensorboard"
    # training data of the fine-tuned arms (lora, pissa, seeking and its controls) in place of each task's train
    # split: chat JSONL, a `datasets` save_to_disk directory or a hub dataset id with a `messages` column
    data: str | None = None
    # a directory (relative: to the current directory) that receives each stage's small result record as it
    # finishes, plus study.json and, at the end, the report: committable, so that `pkt report DIR` rebuilds the
    # results on any machine (pkt.experiment.records). Where results are copied to, not what they are: no stage
    # key reads it
    records: str | None = None

    @field_validator("report_to")
    @classmethod
    def _tracker(cls, v):
        from pkt.errors import PktError
        from pkt.tracking import check_report_to

        try:
            return check_report_to(v)
        except PktError as e:
            raise ValueError(str(e)) from None

    @field_validator("data")
    @classmethod
    def _data_reads(cls, v):
        from pkt.data.chat import load_chat_data
        from pkt.errors import PktError

        if v is not None:  # read and validated now, before any stage runs
            try:
                load_chat_data(v)
            except PktError as e:
                raise ValueError(str(e)) from None
        return v
    # `pkt run --executor ray`: per stage kind (extract, kd-data, finetune = LoRA/PiSSA/Seeking/SeqKD builds,
    # gkd, laten, eval, analysis; "default" for the rest) the GPUs, CPUs and memory a stage asks for
    resources: dict[Literal["default", *STAGE_KINDS], StageResources] = {}
    # how often Ray retries a stage whose worker died (a stage that raises is not retried)
    stage_retries: int = Field(2, ge=0)

    @field_validator("teacher_dtype", "eval_dtype")
    @classmethod
    def _auto_dtype(cls, v):
        if v != "auto":
            return v
        from pkt.machine import fastest_dtype

        return fastest_dtype()[0]  # the stage keys and the manifest then carry the dtype actually used

    @field_validator("autocast")
    @classmethod
    def _auto_autocast(cls, v):
        if v != "auto":
            return v
        from pkt.machine import fastest_dtype

        return "bf16" if fastest_dtype()[0] == "bfloat16" else "none"  # the stage keys carry what was used

    def resources_for(self, kind: str) -> StageResources:
        """The request of one stage kind: ``resources[kind]``, else ``resources.default``, else 1 CPU."""
        return self.resources.get(kind) or self.resources.get("default") or StageResources()

    def lr_for(self, task: str, method: str) -> float:
        """The learning rate ``method`` fine-tunes at on ``task``: ``method_lrs[method]``, else the task's budget's."""
        return self.method_lrs.get(method, self.budget_for(task).lr)

    def budget_for(self, task: str) -> Budget:
        """The budget of one task: ``budget`` updated by ``per_task[task]``."""
        extra = self.per_task.get(task)
        return Budget.model_validate({**self.budget.model_dump(), **extra}) if extra else self.budget

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v):
        bad = [t for t in v if t not in TASKS]
        if bad:
            raise ValueError(f"unknown task(s) {bad}; known: {list(TASKS)}")
        if not v:
            raise ValueError("at least one task")
        return v

    @field_validator("per_task")
    @classmethod
    def _per_task_budgets(cls, v, info):
        from pydantic import ValidationError

        base = info.data.get("budget") or Budget()
        for task, extra in v.items():
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; known: {list(TASKS)}")
            try:
                Budget.model_validate({**base.model_dump(), **extra})
            except ValidationError as e:
                err = e.errors()[0]
                raise ValueError(f"{task}.{'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None
        return v

    @field_validator("method_lrs")
    @classmethod
    def _fine_tuned(cls, v, info):
        from pkt.methods import REGISTRY

        methods = info.data.get("methods")
        for m in v:
            # when `methods` itself failed validation its own error says so; a second one here would mislead
            if methods is not None and m not in methods:
                raise ValueError(f"{m}: not among the study's methods")
            if m in REGISTRY and not REGISTRY[m].finetunes:
                raise ValueError(f"{m}: fine-tunes nothing, so it has no learning rate")
        return v

    @field_validator("methods", mode="before")
    @classmethod
    def _renamed(cls, v):
        import warnings

        if isinstance(v, list):
            for old, new in RENAMED_METHODS.items():
                if old in v:
                    warnings.warn(f"methods: {old!r} is now called {new!r}; read as {new!r}", FutureWarning,
                                  stacklevel=2)
            v = [RENAMED_METHODS.get(m, m) if isinstance(m, str) else m for m in v]
        return v

    @field_validator("methods")
    @classmethod
    def _student_first(cls, v):
        from pkt.methods import REGISTRY  # a method is known when its file registered it

        # a companion (the float32 student) comes with its method and is not listed on its own
        bad = [m for m in v if m not in REGISTRY or REGISTRY[m].companion_of]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; known: "
                             f"{', '.join(k for k, m in REGISTRY.items() if not m.companion_of)}")
        if len(set(v)) != len(v):
            raise ValueError(f"a method is listed twice: {v}")
        if "student" not in v:
            raise ValueError("'student' must be among the methods: every difference is measured against it")
        return v
