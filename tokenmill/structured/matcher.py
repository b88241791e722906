"""GrammarState: one sequence's position in its grammar, and the vocabulary the grammar library sees."""

import logging
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper
from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

from tokenmill.errors import InvalidRequestError
from tokenmill.loader.tokenizer import Tokenizer
from tokenmill.structured.params import StructuredOutput

logger = logging.getLogger(__name__)

# Building the token trie takes about 0.2 s for a 49k vocabulary: once per tokenizer, not per request.
_VOCABULARIES: "weakref.WeakKeyDictionary[Tokenizer, LLTokenizer]" = weakref.WeakKeyDictionary()
# A sequence's next mask is computed here as soon as its token is appended, so it overlaps the next forward pass
# (llguidance lets go of the GIL) instead of adding to the sampler's time. One thread: in turn, 16 rows took
# 0.12 ms here against 1.9 ms in llguidance's own pool.
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")


class _Vocabulary:
    """The shape llguidance's TokenizerWrapper reads: every token's bytes, the special ids, an encode function."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.eos_token_id = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        self.bos_token_id = None
        # Bytes rather than the tokenizer's JSON: the same path serves byte-level BPE and SentencePiece from GGUF.
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = tokenizer.special_token_ids()
        # The backend, not the Tokenizer: _VOCABULARIES' value holding its own key would keep both alive for good.
        self._backend = tokenizer.backend

    def __call__(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids


def vocabulary(tokenizer: Tokenizer) -> LLTokenizer:
    """The grammar library's view of a tokenizer, built once and kept while the tokenizer lives."""
    if tokenizer not in _VOCABULARIES:
        if not tokenizer.eos_token_ids:
            raise InvalidRequestError("structured output needs a model with an end-of-sequence token")
        _VOCABULARIES[tokenizer] = LLTokenizer(TokenizerWrapper(_Vocabulary(tokenizer)), n_vocab=tokenizer.vocab_size,
                                               eos_token=tokenizer.eos_token_ids)
    return _VOCABULARIES[tokenizer]


class GrammarState:
    """A matcher that follows one sequence's output tokens and works out which tokens may come next."""

    def __init__(self, constraint: StructuredOutput, tokenizer: Tokenizer) -> None:
        vocab = vocabulary(tokenizer)
        self.vocab_size = vocab.vocab_size
        self.matcher = LLMatcher(vocab, constraint.compiled)
        self.param = constraint.param
        if self.matcher.is_error():
            raise InvalidRequestError(f"cannot compile the {constraint.param}: {self.matcher.get_error()}",
                                      constraint.param)
        # True when the grammar allows nothing more (not even optional text): the output is whole.
        self.is_complete = False
        self._mask = _POOL.submit(self._compute_mask)
        # A schema whose grammar ends before any text ({"$ref": "#"}) would answer "" with finish_reason "stop". The
        # library finds it ended once it computes the first mask.
        if constraint.json is not None:
            self._mask.result()
            if self.matcher.is_stopped():
                raise InvalidRequestError(f"the {constraint.param}'s JSON schema compiles to a grammar that admits "
                                          "only an empty output, no JSON value", constraint.param)

    def copy(self) -> "GrammarState":
        """A state at the same place in the same grammar, without building its matcher again."""
        self._mask.result()  # NOTE: the matcher must not be copied while a mask is computed from it
        twin = object.__new__(GrammarState)
        twin.vocab_size, twin.param, twin.is_complete = self.vocab_size, self.param, self.is_complete
        twin.matcher = self.matcher.deep_copy()
        twin._mask = _POOL.submit(twin._compute_mask)
        return twin

    def advance(self, token_id: int) -> bool:
        """Consume a sampled token and start on the next mask; False if the grammar rejects the token."""
        self._mask.result()  # NOTE: the matcher must not move while a mask is computed from it
        if not self.matcher.consume_token(token_id):
            logger.warning("grammar rejected token %d: %s", token_id, self.matcher.get_error().splitlines()[0])
            return False
        self.is_complete = self.matcher.is_stopped()
        if not self.is_complete:
            self._mask = _POOL.submit(self._compute_mask)
        return True

    def rejected(self) -> InvalidRequestError:
        """The error for a sampled token the grammar rejected: the mask allowed it, so the library gave up on the
        grammar (e.g. a lexer past its limits)."""
        reason = self.matcher.get_error().splitlines()[0]  # the rest is the library's dump of its parser state
        return InvalidRequestError(f"the {self.param} could not be followed: {reason}", self.param)

    def mask(self) -> torch.Tensor:
        """The allowed next tokens as llguidance's bitmask, [1, ceil(vocab / 32)] int32."""
        return self._mask.result()

    def _compute_mask(self) -> torch.Tensor:
        bitmask = allocate_token_bitmask(1, self.vocab_size)
        fill_next_token_bitmask(self.matcher, bitmask, 0)
        return bitmask
