"""Rendering a request into the exact prompt text the worker will tokenize: one definition for the worker
(which tokenizes all of it) and the router (which tokenizes only its stable prefix)."""

from __future__ import annotations

from typing import Any

from protocol.errors import APIError
from protocol.openai import ChatCompletionRequest, CompletionRequest


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    # OpenAI's `developer` role is the system role of models that predate it.
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as exc:  # jinja's raise_exception() in a template: the conversation is malformed
        raise APIError(400, f"Could not apply the chat template: {exc}", param="messages") from None


def prompt_text(tokenizer: Any, req: ChatCompletionRequest | CompletionRequest) -> str | list[int]:
    """The rendered prompt (chat) or the given one (completions: text, or token ids as they are)."""
    if isinstance(req, ChatCompletionRequest):
        return render_chat(tokenizer, chat_messages(req))
    return req.single_prompt()
