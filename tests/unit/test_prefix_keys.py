"""Routing keys and block chains from the real SmolLM2 tokenizer: tenant-scoped, prompt_cache_key-scoped, only
the first P tokens tokenized, a conversation's turns extending one chain, explicit sessions."""

from __future__ import annotations

import pytest

from protocol.modelfiles import default_model_path, load_tokenizer
from protocol.openai import ChatCompletionRequest, CompletionRequest
from router.prefix import PrefixKeyer
from router.settings import TenantConfig
from router.tenants import Tenant, Tenants, derive_key

A = Tenant("a", derive_key("secret-a"))
B = Tenant("b", derive_key("secret-b"))

LONG_SYSTEM = " ".join(f"Clause {i} applies to contracts of type {i % 7}." for i in range(200))


@pytest.fixture(scope="module")
def keyer():
    return PrefixKeyer(load_tokenizer(default_model_path()), prefix_tokens=64)


def chat(*msgs, **kw) -> ChatCompletionRequest:
    roles = ["system", "user", "assistant", "user", "assistant", "user"]
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": r, "content": c} for r, c in zip(roles, msgs)], **kw})


def test_tenants_with_identical_prompts_get_different_keys(keyer):
    r = chat(LONG_SYSTEM, "hello")
    a, b = keyer.keys(A, r, None), keyer.keys(B, r, None)
    assert a.key != b.key and not set(a.blocks) & set(b.blocks)
    assert keyer.keys(A, r, None).key == a.key and keyer.keys(A, r, None).blocks == a.blocks  # and each is stable
    assert A.cache_salt(None) != B.cache_salt(None)
    assert A.cache_salt("x") != A.cache_salt("y") != B.cache_salt("x")


def test_prompt_cache_key_scopes_the_key(keyer):
    base = keyer.keys(A, chat(LONG_SYSTEM, "hello"), None).key
    k1 = keyer.keys(A, chat(LONG_SYSTEM, "hello", prompt_cache_key="k1"), None).key
    k2 = keyer.keys(A, chat(LONG_SYSTEM, "hello", prompt_cache_key="k2"), None).key
    assert len({base, k1, k2}) == 3


def test_only_the_first_p_tokens_matter(keyer):
    a = keyer.keys(A, chat(LONG_SYSTEM, "first question"), None)
    b = keyer.keys(A, chat(LONG_SYSTEM, "a different question entirely"), None)
    assert a.key == b.key and a.prefix_tokens == 64
    short = keyer.keys(A, chat("Be brief.", "hi"), None)
    assert short.prefix_tokens < 64 and short.key != a.key
    c = CompletionRequest.model_validate({"prompt": "The quick brown fox " * 100})
    d = CompletionRequest.model_validate({"prompt": "The quick brown fox " * 100 + "jumps"})
    assert keyer.keys(A, c, None).key == keyer.keys(A, d, None).key


def test_window_tokens_equal_full_tokenization_prefix(keyer):
    text = LONG_SYSTEM * 3
    full = keyer.tokenizer(text, add_special_tokens=False).input_ids
    assert keyer.first_tokens(text) == full[:64]


def shared_blocks(a, b) -> int:
    n = 0
    while n < min(len(a.blocks), len(b.blocks)) and a.blocks[n] == b.blocks[n]:
        n += 1
    return n


def test_a_conversations_turns_extend_one_block_chain(keyer):
    q3, q9 = "Tell me about clause 3. " * 40, "Tell me about clause 9. " * 40
    t1 = keyer.keys(A, chat(LONG_SYSTEM, q3), None)
    t2 = keyer.keys(A, chat(LONG_SYSTEM, q3, "It applies to type 3.", "And clause 4?"), None)
    other = keyer.keys(A, chat(LONG_SYSTEM, q9), None)
    assert t1.session is None  # no explicit identity: the chain is what follows a conversation
    # turn 2 repeats every block of turn 1 but its last (partial) one; another conversation only the system's
    assert shared_blocks(t1, t2) == len(t1.blocks) - 1
    assert 0 < shared_blocks(t1, other) < shared_blocks(t1, t2)
    assert t2.prompt_tokens > t1.prompt_tokens > 0 and list(t2.block_tokens) == sorted(t2.block_tokens)
    # estimated tokens: within 25% of the real count
    real = len(keyer.tokenizer(keyer.tokenizer.apply_chat_template(
        [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": q3}],
        tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids)
    assert abs(t1.prompt_tokens - real) <= 0.25 * real
    # explicit identities: user field, then the x-session-id header
    assert keyer.keys(A, chat(LONG_SYSTEM, "x", user="u1"), None).session == \
        keyer.keys(A, chat(LONG_SYSTEM, "y", user="u1"), None).session is not None
    s9 = keyer.keys(A, chat(LONG_SYSTEM, "x"), "sess-9").session
    assert s9 == keyer.keys(A, chat("other", "y"), "sess-9").session
    assert s9 != keyer.keys(B, chat(LONG_SYSTEM, "x"), "sess-9").session


def test_api_keys_map_to_tenants():
    t = Tenants([TenantConfig(id="a", api_key="key-a", secret="s-a"),
                 TenantConfig(id="b", api_key="key-b", secret="s-b")], "open")
    assert t.authenticate("Bearer key-a").id == "a" and t.authenticate("Bearer key-b").id == "b"
    from protocol.errors import APIError
    for bad in (None, "", "Bearer", "Bearer key-c", "Basic key-a", "Bearer key-a2"):
        with pytest.raises(APIError) as exc:
            t.authenticate(bad)
        assert exc.value.status == 401
    assert Tenants([], "open").authenticate(None).id == "open"


def test_conversations_part_where_their_first_user_messages_differ(keyer):
    # "is" and "his" both occur inside "This": the chains must still part at the user message, not before it
    system = "This is the help desk of a library. " + LONG_SYSTEM
    a, b = (keyer.keys(A, chat(system, q), None) for q in ("is", "his"))
    assert a.blocks != b.blocks and shared_blocks(a, b) == len(a.blocks) - 1


class RecordingTokenizer:
    """The real tokenizer, recording the messages of every chat-template render and counting tokenizations."""

    def __init__(self, tok):
        self.tok, self.renders, self.calls = tok, [], 0

    def __call__(self, *a, **kw):
        self.calls += 1
        return self.tok(*a, **kw)

    def apply_chat_template(self, messages, **kw):
        self.renders.append(len(messages))
        return self.tok.apply_chat_template(messages, **kw)


def full_key_ids(tok, messages, p):
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids[:p]


@pytest.mark.parametrize("msgs", [
    (LONG_SYSTEM, "q1", "a1", "q2 " * 5000),  # P tokens within the system prompt
    ("Be brief.", "hi", "Hello! " * 40, "more " * 5000),  # P tokens reached only in the assistant turn
    ("Be brief.", "hi", "ok", "short"),  # the whole chat holds fewer than P tokens
    ("Be brief.", "hi"),
])
def test_a_chat_is_rendered_only_through_the_messages_the_key_needs(keyer, msgs):
    rec = RecordingTokenizer(keyer.tokenizer)
    k = PrefixKeyer(rec, prefix_tokens=64)
    _ = k._prefix_stable  # the template probe renders a fixed 4-message chat once
    rec.renders.clear()
    req = chat(*msgs)
    got = k.keys(A, req, None)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    want = full_key_ids(keyer.tokenizer, messages, 64)
    assert got.key == keyer.keys(A, req, None).key and got.prefix_tokens == len(want)
    assert k._chat(messages, A.key)[0] == want
    needed = 4 if len(want) < 64 else (1 if msgs[0] == LONG_SYSTEM else 3)
    if needed < len(msgs):  # the long last turn is never rendered
        assert max(rec.renders) < len(msgs)


@pytest.mark.parametrize("msgs", [
    (LONG_SYSTEM, "q1", "a1", "q2"),  # P tokens within the first message
    ("Be brief.", "hi", "Hello! " * 40, "more"),  # P tokens reached only in the third message
    ("Be brief.", "hi", "ok", "short"),  # the whole chat holds fewer than P tokens: rendered whole
])
def test_a_repeated_chat_prefix_is_neither_rendered_nor_tokenized_again(keyer, msgs):
    rec = RecordingTokenizer(keyer.tokenizer)
    k = PrefixKeyer(rec, prefix_tokens=64)
    _ = k._prefix_stable
    first = k.keys(A, chat(*msgs), None)
    rec.renders.clear()
    calls = rec.calls
    # the same leading messages with another last turn (when the key does not reach it) cost nothing
    again = k.keys(A, chat(*msgs), None)
    assert again.key == first.key and rec.renders == [] and rec.calls == calls
    # a changed message inside the key's messages is rendered again and keyed differently
    changed = k.keys(A, chat("Now. " + msgs[0], *msgs[1:]), None)
    assert changed.key != first.key and rec.renders


def test_the_memos_are_per_tenant_so_another_tenant_cannot_time_them(keyer):
    """A text one tenant sent is tokenized (and a chat rendered) again for another tenant: a shared memo would make
    the other's request measurably faster, telling it the text was sent (tests/integration/test_tenant_isolation.py
    times it end to end)."""
    rec = RecordingTokenizer(keyer.tokenizer)
    k = PrefixKeyer(rec, prefix_tokens=64)
    _ = k._prefix_stable
    for req in (chat(LONG_SYSTEM, "q"), CompletionRequest.model_validate({"prompt": LONG_SYSTEM})):
        k.keys(A, req, None)
        calls, renders = rec.calls, len(rec.renders)
        k.keys(A, req, None)
        assert rec.calls == calls and len(rec.renders) == renders  # the same tenant: memoized
        k.keys(B, req, None)
        assert rec.calls > calls  # another tenant: tokenized again
        if isinstance(req, ChatCompletionRequest):
            assert len(rec.renders) > renders


@pytest.mark.parametrize("p", [8, 64])
def test_prompt_token_estimates_hold_with_a_small_key_window(keyer, p):
    """A chat template opens with long special tokens: estimating bytes per token from the first P tokens alone
    (P = 8 in the scaled benchmarks) overestimates the prompt; the estimate samples at least 1 KiB."""
    k = PrefixKeyer(keyer.tokenizer, prefix_tokens=p)
    words = " ".join(f"word{i % 50} item{i % 7}" for i in range(1500))
    req = chat(words, "question")
    got = k.keys(A, req, None)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    true = len(full_key_ids(keyer.tokenizer, messages, 10**9))
    assert abs(got.prompt_tokens - true) <= 0.1 * true, (got.prompt_tokens, true)
