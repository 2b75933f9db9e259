"""GGUF -> Hugging Face folder, for engines (vLLM on CPU) that cannot load GGUF.

Run as ``python -m cluster.convert FILE.gguf OUT_DIR`` (``cluster.model`` does this in a child
process). transformers dequantizes the GGUF weights to float32; a GGUF-loaded model refuses
``save_pretrained``, so the weights move into a fresh model built from the same config with the
quantization config removed, and that one is saved with the tokenizer and generation config.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def _add_bos_token(gguf_file: Path) -> bool:
    """The GGUF's own ``tokenizer.ggml.add_bos_token`` (transformers does not read it)."""
    import gguf

    field = gguf.GGUFReader(str(gguf_file)).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.contents()) if field is not None else False


def convert(gguf_file: Path, out: Path) -> None:
    """Write a Hugging Face folder for ``gguf_file`` into ``out`` (which must not exist)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, add_bos_token=_add_bos_token(gguf_file))
    loaded: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    auto: Any = AutoModelForCausalLM
    model: Any = auto.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing = [k for k in result.missing_keys if k not in getattr(model, "_tied_weights_keys", ())]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {result.unexpected_keys}")
    del loaded
    out.mkdir(parents=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    try:
        GenerationConfig.from_pretrained(folder, gguf_file=name).save_pretrained(str(out))
    except (OSError, ValueError):
        model.generation_config.save_pretrained(str(out))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m cluster.convert FILE.gguf OUT_DIR", file=sys.stderr)
        return 2
    convert(Path(argv[0]), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
