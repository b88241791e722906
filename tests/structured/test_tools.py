"""Tool calls: the prompt format, the forcing grammar, and reading calls back whole and streamed."""

import json

import pytest

from tokenmill.structured.matcher import GrammarState
from tokenmill.structured.params import StructuredOutput
from tokenmill.structured.tool_parser import ToolCall, ToolCallStream, parse_tool_calls
from tokenmill.loader.tokenizer import Tokenizer
from tokenmill.structured.tools import chat_prompt, forced_call, inline_tools, render_calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"]}}}
CALL = '<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}]</tool_call>'


def test_a_call_block_parses_into_calls_with_no_content():
    assert parse_tool_calls(CALL) == (None, [ToolCall("add", '{"a": 1, "b": 2}')])


def test_hermes_blocks_and_parameters_key_parse_too():
    text = 'Sure.\n<tool_call>\n{"name": "f", "parameters": {"x": 1}}\n</tool_call>\n<tool_call>{"name": "g"}</tool_call>'
    assert parse_tool_calls(text) == ("Sure.", [ToolCall("f", '{"x": 1}'), ToolCall("g", "{}")])


def test_text_that_is_not_a_call_stays_content():
    for text in ["plain answer", "a <tool_call>not json</tool_call> b", "ends with <tool", "<tool_call>[{\"x\": 1}]"]:
        assert parse_tool_calls(text) == (text, [])


@pytest.mark.parametrize("end", ["", "</tool_"])  # max_tokens cut it before or inside its closing tag
def test_unclosed_block_that_parses_is_a_call(end):
    text = '<tool_call>[{"name": "f", "arguments": {}}]' + end
    assert parse_tool_calls(text) == (None, [ToolCall("f", "{}")])
    stream = ToolCallStream()
    assert [e for ch in text for e in stream.feed(ch)] + stream.finish() == [ToolCall("f", "{}")]
    # One that does not parse is content, spelled as the model wrote it.
    assert parse_tool_calls('<tool_call>[{"name": "f"' + end) == ('<tool_call>[{"name": "f"' + end, [])


ANY = ("get_weather", "add")  # tool_choice required: a call to any of them
CUT = [  # a forced call's text cut by max_tokens, and the calls it is: OpenAI and vLLM answer tool_calls, cut short
    ('<tool_call>[{"name": "get_weather", "arguments": {"city": "Par', ("get_weather",),
     [ToolCall("get_weather", '{"city": "Par')]),
    ('<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", "argum', ANY,
     [ToolCall("add", '{"a": 1, "b": 2}'), ToolCall("get_weather", "")]),
    ('<tool_call>[{"na', ("get_weather",), [ToolCall("get_weather", "")]),  # the named one, if its name is cut
    ('<tool_c', ("get_weather",), [ToolCall("get_weather", "")]),
    ('<tool_call>[{"name": "get_', ANY, [ToolCall("get_weather", "")]),  # the one tool whose name it begins
    ('<tool_call>[{"na', ANY, []),  # required, and no name yet: nothing to call, and no tags as content
]


@pytest.mark.parametrize("text, names, calls", CUT)
def test_a_forced_call_cut_short_is_a_call_not_the_templates_tags(text, names, calls):
    # The tags and the JSON so far came back as content: LangChain and the agents SDK took them as the answer.
    assert parse_tool_calls(text, names) == (None, calls)
    stream = ToolCallStream(names)
    assert [e for ch in text for e in stream.feed(ch)] + stream.finish() == calls
    assert parse_tool_calls(text) == (text, [])  # not forced: text the model chose to write


@pytest.mark.parametrize("parameters, text", [
    # OpenAI reads a function without parameters as taking none; LangChain sends an object with no properties.
    (None, '{"'), ({"type": "object", "properties": {}}, '{"'), ({"type": "object"}, '{"'),
    # Keys beyond those named, as vLLM's default grammar backend reads a schema: plain JSON Schema allowed any.
    (WEATHER["function"]["parameters"], '{"city": "P", "zz'),
])
def test_a_forced_call_takes_no_arguments_beyond_those_its_parameters_name(smollm2_source, parameters, text):
    # The grammar allowed any keys, and SmolLM2 wrote made-up arguments until max_tokens.
    tool = {"type": "function", "function": {"name": "f", **({"parameters": parameters} if parameters else {})}}
    state = GrammarState(forced_call([tool], "f"), smollm2_source.tokenizer)
    assert not all(state.advance(t) for t in smollm2_source.tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("schema, closed", [
    (WEATHER["function"]["parameters"], True),
    ({"type": "object", "properties": {"city": {"type": "string"}}, "additionalProperties": True}, False),
])
def test_a_response_formats_objects_take_only_the_keys_they_name(smollm2_source, schema, closed):
    # As a forced call's arguments: SmolLM2 wrote "country", "zip", "state", then "country" again until max_tokens.
    state = GrammarState(StructuredOutput(json=schema), smollm2_source.tokenizer)
    text = '{"city": "P", "zz'
    assert all(state.advance(t) for t in smollm2_source.tokenizer.encode(text, add_special_tokens=False)) != closed


INHERITED = {"$defs": {"NewPet": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}},
             "allOf": [{"$ref": "#/$defs/NewPet"},
                       {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}]}


@pytest.mark.parametrize("schema", [INHERITED, {"type": "object", "required": ["a"]},
                                    {"type": "object", "minProperties": 1}])
def test_a_schema_closing_would_leave_nothing_to_match_is_taken_as_written(schema):
    # OpenAPI's extended object: each allOf branch closed forbade the other's keys, a 400 "Unsatisfiable schema".
    assert StructuredOutput(json=schema).compiled
    assert forced_call([{"type": "function", "function": {"name": "f", "parameters": schema}}], "f").compiled


def test_forcing_a_call_compiles_nothing_where_the_request_is_read(monkeypatch):
    # That is the event loop: closing each tool's arguments compiled them there, 540 ms for five large tools.
    import llguidance

    def refuse(*args, **kwargs):
        raise AssertionError("compiled while the request was read")

    monkeypatch.setattr(llguidance.LLMatcher, "grammar_from_json_schema", refuse)
    monkeypatch.setattr(llguidance.LLMatcher, "validate_grammar_with_warnings", refuse)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": ["a"]}}}
    forced_call([tool, WEATHER], None)


PET = {"allOf": [{"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
                 {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}]}


@pytest.mark.parametrize("schema, text", [
    ({"type": "array", "items": PET}, '[{"name": "a", "id": 1}]'),
    ({"type": "object", "properties": {"pet": PET}}, '{"pet": {"name": "a", "id": 1}}'),
    ({"$defs": {"A": {"type": "object", "properties": {"a": {"type": "string"}}}}, "type": "array",
      "items": {"$ref": "#/$defs/A", "properties": {"b": {"type": "integer"}}}}, '[{"a": "x", "b": 1}]'),
])
def test_objects_joined_deep_inside_a_schema_keep_their_keys(smollm2_source, schema, text):
    # Nested in an array or an optional key, closed allOf branches matched nothing there: the answer came back
    # {"pets": []} without a word.
    state = GrammarState(StructuredOutput(json=schema), smollm2_source.tokenizer)
    assert all(state.advance(t) for t in smollm2_source.tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("text, content, calls", [
    ("Let me check. " + CALL + CALL, "Let me check.", 2),  # whitespace beside a call is not content
    ("Sure.\n", "Sure.\n", 0),  # at the end, after content, it is
    ("Sure.\n" + CALL + "\n", "Sure.", 1),
])
def test_streamed_character_by_character_equals_whole(text, content, calls):
    stream, events = ToolCallStream(), []
    for ch in text:
        events += stream.feed(ch)
    events += stream.finish()
    assert "".join(e for e in events if isinstance(e, str)) == content
    assert [e for e in events if isinstance(e, ToolCall)] == [ToolCall("add", '{"a": 1, "b": 2}')] * calls
    assert parse_tool_calls(text) == (content, [ToolCall("add", '{"a": 1, "b": 2}')] * calls)


def test_stream_holds_back_only_what_may_begin_a_tag():
    stream = ToolCallStream()
    assert stream.feed("Hello <to") == ["Hello"]  # its space waits: a call may follow
    assert stream.feed("day") == [" <today"]


def test_tools_go_into_the_system_message_and_history_is_written_out():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]
    out = inline_tools(messages, [WEATHER])
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in out[0]["content"] and out[0]["content"].endswith("Be brief.")
    assert out[2]["content"] == '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>'
    assert out[3]["content"] == "<tool_response>18C</tool_response>"
    assert all("tool_calls" not in m for m in out)


def test_rendered_calls_parse_back():
    calls = [{"function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]
    assert parse_tool_calls(render_calls(calls))[1] == [ToolCall("add", '{"a": 1, "b": 2}')]


def _accepts(grammar: StructuredOutput, tokenizer, text: str) -> bool:
    state = GrammarState(grammar, tokenizer)
    if not all(state.advance(t) for t in tokenizer.encode(text, add_special_tokens=False)):
        return False
    state.mask()  # NOTE: the matcher is computing the next mask in a thread; it must not be read until done
    return state.matcher.is_accepting()


def test_a_required_calls_grammar_accepts_a_call_to_any_tool_and_rejects_others(smollm2_source):
    grammar, tokenizer = forced_call([WEATHER, ADD], None), smollm2_source.tokenizer
    assert _accepts(grammar, tokenizer, CALL)
    weather = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>'
    assert _accepts(grammar, tokenizer, weather)
    assert not _accepts(grammar, tokenizer, CALL.replace('"a": 1', '"a": "one"'))
    assert not _accepts(grammar, tokenizer, "The answer is 3.")


def test_a_named_functions_output_is_its_arguments_alone(smollm2_source):
    # As vLLM's named mode: the call's wrapper cost 23 completion tokens, and max_tokens 16 left no arguments.
    grammar, tokenizer = forced_call([WEATHER, ADD], "add"), smollm2_source.tokenizer
    assert _accepts(grammar, tokenizer, '{"a": 1, "b": 2}')
    assert not _accepts(grammar, tokenizer, CALL)
    assert not _accepts(grammar, tokenizer, '{"city": "Oslo"}')
    assert not _accepts(grammar, tokenizer, '{"a": "one", "b": 2}')


# As openai.pydantic_function_tool writes a model with a nested one: the nested one in $defs, by $ref.
NESTED = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "$defs": {"Location": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                           "additionalProperties": False}},
    "type": "object", "properties": {"location": {"$ref": "#/$defs/Location"}}, "required": ["location"],
    "additionalProperties": False}}}
TREE = {"type": "function", "function": {"name": "tree", "parameters": {  # recursive: "#" is the parameters
    "type": "object", "properties": {"child": {"$ref": "#"}}, "additionalProperties": False}}}


# A property may be named like a keyword whose value is data ("default", "enum"): its schema's $ref moves too.
KEYWORD_NAMED = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "$defs": {"Location": NESTED["function"]["parameters"]["$defs"]["Location"]},
    "type": "object", "properties": {"default": {"$ref": "#/$defs/Location"}}, "required": ["default"],
    "additionalProperties": False}}}


def test_a_property_named_like_a_data_keyword_keeps_its_ref_resolved(smollm2_source):
    state = GrammarState(forced_call([KEYWORD_NAMED], None), smollm2_source.tokenizer)
    text = '<tool_call>[{"name": "get_weather", "arguments": {"default": {"city": "Oslo"}}}]</tool_call>'
    assert all(state.advance(t) for t in smollm2_source.tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("tools", [[NESTED, TREE], [NESTED], [TREE]])
def test_forced_grammar_resolves_each_tools_refs_within_its_own_parameters(smollm2_source, tools):
    tokenizer = smollm2_source.tokenizer
    grammar = forced_call(tools, None)  # compiling it failed: "#/$defs/Location" looked in the call list's schema

    def accepts(text: str) -> bool:
        state = GrammarState(grammar, tokenizer)
        return all(state.advance(t) for t in tokenizer.encode(text, add_special_tokens=False))

    names = {t["function"]["name"] for t in tools}
    if "get_weather" in names:
        assert accepts('<tool_call>[{"name": "get_weather", "arguments": {"location": {"city": "Oslo"}}}]</tool_call>')
        assert not accepts('<tool_call>[{"name": "get_weather", "arguments": {"location": {"town": "Oslo"}}}]')
    if "tree" in names:
        assert accepts('<tool_call>[{"name": "tree", "arguments": {"child": {"child": {}}}}]</tool_call>')
        assert not accepts('<tool_call>[{"name": "tree", "arguments": {"child": [{"name": "tree"')


@pytest.mark.parametrize("parameters", [
    {"type": "object", "$defs": {"A": {"$anchor": "count", "type": "integer"}},  # a ref to an anchor, not a pointer
     "properties": {"a": {"$ref": "#count"}}, "required": ["a"]},
    {"$id": "https://example.com/args", "type": "object", "$defs": {"A": {"type": "integer"}},  # refs from its $id
     "properties": {"a": {"$ref": "#/$defs/A"}}, "required": ["a"]},
])
def test_a_forced_call_takes_every_ref_a_response_format_takes(smollm2_source, parameters):
    tokenizer = smollm2_source.tokenizer
    assert StructuredOutput(json=parameters).compiled  # as a response_format
    state = GrammarState(forced_call([{"type": "function", "function": {"name": "f", "parameters": parameters}}], None),
                         tokenizer)
    text = '<tool_call>[{"name": "f", "arguments": {"a": 7}}]</tool_call>'
    assert all(state.advance(t) for t in tokenizer.encode(text, add_special_tokens=False))


def test_forced_grammar_is_valid_json_schema_per_call():
    body = forced_call([ADD], None, parallel=False).grammar.split("%json ", 1)[1].rsplit(" ", 1)[0]
    schema = json.loads(body)
    assert schema["maxItems"] == 1 and schema["items"]["properties"]["name"] == {"const": "add"}


def test_a_template_with_its_own_tool_format_renders_the_tools(smollm2_source):
    smollm2 = smollm2_source.tokenizer
    template = "{% for t in tools %}{{ t.function.name }};{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    own = Tokenizer(smollm2.backend, smollm2.eos_token_ids, chat_template=template)
    assert own.renders_tools and not smollm2.renders_tools
    messages = [{"role": "user", "content": "hi"}]
    assert own.decode(chat_prompt(own, messages, [WEATHER], False)) == "get_weather;hi"
    assert '"name": "get_weather"' in smollm2.decode(chat_prompt(smollm2, messages, [WEATHER], False))


def test_a_template_gets_a_past_calls_arguments_as_an_object(smollm2_source):
    smollm2 = smollm2_source.tokenizer
    template = ("{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.arguments | tojson }}"
                "{% endfor %}{% endfor %}{{ tools | length }}")
    own = Tokenizer(smollm2.backend, smollm2.eos_token_ids, chat_template=template)
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    assert own.decode(chat_prompt(own, messages, [WEATHER], False)) == '{"city": "Paris"}1'
    assert call["function"]["arguments"] == '{"city": "Paris"}'  # the request's own messages are left as sent


@pytest.mark.parametrize("inner", ["[" * 1100, '[{"name": "f", "arguments": {"a": ' + "1" * 5000 + "}}]"])
def test_a_block_json_cannot_load_stays_content(inner):
    # Nesting past Python's parser's stack, an integer past its 4,300 digits: a 500 after the whole generation.
    text = f"<tool_call>{inner}</tool_call>"
    assert parse_tool_calls(text) == (text, [])


def test_replayed_arguments_json_cannot_load_are_replayed_as_sent():
    arguments = '{"a": ' + "1" * 4400 + "}"  # an integer past Python's 4,300 digits: it was a 500
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    assert json.loads(render_calls([call])[len("<tool_call>"):-len("</tool_call>")]) == [
        {"name": "f", "arguments": arguments}]
