"""Incremental detokenization with stop strings, and the sampler's modes."""

import torch

from worker.engine.sampling import Sampler, SamplingParams
from worker.engine.sequence import TextState

# A toy tokenizer: token id i decodes to PIECES[i]; id 9 is half of a UTF-8 character.
PIECES = {1: "Hello", 2: " wor", 3: "ld", 4: "!", 5: " STO", 6: "P", 7: " end", 8: "é"}


def decode(ids):
    out = "".join(PIECES.get(i, "") for i in ids if i != 9)
    return out + ("\ufffd" if ids and ids[-1] == 9 else "")


def run(ids, stop):
    st = TextState(decode, stop)
    out, stopped = [], False
    for k in range(1, len(ids) + 1):
        delta, stopped = st.update(ids[:k])
        out.append(delta)
        if stopped:
            break
    if not stopped:
        out.append(st.finish())
    return out, stopped


def test_no_stop_streams_everything():
    out, stopped = run([1, 2, 3, 4], [])
    assert "".join(out) == "Hello world!" and not stopped
    assert out[:4] == ["Hello", " wor", "ld", "!"]


def test_stop_string_across_tokens_is_cut_and_never_leaked():
    out, stopped = run([1, 5, 6, 7], [" STOP"])
    assert stopped and "".join(out) == "Hello"
    assert all("STO" not in d for d in out)


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    out, stopped = run([1, 5, 7], [" STOP"])
    assert not stopped and "".join(out) == "Hello STO end"
    assert out[1] == ""  # " STO" was held back while it could still become " STOP"


def test_incomplete_utf8_is_held_back():
    st = TextState(decode, [])
    assert st.update([1, 9]) == ("Hello", False)
    assert st.update([1, 8]) == ("é", False)


def logits():
    return torch.tensor([0.1, 3.0, 2.9, -1.0, 0.5])


def test_greedy_and_top_k_1_pick_argmax():
    assert Sampler(SamplingParams(max_tokens=1, temperature=0.0), torch.device("cpu"))(logits()) == 1
    s = Sampler(SamplingParams(max_tokens=1, temperature=1.0, top_k=1), torch.device("cpu"))
    assert {s(logits()) for _ in range(20)} == {1}


def test_a_temperature_too_small_to_divide_by_is_greedy():
    """1e-300 is a valid temperature (0 to 2), but logits / 1e-300 overflow to inf and the draw fails, taking down
    every request in the engine's step: below 1e-5 sampling is greedy, as in vLLM."""
    for t in (1e-300, 1e-38, 9e-6):
        assert Sampler(SamplingParams(max_tokens=1, temperature=t), torch.device("cpu"))(logits() * 50) == 1
    assert not SamplingParams(max_tokens=1, temperature=1e-5).greedy


def test_top_p_keeps_the_nucleus_only():
    s = Sampler(SamplingParams(max_tokens=1, temperature=1.0, top_p=0.6), torch.device("cpu"))
    assert {s(logits()) for _ in range(50)} <= {1, 2}


def test_seed_reproduces_and_unseeded_varies():
    flat = torch.zeros(1000)
    a = Sampler(SamplingParams(max_tokens=1, temperature=1.0, seed=7), torch.device("cpu"))
    b = Sampler(SamplingParams(max_tokens=1, temperature=1.0, seed=7), torch.device("cpu"))
    assert [a(flat) for _ in range(10)] == [b(flat) for _ in range(10)]
    c = Sampler(SamplingParams(max_tokens=1, temperature=1.0), torch.device("cpu"))
    assert len({c(flat) for _ in range(10)}) > 1
