"""Structured outputs, tool calls and stop strings through the real SMG gateway.

The answers that matter run on the trained shapes model (its engine allows no whitespace inside JSON,
see conftest.COMPACT_JSON); /v1/completions runs on the session's random-weight model. Each test
also checks what SMG sent us (the captured GenerateRequest), so a pass means our servicer served
SMG's own encoding of the request, not some other path.
"""

import asyncio
import json
import string

import pytest

from harness.images import data_url
from harness.processes import http_json
from tests.fixtures import SHAPES_MODEL
from tests.test_gateway import _launch, gateway  # noqa: F401 (gateway: a fixture)
from tinytrain import data

pytestmark = pytest.mark.gateway

COLOURS = list(data.COLOURS)
COLOUR_SCHEMA = {"type": "object", "properties": {"colour": {"enum": COLOURS}}, "required": ["colour"],
                 "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "report_colour", "description": "Report the shape's colour.",
                                         "parameters": COLOUR_SCHEMA}}
HELD_OUT_SEED = 424242  # images from the training generator that training never saw
IMAGES = 12


@pytest.fixture(scope="module")
async def shapes_gateway(shapes_server, tmp_path_factory):
    async for gw in _launch(shapes_server, str(SHAPES_MODEL), tmp_path_factory, "inline"):
        yield gw


@pytest.fixture(scope="module")
def samples():
    return [s for s, kind, _, _ in data.held_out(HELD_OUT_SEED, IMAGES) if kind == "colour"]


def _chat(gw, sample, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(sample.image)}},
               {"type": "text", "text": "What colour is the shape?"}]
    return {"model": gw.model, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": 48, **extra}


async def _post(gw, path: str, body: dict):
    """One call; with "stream": true, the events folded back into one message per choice."""
    status, answer = await asyncio.to_thread(http_json, "POST", f"{gw.url}{path}", body)
    if status != 200 or not body.get("stream"):
        return status, answer
    events = [json.loads(line.removeprefix("data:").strip()) for line in answer.splitlines()
              if line.startswith("data:") and line.strip() != "data: [DONE]"] if isinstance(answer, str) else []
    return status, events


def _streamed_message(events: list[dict]) -> tuple[str, list[dict], str | None]:
    """(content, tool calls with joined argument fragments, finish_reason) of a streamed chat."""
    content, calls, finish = "", {}, None
    for c in (c for e in events for c in e["choices"]):
        delta = c.get("delta", {})
        content += delta.get("content") or ""
        for call in delta.get("tool_calls") or []:
            slot = calls.setdefault(call["index"], {"name": "", "arguments": ""})
            slot["name"] += (call.get("function") or {}).get("name") or ""
            slot["arguments"] += (call.get("function") or {}).get("arguments") or ""
        finish = c.get("finish_reason") or finish
    return content, list(calls.values()), finish


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_json_schema_answers_only_allowed_values_and_reads_the_image(shapes_gateway, capture, samples, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "colour", "schema": COLOUR_SCHEMA}}
    answers = []
    with shapes_gateway.dump_log_on_failure():
        for sample in samples:
            status, answer = await _post(shapes_gateway, "/v1/chat/completions",
                                         _chat(shapes_gateway, sample, response_format=fmt, stream=stream))
            assert status == 200, answer
            content = _streamed_message(answer)[0] if stream else answer["choices"][0]["message"]["content"]
            value = json.loads(content)  # whole JSON, not a prefix: the grammar let the model close it
            assert set(value) == {"colour"} and value["colour"] in COLOURS
            answers.append((sample.colour, value["colour"]))
        sent = capture.requests[-1]
        assert json.loads(sent.sampling_params.json_schema) == COLOUR_SCHEMA
    passable = _colours_the_grammar_lets_through()
    right = sum(truth == said for truth, said in answers)
    print(f"\njson_schema colour through SMG ({'stream' if stream else 'unary'}): {right}/{len(samples)} right "
          f"(chance {len(samples) / len(COLOURS):.1f}); xgrammar's mask lets through {sorted(passable)}")
    # The model answers each colour with its one word token, inside JSON too (trained so). Wherever the
    # backend's mask lets that token through, the answer must be right.
    assert all(truth == said for truth, said in answers if truth in passable), answers


def _colours_the_grammar_lets_through() -> set[str]:
    """The colours whose one answer token xgrammar's token mask allows after `{"colour":"` (vLLM's default
    backend, compiled as vLLM does with --structured-outputs-config's disable_any_whitespace). xgrammar 0.2.8
    masks this tokenizer's single `purple` token there although its matcher accepts it; the model, trained on
    that token, then says its second choice. The test holds the model to every colour the mask passes."""
    import xgrammar as xgr
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHAPES_MODEL)
    size = AutoConfig.from_pretrained(SHAPES_MODEL).text_config.vocab_size
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=size)
    grammar = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(COLOUR_SCHEMA), any_whitespace=False,
                                                             separators=(",", ":"))
    matcher = xgr.GrammarMatcher(grammar)
    for token in tokenizer.encode('{"colour":"', add_special_tokens=False):
        assert matcher.accept_token(token)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    matcher.fill_next_token_bitmask(mask)
    allowed = {i for i in range(size) if (int(mask[0, i // 32]) >> (i % 32)) & 1}
    return {c for c in COLOURS if tokenizer.convert_tokens_to_ids(c) in allowed}


def _tool_calls(answer, stream: bool) -> tuple[list[dict], str, str]:
    if stream:
        content, calls, finish = _streamed_message(answer)
        return calls, finish, content
    choice = answer["choices"][0]
    calls = [c["function"] for c in choice["message"].get("tool_calls") or []]
    return calls, choice["finish_reason"], choice["message"]["content"] or ""


def _check_calls(calls: list[dict]) -> None:
    for call in calls:
        arguments = json.loads(call["arguments"])
        assert call["name"] == "report_colour" and set(arguments) == {"colour"} and arguments["colour"] in COLOURS


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_named_tool_call_returns_arguments_that_satisfy_the_schema(shapes_gateway, capture, samples, stream):
    tool_choice = {"type": "function", "function": {"name": "report_colour"}}
    with shapes_gateway.dump_log_on_failure():
        for sample in samples[:4]:
            status, answer = await _post(shapes_gateway, "/v1/chat/completions",
                                         _chat(shapes_gateway, sample, tools=[TOOL], tool_choice=tool_choice, stream=stream))
            assert status == 200, answer
            calls, finish, _ = _tool_calls(answer, stream)
            assert finish == "tool_calls" and len(calls) == 1, answer
            _check_calls(calls)
        assert json.loads(capture.requests[-1].sampling_params.json_schema) == COLOUR_SCHEMA  # SMG constrains the arguments


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_required_tool_call_returns_calls_that_satisfy_the_schema(shapes_gateway, capture, samples, stream):
    """SMG constrains `required` to an array of {name, parameters} with no upper bound, and this model
    often repeats the call until max_tokens; such an answer must still be the array's own prefix."""
    finished = 0
    with shapes_gateway.dump_log_on_failure():
        for sample in samples[:4]:
            status, answer = await _post(shapes_gateway, "/v1/chat/completions",
                                         _chat(shapes_gateway, sample, tools=[TOOL], tool_choice="required",
                                               stream=stream, max_tokens=128))
            assert status == 200, answer
            calls, finish, content = _tool_calls(answer, stream)
            if finish == "tool_calls":
                assert calls, answer
                _check_calls(calls)
                finished += 1
            else:
                # unary: the unparsed array as content; streamed: the calls SMG had parsed so far
                prefix = content.startswith('[{"name":"report_colour","parameters":{"colour":"') or (
                    calls and all(c["name"] == "report_colour" for c in calls))
                assert finish == "length" and prefix, answer
        schema = json.loads(capture.requests[-1].sampling_params.json_schema)
        assert schema["type"] == "array" and schema["minItems"] == 1
    assert finished >= 1


async def test_json_object_mode_constrains_to_an_object(shapes_gateway, capture, samples):
    """SMG sends JSON mode as the schema {"type": "object"}; the content parses as an object."""
    body = _chat(shapes_gateway, samples[0], response_format={"type": "json_object"}, max_tokens=24)
    with shapes_gateway.dump_log_on_failure():
        status, answer = await _post(shapes_gateway, "/v1/chat/completions", body)
        assert status == 200, answer
        assert json.loads(capture.requests[-1].sampling_params.json_schema) == {"type": "object"}
        assert isinstance(json.loads(answer["choices"][0]["message"]["content"]), dict)
        free = await _post(shapes_gateway, "/v1/chat/completions", _chat(shapes_gateway, samples[0]))
        assert not free[1]["choices"][0]["message"]["content"].startswith("{")  # the grammar made the difference


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_chat_stop_string_ends_the_answer_before_it(shapes_gateway, capture, samples, stream):
    sample = next(s for s in samples if len(s.colour) > 3)
    with shapes_gateway.dump_log_on_failure():
        _, free = await _post(shapes_gateway, "/v1/chat/completions", _chat(shapes_gateway, sample))
        text = free["choices"][0]["message"]["content"]
        stop = text[2:4]
        status, answer = await _post(shapes_gateway, "/v1/chat/completions",
                                     _chat(shapes_gateway, sample, stop=[stop], stream=stream))
        assert status == 200, answer
        if stream:
            content, _, finish = _streamed_message(answer)
        else:
            content, finish = answer["choices"][0]["message"]["content"], answer["choices"][0]["finish_reason"]
        assert list(capture.requests[-1].sampling_params.stop) == [stop]
        assert (content, finish) == (text[:text.index(stop)], "stop")


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("keep", [False, True], ids=["trimmed", "no_stop_trim"])
async def test_completions_with_stop(gateway, capture, stream, keep):  # noqa: F811 (gateway: the fixture)
    prompt = "Describe the image."
    body = {"model": gateway.model, "prompt": prompt, "temperature": 0, "max_tokens": 12, "ignore_eos": True}
    with gateway.dump_log_on_failure():
        status, free = await _post(gateway, "/v1/completions", body)
        assert status == 200, free
        text = free["choices"][0]["text"]
        stop = next(text[i:i + 2] for i in range(2, len(text) - 2) if set(text[i:i + 2]) <= set(string.ascii_letters))
        status, answer = await _post(gateway, "/v1/completions", {**body, "stop": [stop], "no_stop_trim": keep, "stream": stream})
        assert status == 200, answer
        if stream:
            got = "".join(c["text"] for e in answer for c in e["choices"])
            finish = [c["finish_reason"] for e in answer for c in e["choices"] if c.get("finish_reason")][-1]
        else:
            got, finish = answer["choices"][0]["text"], answer["choices"][0]["finish_reason"]
        sent = capture.requests[-1].sampling_params
        assert list(sent.stop) == [stop] and sent.include_stop_str_in_output == keep
        cut = text.index(stop) + (len(stop) if keep else 0)
        assert (got, finish) == (text[:cut], "stop")

