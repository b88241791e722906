"""StructuredOutput: what shape a request's output must take, compiled to an llguidance grammar."""

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tokenmill.errors import InvalidRequestError

# Compact, single-line JSON: with flexible whitespace a small model can spend its whole budget on newlines.
JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
# A number with no multipleOf gets this one: SmolLM2 at temperature 0 writes `1.000...` until max_tokens without
# it. Six decimals narrow what the schema allows, never widen it, so the output still validates.
NUMBER_STEP = 1e-6
# The server compiles grammars on these threads, apart from asyncio's default pool, where a few slow compiles
# queued every other request's tokenizing behind them (twelve 2-second compiles held a plain request 4 s).
_COMPILERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-compile")


@dataclass
class StructuredOutput:
    """Exactly one constraint, named as vLLM's structured_outputs: a JSON schema, any JSON object, a regex,
    one of some strings, or a Lark grammar (llguidance's dialect)."""

    json: dict[str, Any] | str | None = None  # a schema, or its JSON text (as vLLM's takes it)
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # The request field the constraint came from, so a compile error names it.
    param: str = "response_format"
    # The grammar with its JSON objects left open (see closed), compiled instead where closing them leaves nothing
    # to match.
    open_grammar: str | None = None

    def __post_init__(self) -> None:
        given = [self.json is not None, self.json_object, self.regex is not None, self.choice is not None,
                 self.grammar is not None]
        if sum(given) != 1:
            raise InvalidRequestError("give exactly one of json, json_object, regex, choice or grammar", self.param)
        if self.choice is not None and not self.choice:
            raise InvalidRequestError("choice must list at least one string", self.param)
        if isinstance(self.json, str):  # parsed here: text went to the compiler without the bounds it adds to numbers
            try:
                self.json = json.loads(self.json)
            except (ValueError, RecursionError) as exc:
                raise InvalidRequestError(f"the {self.param} schema is not valid JSON: {exc}", self.param) from exc

    async def compile_off_loop(self) -> None:
        """Compile the grammar on the compile threads (a large one takes seconds), raising as `compiled` does."""
        await asyncio.get_running_loop().run_in_executor(_COMPILERS, lambda: self.compiled)

    @property
    def compiled(self) -> str:
        """The llguidance grammar, compiled when first asked for; raises InvalidRequestError with the library's
        message when it cannot compile."""
        # Kept on the instance: functools.cached_property holds one lock for every instance while it computes (until
        # Python 3.12), which let the compile threads compile one grammar at a time.
        if "_grammar" not in self.__dict__:
            self.__dict__["_grammar"] = self._compile()
        return self.__dict__["_grammar"]

    def _compile(self) -> str:
        # Imported here: llguidance and the pydantic it brings are 6 MiB of every process's memory otherwise,
        # and only requests with a constraint need them.
        from llguidance import LLMatcher

        # Where objects are closed (see closed), the grammar as written comes second: used where the first matches
        # nothing, and the one whose mistakes are reported (they are the client's own).
        if self.json is not None:
            schema = bounded_numbers(self.json)
            shut = closed(schema)
            candidates = [lambda s=s: LLMatcher.grammar_from_json_schema(s, defaults=JSON_STYLE)
                          for s in ([shut, schema] if shut is not schema else [schema])]
        elif self.json_object:
            candidates = [lambda: LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_STYLE)]
        elif self.regex is not None:
            candidates = [lambda: LLMatcher.grammar_from_regex(self.regex)]
        elif self.choice is not None:
            # One lexer token, not a rule of alternatives: past 2,000 choices sharing a first character the
            # parser's row overflowed partway through the answer, and validating the rule took quadratic time.
            choices = " | ".join(json.dumps(c) for c in self.choice)
            candidates = [lambda: LLMatcher.grammar_from_lark(f"start: CHOICE\nCHOICE: {choices}")]
        else:
            candidates = [lambda g=g: LLMatcher.grammar_from_lark(g)
                          for g in (self.grammar, self.open_grammar) if g is not None]
        for build in candidates:
            try:
                grammar = build()
            except (ValueError, TypeError) as exc:
                error = str(exc)
                continue
            is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
            if not is_error:
                return grammar
            error = "; ".join(messages)
        raise InvalidRequestError(f"cannot compile the {self.param}: {error}", self.param)


# Keywords whose values are data, not schemas; and those whose values map names (of properties, definitions) to
# schemas, where a name may be any word, "default" or "enum" too.
_DATA = ("enum", "const", "default", "examples")
_NAMED = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def map_schemas(schema: Any, visit: Callable[[dict[str, Any]], None]) -> Any:
    """A copy of a JSON schema with visit(node) applied to each of its (sub)schema objects' copies, inner first."""
    if isinstance(schema, list):
        return [map_schemas(s, visit) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _DATA:
            out[key] = value
        elif key in _NAMED and isinstance(value, dict):
            out[key] = {name: map_schemas(sub, visit) for name, sub in value.items()}
        else:
            out[key] = map_schemas(value, visit)
    visit(out)
    return out


# Keywords whose schemas apply to the same object as the node's own properties, each adding keys of its own (the
# compiler refuses if/then/else and dependentSchemas as unimplemented).
_JOINING = {"allOf", "unevaluatedProperties"}


def closed(schema: Any) -> Any:
    """A copy of the schema whose objects take no keys beyond those they name, unless they say otherwise."""
    # As vLLM's default grammar backend (xgrammar's strict mode) reads a schema: plain JSON Schema allows any others,
    # and a small model wrote made-up keys (a tool's arguments, a response_format's fields) until max_tokens. A schema
    # that joins objects (allOf, OpenAPI's way to extend one; properties beside a $ref) is taken as written: closed,
    # each part forbids the others' keys, and nested in an array or an optional key that empties it without a word.
    # One that closing leaves matching nothing (`required` keys without properties) the compile takes as written.
    joins: list[bool] = []
    map_schemas(schema, lambda node: joins.append(bool(_JOINING & node.keys())
                                                  or {"$ref", "properties"} <= node.keys()))
    if any(joins):
        return schema

    def close(node: dict[str, Any]) -> None:
        if node.get("type") == "object" and not {"additionalProperties", "patternProperties"} & node.keys():
            node["additionalProperties"] = False

    return map_schemas(schema, close)


def bounded_numbers(schema: Any) -> Any:
    """A copy of a schema in which every number without a multipleOf takes NUMBER_STEP."""

    def step(node: dict[str, Any]) -> None:
        kind = node.get("type")
        if ((kind == "number" or isinstance(kind, list) and "number" in kind) and "multipleOf" not in node
                and not _pinned(node)):
            node["multipleOf"] = NUMBER_STEP

    return map_schemas(schema, step)


def _pinned(schema: dict[str, Any]) -> bool:
    """Whether a number schema already allows few enough values that a step could only rule out valid ones
    (a const, an enum, bounds closer than 1,000 steps, which may hold no multiple of the step at all)."""
    if "const" in schema or "enum" in schema:
        return True
    low = next((schema[k] for k in ("minimum", "exclusiveMinimum") if isinstance(schema.get(k), (int, float))), None)
    high = next((schema[k] for k in ("maximum", "exclusiveMaximum") if isinstance(schema.get(k), (int, float))), None)
    return low is not None and high is not None and high - low < 1000 * NUMBER_STEP
