"""The mask in the sampler: only grammatical tokens, EOS only where the grammar accepts, other rows untouched."""

import pytest
import torch

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.sampler import Sampler
from tokenmill.engine.sequence import Sequence
from tokenmill.sampling import SamplingParams
from tokenmill.errors import InvalidRequestError
from tokenmill.structured.matcher import GrammarState
from tokenmill.structured.params import StructuredOutput


@pytest.fixture(scope="module")
def tokenizer(smollm2_source):
    return smollm2_source.tokenizer


def _seq(tokenizer, params: SamplingParams, seq_id: int = 0) -> Sequence:
    prompt = tokenizer.encode("Answer:")
    return Sequence(seq_id, str(seq_id), 0, prompt, params, 16, tokenizer.eos_token_ids,
                    IncrementalDetokenizer(tokenizer, prompt, [], False), 0.0)


def _choice(*options: str) -> StructuredOutput:
    return StructuredOutput(choice=list(options), param="guided_choice")


def test_greedy_picks_a_grammatical_token_and_leaves_free_rows_alone(tokenizer):
    bad = tokenizer.encode(" maybe", add_special_tokens=False)[0]
    logits = torch.randn(2, tokenizer.vocab_size)
    logits[:, bad] = 100.0
    seqs = [_seq(tokenizer, SamplingParams(temperature=0, structured_output=_choice("yes", "no"))),
            _seq(tokenizer, SamplingParams(temperature=0), 1)]
    (constrained,), (free,) = Sampler()(logits, seqs).token_ids
    assert free == bad
    assert any(w.startswith(tokenizer.decode([constrained])) for w in ("yes", "no"))


def test_sampled_rows_draw_only_allowed_tokens(tokenizer):
    seq = _seq(tokenizer, SamplingParams(temperature=1.5, structured_output=_choice("red", "blue")))
    draws = {Sampler()(torch.randn(1, tokenizer.vocab_size), [seq]).token_ids[0][0] for _ in range(40)}
    assert all(any(w.startswith(tokenizer.decode([t])) for w in ("red", "blue")) for t in draws)


def test_eos_only_where_the_grammar_accepts(tokenizer):
    eos = tokenizer.eos_token_ids[0]
    schema = {"type": "array", "items": {"type": "integer"}}
    seq = _seq(tokenizer, SamplingParams(temperature=0, structured_output=StructuredOutput(json=schema)))
    logits = torch.zeros(1, tokenizer.vocab_size)
    logits[0, eos] = 100.0
    assert Sampler()(logits.clone(), [seq]).token_ids[0][0] != eos  # "" is no JSON yet
    for token in tokenizer.encode("[1, 2", add_special_tokens=False):
        seq.append_token(token, None)
    assert Sampler()(logits.clone(), [seq]).token_ids[0][0] != eos
    seq.append_token(tokenizer.encode("]", add_special_tokens=False)[0], None)
    # A closed top-level value allows nothing more: the sequence ends without spending a step on EOS.
    assert seq.finish_reason == "stop"


@pytest.mark.parametrize("schema", [{"$ref": "#"}, {"anyOf": [{"$ref": "#"}]}])
def test_a_schema_whose_grammar_admits_only_empty_text_is_refused(tokenizer, schema):
    # The library ends such a grammar before any text: the answer was "" with finish_reason "stop".
    with pytest.raises(InvalidRequestError, match="admits only an empty output"):
        GrammarState(StructuredOutput(json=schema), tokenizer)
    GrammarState(StructuredOutput(regex="a*", param="guided_regex"), tokenizer)  # where empty text is an answer


def test_each_parallel_sample_keeps_its_own_grammar_state(tokenizer):
    params = SamplingParams(temperature=0, structured_output=_choice("ab", "cd"))
    first, second = _seq(tokenizer, params), _seq(tokenizer, params, 1)
    first.append_token(tokenizer.encode("ab", add_special_tokens=False)[0], None)
    assert first.grammar is not second.grammar and second.finish_reason is None


def test_later_samples_copy_the_first_samples_grammar_and_then_go_their_own_way(tokenizer, monkeypatch):
    params = SamplingParams(temperature=0, structured_output=_choice("ab", "cd"))
    first = _seq(tokenizer, params)
    built = []
    monkeypatch.setattr(GrammarState, "__init__", lambda *args: built.append(args))
    later = Sequence(1, "0", 1, first.token_ids, params, 16, tokenizer.eos_token_ids,
                     IncrementalDetokenizer(tokenizer, first.token_ids, [], False), 0.0, first=first)
    assert built == []  # n samples of a 790 KB regex each built a matcher on the engine thread: 13.8 s for 32
    first.append_token(tokenizer.encode("ab", add_special_tokens=False)[0], None)
    assert first.finish_reason == "stop" and later.finish_reason is None
    cd = tokenizer.encode("cd", add_special_tokens=False)
    assert all(later.grammar.advance(t) for t in cd) and later.grammar.is_complete


def test_a_choice_among_thousands_is_followed(tokenizer):
    # Past 2,000 choices sharing a first character the parser's row overflowed partway through the answer.
    state = GrammarState(_choice(*(f"w{i}x" for i in range(2100))), tokenizer)
    assert all(state.advance(t) for t in tokenizer.encode("w2050x", add_special_tokens=False)) and state.is_complete


def test_the_grammar_librarys_vocabulary_lets_its_tokenizer_go(smollm2_path):
    import gc
    import weakref

    from tokenmill.loader.source import open_model
    from tokenmill.structured import matcher

    tokenizer = open_model(str(smollm2_path)).tokenizer
    matcher.GrammarState(_choice("yes", "no"), tokenizer)
    gone = weakref.ref(tokenizer)
    del tokenizer
    gc.collect()
    # A process that opens and drops engines (a notebook, router calibration) kept 28 MiB per tokenizer.
    assert gone() is None
