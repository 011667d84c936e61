"""Request models reject what OpenAI rejects, with the parameter named."""

import pytest

from protocol.errors import APIError
from protocol.http import parse_model
from protocol.openai import ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatDelta, CompletionRequest

MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body,param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSG, "max_tokens": "5"}, "max_tokens"),
    ({"messages": MSG, "temperature": 3}, "temperature"),
    ({"messages": MSG, "top_p": 0}, "top_p"),
    ({"messages": MSG, "stream": "yes"}, "stream"),
])
def test_invalid_chat_requests_name_the_parameter(body, param):
    with pytest.raises(APIError) as exc:
        parse_model(ChatCompletionRequest, body)
    assert exc.value.status == 400 and exc.value.param and exc.value.param.startswith(param.split(".")[0])


def test_unsupported_features_answer_400():
    for body, param in [({"messages": MSG, "n": 2}, "n"), ({"messages": MSG, "logprobs": True}, "logprobs"),
                        ({"messages": MSG, "presence_penalty": 0.5}, "presence_penalty")]:
        req = parse_model(ChatCompletionRequest, body)
        with pytest.raises(APIError) as exc:
            req.check_supported()
        assert exc.value.param == param
    with pytest.raises(APIError):
        parse_model(ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
                    ).messages[0].text()


def test_completion_prompt_forms():
    assert parse_model(CompletionRequest, {"prompt": "x"}).single_prompt() == "x"
    assert parse_model(CompletionRequest, {"prompt": [1, 2]}).single_prompt() == [1, 2]
    assert parse_model(CompletionRequest, {"prompt": ["x"]}).single_prompt() == "x"
    with pytest.raises(APIError):
        parse_model(CompletionRequest, {"prompt": ["a", "b"]}).single_prompt()


def test_delta_serializes_only_present_fields():
    chunk = ChatCompletionChunk(id="c", created=0, model="m", choices=[ChatChunkChoice(delta=ChatDelta(content="x"))])
    assert chunk.model_dump()["choices"][0]["delta"] == {"content": "x"}
    assert ChatDelta().model_dump() == {}


def test_the_direct_chat_render_equals_the_tokenizers_and_falls_back_when_it_would_not():
    from protocol.modelfiles import default_model_path, load_tokenizer
    from protocol.prompt import _direct, render_chat

    tok = load_tokenizer(default_model_path())
    assert _direct(tok) is not None
    convs = [[{"role": "user", "content": "x" * n}] for n in (0, 1, 5000)] + [
        [{"role": "system", "content": "Ünïcode ✓ {{ not jinja }}"}, {"role": "user", "content": "a\nb"},
         {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}]]
    for msgs in convs:
        for gen in (True, False):
            assert render_chat(tok, msgs, gen) == tok.apply_chat_template(msgs, add_generation_prompt=gen,
                                                                          tokenize=False)

    class Tweaked:  # a tokenizer whose own rendering adds what its template text does not say
        chat_template = tok.chat_template
        special_tokens_map = tok.special_tokens_map

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return "[pre]" + tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                     tokenize=False)

    tweaked = Tweaked()
    assert _direct(tweaked) is None and render_chat(tweaked, convs[0]).startswith("[pre]")
