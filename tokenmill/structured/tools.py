"""The tool-call format for chat templates that know no tools, and the grammar that forces a call."""

import json
from collections.abc import Callable
from typing import Any

from tokenmill.loader.tokenizer import Tokenizer
from tokenmill.structured.params import JSON_STYLE, StructuredOutput, bounded_numbers, closed, map_schemas

# The shape SmolLM2-Instruct was tuned to call functions in (its model card's prompt), a JSON list in tags; the
# parser (tool_parser.py) also reads the Hermes/Qwen form, one object per <tool_call> block.
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# A function sent without parameters takes none, as OpenAI reads it (forced_call closes every object).
NO_PARAMETERS = {"type": "object", "properties": {}}
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

_SYSTEM = """You are an expert in composing functions. You are given a question and a set of possible functions.
Based on the question, you may need to make one or more function/tool calls to achieve the purpose.

You have access to the following tools:
<tools>{tools}</tools>

To call tools, answer with only this format, and no other text:
<tool_call>[
{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}},
... (more tool calls as required)
]</tool_call>
{when}"""
_WHEN_AUTO = "If no function is needed, or a tool's result is already given, answer the user in plain text."
_WHEN_FORCED = "You must call a function now."


def inline_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                 forced: bool = False) -> list[dict[str, Any]]:
    """Messages with the tools in the system message and tool calls and results written out as text."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            out.append({"role": "assistant", "content": (m.get("content") or "") + render_calls(m["tool_calls"])})
        elif m["role"] == "tool":
            # As Hermes-style templates: a tool's result is a user turn in tags, which any template renders.
            out.append({"role": "user", "content": f"{RESPONSE_OPEN}{m.get('content') or ''}{RESPONSE_CLOSE}"})
        else:
            out.append({k: v for k, v in m.items() if k != "tool_calls"})
    if tools:
        functions = json.dumps([t["function"] for t in tools], ensure_ascii=False)
        prompt = _SYSTEM.format(tools=functions, when=_WHEN_FORCED if forced else _WHEN_AUTO)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{prompt}\n\n{out[0]['content']}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def render_calls(tool_calls: list[dict[str, Any]]) -> str:
    """An assistant message's OpenAI tool_calls as the text the model would have written."""
    calls = [{"name": call.get("function", {}).get("name", ""), "arguments": _arguments(call)} for call in tool_calls]
    return f"{CALL_OPEN}{json.dumps(calls, ensure_ascii=False)}{CALL_CLOSE}"


def _arguments(call: dict[str, Any]) -> Any:
    """A tool call's arguments as an object: OpenAI's clients send them as a JSON string."""
    arguments = call.get("function", {}).get("arguments") or "{}"
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except (ValueError, RecursionError):  # not JSON, an integer past 4,300 digits, nesting past Python's stack
        return arguments  # history is replayed as the client sent it


def forced_call(tools: list[dict[str, Any]], name: str | None, parallel: bool = True) -> StructuredOutput:
    """The constraint that makes the output a call: for a named function its arguments alone (a JSON object of its
    parameters, as vLLM's named mode: no tokens go on a wrapper), else a tool-call block of calls to any tool (one or
    more); the arguments' objects closed (see closed), or left open where that leaves nothing to match. Built, not
    compiled: compiling runs off the event loop."""
    if name is not None:
        function = next(t["function"] for t in tools if t["function"]["name"] == name)
        return StructuredOutput(json=function.get("parameters") or NO_PARAMETERS, param="tools")
    functions = [t["function"] for t in tools]
    # Where each function's parameters sit in the schema below: their local $refs ("#/$defs/X", "#") point there.
    at = ["#/items/properties/arguments"] if len(functions) == 1 else [
        f"#/items/anyOf/{i}/properties/arguments" for i in range(len(functions))]

    def grammar(shape: Callable[[Any], Any]) -> str:
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": f["name"]},
                    "arguments": _rebased(shape(bounded_numbers(f.get("parameters") or NO_PARAMETERS)), root),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f, root in zip(functions, at)
        ]
        schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                                  "minItems": 1}
        if not parallel:
            schema["maxItems"] = 1
        body = json.dumps(schema | {"x-guidance": JSON_STYLE})
        return f"start: {json.dumps(CALL_OPEN)} %json {body} {json.dumps(CALL_CLOSE)}"

    return StructuredOutput(grammar=grammar(closed), param="tools", open_grammar=grammar(lambda schema: schema))


def _rebased(schema: Any, root: str) -> Any:
    """The schema (a copy where any ref moves) whose local $refs, written from its own root, point into it where it
    now sits at root."""
    if isinstance(schema, dict) and "$id" in schema:  # its refs resolve against its $id, wherever it sits
        return schema

    def rebase(node: dict[str, Any]) -> None:
        ref = node.get("$ref")
        if ref == "#" or isinstance(ref, str) and ref.startswith("#/"):  # a pointer; "#name" is an $anchor's
            node["$ref"] = root + ref[1:]

    return map_schemas(schema, rebase)


def chat_prompt(tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                forced: bool, add_generation_prompt: bool | None = None,
                continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Prompt ids of a conversation with tools: in the template's own format where it has one, else in ours."""
    ending = {"add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
              "template_kwargs": template_kwargs}
    if tokenizer.renders_tools:
        return tokenizer.encode_chat([_with_call_objects(m) for m in messages], tools, **ending)
    return tokenizer.encode_chat(inline_tools(messages, tools, forced), **ending)


def _with_call_objects(message: dict[str, Any]) -> dict[str, Any]:
    """The message with its tool calls' arguments as objects, as templates take them (`arguments | tojson`)."""
    if not message.get("tool_calls"):
        return message
    calls = [{**call, "function": {**call.get("function", {}), "arguments": _arguments(call)}}
             for call in message["tool_calls"]]
    return {**message, "tool_calls": calls}
