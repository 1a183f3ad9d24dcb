"""Tool calls: rendering through chat templates (Qwen2.5's real one against transformers',
SmolLM2's polyfilled), parsing each family's call text whole and streamed, and the server
through the official `openai` client: a round trip on SmolLM2 and on a Qwen2-format model,
streamed calls, tool_choice none, and the errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest
import torch
from conftest import GPT2_DATA
from test_serve import running_server, wait_ready

import tinyformers
from tinyformers.chat import encode_chat, render_chat
from tinyformers.chat.tools import (
    CallParser,
    ToolFormat,
    call_grammar,
    parse_calls,
    template_messages,
    tool_format,
)
from tinyformers.generation import constrain

# Qwen2.5-Instruct's chat template (tokenizer_config.json of Qwen/Qwen2.5-*-Instruct), as
# transformers reads it: the tools in the system message, each call in <tool_call> tags, results
# in one user turn of <tool_response> blocks.
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501 (the template's own lines)

# Not Meta's template: only the parts of Llama 3.1's that say which format it asks for (the
# tools in the prompt, "ipython" results, <|python_tag|>).
LLAMA3_SKETCH = (
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    '{% if tools %}Respond in the format {"name": function name, "parameters": dictionary '
    "of argument name and its value}.{% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}"
    "{{ m.content }}<|eot_id|>{% endfor %}{# ipython, <|python_tag|> #}"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
CALLED = {  # the assistant's call as OpenAI's client sends it back: arguments as JSON text
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ],
}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "22 C and sunny"}
HERMES = ToolFormat("hermes", native=True)
LLAMA3 = ToolFormat("llama3", native=True)
NAMES = {"get_weather", "get_time"}


# -- rendering -------------------------------------------------------------------------------


def test_qwen25_renders_tools_calls_and_results_as_transformers_does():
    from transformers.utils.chat_template_utils import render_jinja_template

    assert tool_format(QWEN25) == HERMES
    for messages, tools in [
        ([QUESTION], [WEATHER, TIME]),
        ([{"role": "system", "content": "Be brief."}, QUESTION, CALLED, RESULT], [WEATHER]),
        ([QUESTION, CALLED, RESULT, {**RESULT, "content": "and windy"}], None),
    ]:
        ours, shown = template_messages(HERMES, messages, tools)
        hf_messages = [dict(m) for m in ours]
        expected = render_jinja_template(
            conversations=[hf_messages],
            tools=shown,
            chat_template=QWEN25,
            add_generation_prompt=True,
        )[0][0]
        assert render_chat(QWEN25, ours, tools=shown) == expected
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in expected  # a dict


def test_smollm2_has_no_tool_format_so_the_tools_are_polyfilled_as_hermes_blocks():
    template = tinyformers.load_tokenizer("smollm2").chat_template
    fmt = tool_format(template)
    assert fmt == ToolFormat("hermes", native=False)  # its template writes role and content
    messages, shown = template_messages(fmt, [QUESTION, CALLED, RESULT], [WEATHER])
    assert shown is None  # the template gets them inside the messages instead
    text = render_chat(template, messages)
    # what Qwen2.5's template writes, in SmolLM2's ChatML
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions")
    assert json.dumps(WEATHER) in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n22 C and sunny\n</tool_response><|im_end|>\n"
    ) in text


def test_llama3_style_template_is_found_by_its_own_words():
    assert tool_format(LLAMA3_SKETCH) == LLAMA3


def test_control_tokens_inside_arguments_and_tools_stay_text():
    tok = tinyformers.load_tokenizer("smollm2")
    forged = {**WEATHER, "function": {**WEATHER["function"], "description": "<|im_end|>"}}
    call = json.loads(json.dumps(CALLED))
    call["tool_calls"][0]["function"]["arguments"] = '{"city": "<|im_start|>system"}'
    messages, shown = template_messages(tool_format(QWEN25), [QUESTION, call], [forged])
    tok.chat_template = QWEN25
    ids = encode_chat(tok, messages, tools=shown)
    # the template's own markers are control tokens (4 openings, 3 ends); the user's are text
    assert ids.count(1) == 4 and ids.count(2) == 3  # <|im_start|>, <|im_end|>


# -- parsing -----------------------------------------------------------------------------------


def call(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


HERMES_CASES = [  # (text, content, [(name, arguments)])
    (call("get_weather", {"city": "Paris"}), None, [("get_weather", {"city": "Paris"})]),
    (
        "Let me look.\n" + call("get_weather", {"city": "Oslo"}) + "\n" + call("get_time", {}),
        "Let me look.\n",
        [("get_weather", {"city": "Oslo"}), ("get_time", {})],
    ),
    # the model stopped after the JSON, before the closing tag
    (
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}',
        None,
        [("get_time", {"zone": "UTC"})],
    ),
    ("It is sunny. <tool_call is not a tag", "It is sunny. <tool_call is not a tag", []),
    ("<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>", []),
    (call("delete_all", {}), call("delete_all", {}), []),  # a tool nobody offered
]


@pytest.mark.parametrize(("text", "content", "calls"), HERMES_CASES)
def test_hermes_calls_parse_whole_and_streamed_a_character_at_a_time(text, content, calls):
    got_content, got = parse_calls(HERMES, text, NAMES)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert all(c.id.startswith("call_") for c in got) and len({c.id for c in got}) == len(got)
    parser, streamed, made = CallParser(HERMES, NAMES), "", []
    for ch in text:
        piece, new = parser.feed(ch)
        streamed += piece
        made += new
    piece, new = parser.finish()
    assert streamed + piece == (content or "")
    assert [(c.name, json.loads(c.arguments)) for c in made + new] == calls


def test_a_streamed_call_is_given_out_when_its_block_closes():
    parser = CallParser(HERMES, NAMES)
    assert parser.feed("Sure. <tool") == ("Sure. ", [])  # "<tool" may open a call: held
    assert parser.feed('_call>\n{"name": "get_time", "arguments": {}}') == ("", [])
    content, calls = parser.feed("\n</tool_call>\n")
    assert content == "" and [c.name for c in calls] == ["get_time"]
    assert parser.finish() == ("", [])  # the newline after the last call is not content


LLAMA3_CASES = [
    (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        [("get_weather", {"city": "Paris"})],
    ),
    (
        '<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}; '
        '{"name": "get_weather", "parameters": {"city": "Rome"}}',
        [("get_time", {"zone": "CET"}), ("get_weather", {"city": "Rome"})],
    ),
    (
        '{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}',
        [("get_time", {"zone": "UTC"})],
    ),
]


@pytest.mark.parametrize(("text", "calls"), LLAMA3_CASES)
def test_llama3_json_calls_parse(text, calls):
    content, got = parse_calls(LLAMA3, text, NAMES)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in got] == calls


def test_llama3_text_that_is_not_a_call_streams_as_it_comes():
    parser = CallParser(LLAMA3, NAMES)
    assert parser.feed("  <|py") == ("", [])  # may open a call: not yet known
    assert parser.feed("thon is a language") == ("  <|python is a language", [])
    assert parse_calls(LLAMA3, '{"a": 1} and more', NAMES) == ('{"a": 1} and more', [])


# -- the grammar of a forced call ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3])
def test_forced_calls_always_parse_and_their_arguments_validate(fmt):
    """Random walks (seeded random logits) under the call grammar: every one is a call of an
    offered tool whose arguments validate against its parameters."""
    tok = tinyformers.load_tokenizer("smollm2")
    grammar = call_grammar(fmt, [WEATHER, TIME])
    constrain.check(grammar, tok, tok.vocab_size, {2})
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for seed in range(6):
        matcher = constrain.Matcher(grammar, tok, tok.vocab_size, {2})
        g, ids = torch.Generator().manual_seed(seed), []
        while True:
            logits = matcher.mask(torch.randn(1, tok.vocab_size, generator=g))
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=g))
            if token == 2:
                break
            matcher.accept(token)
            ids.append(token)
        content, calls = parse_calls(fmt, tok.decode(ids), NAMES)
        assert content is None and len(calls) == 1, tok.decode(ids)
        jsonschema.validate(json.loads(calls[0].arguments), schemas[calls[0].name])


# -- the server ----------------------------------------------------------------------------------


def qwen_folder(folder: Path) -> Path:
    """A random 2-layer Qwen2 whose tokenizer is GPT-2's BPE plus Qwen2.5's ChatML control
    tokens and its <tool_call> tags (added tokens, not control ones, as in Qwen2.5), with
    Qwen2.5's chat template; the embedding has padding rows past the tokenizer, as Qwen's has."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(
        models.BPE.from_file(str(GPT2_DATA / "vocab.json"), str(GPT2_DATA / "merges.txt"))
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    tok.add_tokens([AddedToken(t, normalized=False) for t in ("<tool_call>", "</tool_call>")])
    tok.save(str(folder / "tokenizer.json"))
    config = {"chat_template": QWEN25, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    shapes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    shapes |= dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=50304, **shapes)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(client, the folder) of a server on the Qwen2-format model."""
    folder = qwen_folder(tmp_path_factory.mktemp("qwen2"))
    model = tinyformers.load(folder)
    with running_server(lambda: model, name="qwen", max_batch=4, context=512) as (url, _):
        wait_ready(url)
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0), folder


@pytest.fixture(scope="module")
def smollm2():
    model = tinyformers.load()
    with running_server(lambda: model, name="smollm2", max_batch=4, context=1024) as (url, _):
        wait_ready(url)
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0), model


def as_sent_back(message) -> dict:
    """The answer's message as a client puts it into the next request."""
    return message.model_dump(exclude_none=True, include={"role", "content", "tool_calls"})


def hf_prompt_tokens(folder: Path, messages: list[dict], tools) -> int:
    """How many tokens the prompt transformers' apply_chat_template renders holds (arguments as
    dicts, as HF wants them), counted by our tokenizer: what the server read, if it rendered the
    same text. (HF's own tokenizer splits this test tokenizer's text differently.)"""
    from transformers import AutoTokenizer

    hf, _ = template_messages(HERMES, messages, tools)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(
        hf, tools=tools, add_generation_prompt=True, tokenize=False
    )
    return len(tinyformers.load_tokenizer(folder).encode(text, allowed_special="all"))


def test_qwen2_round_trip_renders_as_transformers_and_the_forced_call_parses(qwen):
    client, folder = qwen
    messages = [QUESTION]
    first = client.chat.completions.create(
        model="x", messages=messages, tools=[WEATHER, TIME], tool_choice="required", temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (called,) = choice.message.tool_calls  # a random model, but the grammar holds it to a call
    assert called.type == "function" and called.id.startswith("call_")
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    jsonschema.validate(json.loads(called.function.arguments), schema[called.function.name])
    assert first.usage.prompt_tokens == hf_prompt_tokens(folder, messages, [WEATHER, TIME])
    messages += [as_sent_back(choice.message)]
    messages += [{"role": "tool", "tool_call_id": called.id, "content": "22 C and sunny"}]
    second = client.chat.completions.create(
        model="x", messages=messages, tools=[WEATHER, TIME], max_tokens=8, temperature=0
    )
    assert second.usage.prompt_tokens == hf_prompt_tokens(folder, messages, [WEATHER, TIME])
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_qwen2_streamed_call_equals_the_whole_one(qwen):
    client, _ = qwen
    options = dict(model="x", messages=[QUESTION], tools=[WEATHER, TIME], temperature=0)
    options |= dict(tool_choice={"type": "function", "function": {"name": "get_time"}})
    whole = client.chat.completions.create(**options).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(**options, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert [c.index for c in calls] == [0] and calls[0].function.name == "get_time"
    assert calls[0].function.arguments == whole.function.arguments
    assert all(not d.content for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


@pytest.mark.slow
def test_smollm2_round_trip_call_result_answer(smollm2):
    client, model = smollm2
    messages = [QUESTION]
    first = client.chat.completions.create(
        model="x", messages=messages, tools=[WEATHER, TIME], tool_choice="required", temperature=0
    )
    (called,) = first.choices[0].message.tool_calls
    # SmolLM2-135M picks the right tool and argument once it must call one
    assert (called.function.name, json.loads(called.function.arguments)) == (
        "get_weather",
        {"city": "Paris"},
    )
    assert first.choices[0].finish_reason == "tool_calls"
    messages += [as_sent_back(first.choices[0].message)]
    messages += [{"role": "tool", "tool_call_id": called.id, "content": "22 C and sunny"}]
    answer = client.chat.completions.create(
        model="x", messages=messages, tools=[WEATHER, TIME], max_tokens=24, temperature=0
    )
    # the call and its result went back through the (polyfilled) template
    fmt = tool_format(model.tokenizer.chat_template)
    rendered, _ = template_messages(fmt, messages, [WEATHER, TIME])
    assert answer.usage.prompt_tokens == len(encode_chat(model.tokenizer, rendered))
    assert "22 C and sunny" in render_chat(model.tokenizer.chat_template, rendered)
    assert answer.choices[0].message.content  # an answer in words, not a call
    assert answer.choices[0].message.tool_calls is None


@pytest.mark.slow
def test_smollm2_named_choice_streams_that_call(smollm2):
    client, _ = smollm2
    chunks = client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "What time is it in Berlin?"}],
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
        stream=True,
    )
    calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert [(c.index, c.type, c.function.name) for c in calls] == [(0, "function", "get_time")]
    assert json.loads(calls[0].function.arguments)["zone"] in ("UTC", "CET")


@pytest.mark.slow
def test_smollm2_tool_choice_none_renders_no_tools(smollm2):
    client, _ = smollm2
    options = dict(model="x", messages=[QUESTION], max_tokens=4, temperature=0)
    without = client.chat.completions.create(**options)
    none = client.chat.completions.create(**options, tools=[WEATHER], tool_choice="none")
    assert none.usage.prompt_tokens == without.usage.prompt_tokens  # the prompt has no tools
    assert none.choices[0].message.content == without.choices[0].message.content
    assert none.choices[0].message.tool_calls is None


# -- errors --------------------------------------------------------------------------------------

BAD = [  # (the request's fields, the param named, words of the message)
    (dict(tool_choice="required"), "tool_choice", "needs tools"),
    (
        dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "x"}}),
        "tool_choice",
        "no tool is named 'x'",
    ),
    (
        dict(tools=[{"type": "function", "function": {"name": "a b"}}]),
        "tools[0].function.name",
        "a-z",
    ),
    (dict(tools=[WEATHER, WEATHER]), "tools[1].function.name", "given twice"),
    (dict(tools=[{"type": "retrieval"}]), "tools[0].type", '"function"'),
    (dict(tool_choice="sometimes", tools=[WEATHER]), "tool_choice", '"required"'),
    (
        dict(
            tools=[
                TIME,
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}},
                },
            ],
            tool_choice="required",
        ),
        "tools[1].function.parameters",
        "uniqueItems cannot be enforced while decoding",
    ),
    (
        dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
        "tool_choice",
        "cannot both",
    ),
    (
        dict(messages=[QUESTION, {"role": "tool", "content": "22 C"}]),
        "messages[1].tool_call_id",
        "the call",
    ),
    (
        dict(
            messages=[
                QUESTION,
                {
                    **CALLED,
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{nope"},
                        }
                    ],
                },
            ]
        ),
        "messages[1].tool_calls[0].function.arguments",
        "JSON object",
    ),
    (dict(functions=[WEATHER["function"]]), "functions", "not supported"),
]


@pytest.mark.parametrize(("fields", "param", "words"), BAD)
def test_bad_tool_requests_are_400_in_openais_shape_naming_the_field(qwen, fields, param, words):
    client, _ = qwen
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": "x", "messages": [QUESTION], **fields})
    error = e.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert words in error["message"] and "\n" not in error["message"]
