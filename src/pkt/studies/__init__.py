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
=========================  ==========================  ===================================================

``pilot`` is the one that computes: it runs (and resumes) a small study of its own, plain LoRA by training budget
with the lr chosen on held-out data, and reports it from its committed records (docs/pilot.md).
"""
