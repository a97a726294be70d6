"""pkt: cross-scale Parametric Knowledge Transfer (PKT) between large language models.

Locate task knowledge in a larger *teacher* LM, align it to a smaller *student*, inject it through
parameters, then evaluate and analyse why it does (or does not) transfer. See README.md.
"""

__version__ = "0.1.0"
