"""Models: the embedded registry, loading/caching, and the architecture adapter (ArchSpec)."""

from pkt.models.arch import ArchSpec
from pkt.models.load import assert_same_tokenizer, load_model, load_tokenizer, prepare

__all__ = ["ArchSpec", "assert_same_tokenizer", "load_model", "load_tokenizer", "prepare"]
