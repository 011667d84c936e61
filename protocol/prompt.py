"""Rendering a request into the exact prompt text the worker will tokenize: one definition for the worker
(which tokenizes all of it) and the router (which tokenizes only its stable prefix).

The chat template is compiled once per tokenizer and rendered directly, about half the time of the tokenizer's
`apply_chat_template` wrapper (which copies every message first); a template whose direct render differs from
the wrapper's on probe conversations is rendered through the wrapper.
"""

from __future__ import annotations

import weakref
from typing import Any

from protocol.errors import APIError
from protocol.openai import ChatCompletionRequest, CompletionRequest


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    # OpenAI's `developer` role is the system role of models that predate it.
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]


_PROBES = (
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "u2"}],
)
_compiled: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _direct(tokenizer: Any) -> Any:
    """A function rendering this tokenizer's chat template directly, or None to use apply_chat_template."""
    try:
        return _compiled[tokenizer]
    except (KeyError, TypeError):
        pass
    fn = None
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        template = _compile_jinja_template(tokenizer.chat_template)
        extra = dict(tokenizer.special_tokens_map)

        def fn(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)

        for probe in _PROBES:
            for gen in (True, False):
                if fn(probe, gen) != tokenizer.apply_chat_template(probe, add_generation_prompt=gen, tokenize=False):
                    fn = None
                    break
            if fn is None:
                break
    except Exception:  # no template, a private API gone, a template that refuses a probe: use the wrapper
        fn = None
    try:
        _compiled[tokenizer] = fn
    except TypeError:
        pass
    return fn


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    try:
        direct = _direct(tokenizer)
        if direct is not None:
            return direct(messages, add_generation_prompt)
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as exc:  # jinja's raise_exception() in a template: the conversation is malformed
        raise APIError(400, f"Could not apply the chat template: {exc}", param="messages") from None


def prompt_text(tokenizer: Any, req: ChatCompletionRequest | CompletionRequest) -> str | list[int]:
    """The rendered prompt (chat) or the given one (completions: text, or token ids as they are)."""
    if isinstance(req, ChatCompletionRequest):
        return render_chat(tokenizer, chat_messages(req))
    return req.single_prompt()
