"""`python -m deploy.hf_model_dir OUT`: the packaged SmolLM2 GGUF (or --model PATH) as a plain Hugging Face model
directory (safetensors, config, tokenizer), for engines that read no GGUF of a small model well (vLLM CPU).

The weights are dequantized by transformers' GGUF loader and copied into a fresh model of the same config, so
the directory holds float weights and no `quantization_config`: vLLM serves exactly the model prefixroute's
worker serves. Idempotent: an OUT that holds a config.json is left as it is."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def build(out: Path, model: str | None = None) -> Path:
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    from worker.engine.loader import load_model

    loaded = load_model(model, "cpu", "float32")
    fresh = AutoModelForCausalLM.from_config(loaded.model.config, dtype=torch.float32)
    fresh.load_state_dict(loaded.model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.hf_model_dir", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--model", help="a .gguf file or model directory (default: the packaged SmolLM2)")
    args = p.parse_args(argv)
    print(build(args.out, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
