"""Neural-incompatibility analysis: parametric, representation and behavioural similarity.

* :mod:`pkt.analyse.similarity` - pure tensor measures (flattened cosine, linear / debiased CKA, RSA).
* :mod:`pkt.analyse.params` - LoRA-init and injected-delta similarity to the student's weights.
* :mod:`pkt.analyse.lora_inits` - the LoRA inits `pkt analyze params` compares: a saved adapter or PiSSA/Seeking
  built in process, measured and written to params.json/png.
* :mod:`pkt.analyse.representations` - teacher-layer × student-layer similarity of module outputs.
* :mod:`pkt.analyse.behaviour` - per-token KL(teacher‖student) and top-1 agreement.
* :mod:`pkt.analyse.plots` - matplotlib figures (imported lazily).
"""

from pkt.analyse.similarity import (
    cka_from_grams,
    cosine_matrix,
    flat_cosine,
    layer_vectors,
    linear_cka,
    pairwise,
    rsa,
    similarity_matrix,
)

__all__ = ["cka_from_grams", "cosine_matrix", "flat_cosine", "layer_vectors", "linear_cka", "pairwise", "rsa",
           "similarity_matrix"]
