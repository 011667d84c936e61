"""Routing and session keys from the real SmolLM2 tokenizer: tenant-scoped, prompt_cache_key-scoped, only the
first P tokens, and one session key for every turn of a conversation."""

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
    assert a.key != b.key and a.session != b.session
    assert keyer.keys(A, r, None).key == a.key  # and each is stable
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


def test_turns_of_one_conversation_share_a_session_key(keyer):
    t1 = chat(LONG_SYSTEM, "What is clause 3?")
    t2 = chat(LONG_SYSTEM, "What is clause 3?", "It applies to type 3.", "And clause 4?")
    other = chat(LONG_SYSTEM, "What is clause 9?")
    s1, s2, s3 = (keyer.keys(A, r, None).session for r in (t1, t2, other))
    assert s1 == s2 != s3
    # explicit identities win: user field, then the x-session-id header
    assert keyer.keys(A, chat(LONG_SYSTEM, "x", user="u1"), None).session == \
        keyer.keys(A, chat(LONG_SYSTEM, "y", user="u1"), None).session
    assert keyer.keys(A, t1, "sess-9").session == keyer.keys(A, other, "sess-9").session


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
