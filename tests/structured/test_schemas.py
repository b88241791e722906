"""The real SmolLM2 under thirty JSON schemas, batched, greedy and sampled: every output parses and validates."""

import json

import jsonschema
import pytest

from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import accumulate
from tokenmill.sampling import SamplingParams
from tokenmill.structured.params import StructuredOutput

from .schemas import SCHEMAS

# Enough for the largest bounded schema in the suite, so every output finishes by the grammar, not the budget.
MAX_TOKENS = 128


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, tuple[str, str]]:
    """Each request's whole text and finish reason, all of them in one batch."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    whole = {}
    while engine.has_unfinished():
        for output in engine.step():
            whole[output.request_id] = accumulate(whole.get(output.request_id), output)
    return {i: (o.outputs[0].text, o.outputs[0].finish_reason) for i, o in whole.items()}


@pytest.fixture(scope="module")
def engine(make_engine) -> LLMEngine:
    return make_engine(max_num_seqs=64)


@pytest.fixture(scope="module")
def outputs(engine) -> dict[str, tuple[str, str]]:
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Write one example record as JSON."}])
    requests = {
        f"{t}-{i}": (prompt, SamplingParams(temperature=t, seed=i, max_tokens=MAX_TOKENS,
                                            structured_output=StructuredOutput(json=schema)))
        for t in (0.0, 1.0) for i, schema in enumerate(SCHEMAS)
    }
    return run(engine, requests)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_batched_output_parses_and_validates(outputs, temperature):
    for i, schema in enumerate(SCHEMAS):
        text, finish_reason = outputs[f"{temperature}-{i}"]
        assert finish_reason == "stop", (i, text)
        jsonschema.validate(json.loads(text), schema)


def test_constrained_and_free_requests_share_a_batch(engine):
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Name a color."}])
    free = SamplingParams(temperature=0, max_tokens=12)
    alone = run(engine, {"free": (prompt, free)})["free"]
    choice = StructuredOutput(choice=["red", "green", "blue"], param="guided_choice")
    mixed = run(engine, {"free": (prompt, free),
                         "choice": (prompt, SamplingParams(temperature=1, seed=3, structured_output=choice))})
    assert mixed["free"] == alone  # unconstrained rows are untouched by the masks beside them
    assert mixed["choice"] in [("red", "stop"), ("green", "stop"), ("blue", "stop")]


def test_constrained_sequence_out_of_budget_ends_with_length(engine):
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "List some words."}])
    schema = {"type": "array", "items": {"type": "string"}, "minItems": 20}
    params = SamplingParams(temperature=0, max_tokens=5, structured_output=StructuredOutput(json=schema))
    text, finish_reason = run(engine, {"r": (prompt, params)})["r"]
    assert finish_reason == "length" and text.startswith("[")


def test_regex_is_followed_exactly(engine):
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "Give a date."}])
    # [0-9], not \d: the library's \d is Unicode's, and greedy SmolLM2 picks U+1FBF8 (a segmented-display digit).
    regex = StructuredOutput(regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}", param="guided_regex")
    text, finish_reason = run(engine, {"r": (prompt, SamplingParams(temperature=0, structured_output=regex))})["r"]
    assert finish_reason == "stop", text
    assert len(text) == 10 and text[4] == text[7] == "-" and text.replace("-", "").isdigit()


def test_a_grammar_the_library_gives_up_on_fails_its_request_with_the_reason(engine):
    # Compiles, but its lexer outgrows the library's limits at the first token: it used to end as "abort", its
    # text presented as whole.
    regex = StructuredOutput(regex="(a{1000}){1000}", param="guided_regex")
    engine.add_request("big", "x", SamplingParams(temperature=0, max_tokens=3, structured_output=regex))
    while engine.has_unfinished():
        engine.step()
    error = engine.take_failures()["big"]
    assert isinstance(error, InvalidRequestError) and error.param == "guided_regex"
    assert "could not be followed: lexer error: too many expressions" in str(error)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
