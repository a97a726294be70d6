"""Post-hoc analyses of finished studies: what docs/results.md reports beyond the study's own tables.

Each reads a study's committed records (``docs/results/<study>/``) or a run directory's stages and prints what
the doc quotes, so that a reader reruns a claim instead of trusting it. One module per analysis, each a
``pkt study`` command (``pkt study NAME --help``; ``python -m pkt.studies.MODULE`` runs the same ``main``):

=========================  ==========================  ===================================================
command                    module                      what it prints
=========================  ==========================  ===================================================
``compare``                ``compare_studies``         the same arm in two studies (a control), paired
``compare-predictions``    ``compare_predictions``     two code evaluations question by question; digests
``compare-records``        ``compare_records``         two evaluation records on their common items
``table``                  ``results_table``           the short per-task table docs/results.md quotes
``gsm8k-first-answer``     ``gsm8k_first_answer``      GSM8K scored at the first stated answer
``adapter-update``         ``adapter_update``          ‖ΔW‖/‖W‖ of saved adapters
``representation-depth``   ``representation_depth``    representation similarity by student depth
``pilot``                  ``pilot``                   runs the pilot curve (LoRA by budget); its report
``steps-saved``            ``steps_saved``             runs held-out loss curves by step; steps saved
``laten-dose``             ``laten_dose``              runs LaTen's dose grid; the held-out-chosen point
=========================  ==========================  ===================================================

``pilot``, ``steps-saved`` and ``laten-dose`` are the ones that compute: each runs (and resumes) a small study of
its own and reports it from its committed records. ``pilot``: plain LoRA by training budget with the lr chosen on held-out
data (docs/pilot.md); ``steps-saved``: laten-lora against lora on the same batches, their loss on one held-out
set at chosen optimizer steps and the steps each takes to reach LoRA's final held-out loss (docs/steps-saved.md);
``laten-dose``: LaTen's held-out loss by hypernetwork step, schedule, transfer rate and penalty, the point chosen on
held-out data and tested against the student over seeds (docs/laten-dose.md).
"""
