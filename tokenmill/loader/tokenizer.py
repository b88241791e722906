"""Tokenizer: text <-> token ids and chat templates, from tokenizer.json or GGUF metadata."""

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from tokenmill.errors import InvalidRequestError, ModelLoadError, is_text
from tokenmill.loader.json_file import read_json_object

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from jinja2 import Template
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from tokenmill.loader.gguf import GGUFFile

# GGUF token_type values (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
# SentencePiece writes a space inside its pieces as this character.
_SPM_SPACE = "\u2581"

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's `tokenizer.ggml.pre` names (src/llama-vocab.cpp) to the split regex the vocabulary was trained with.
_LLAMA3_PRES = ("llama3", "llama-bpe", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
_PRE_SPLITS = {**dict.fromkeys(_LLAMA3_PRES, _LLAMA3_SPLIT),
               **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "megrez"), _QWEN2_SPLIT)}
# Names whose vocabularies split as GPT-2's, as the byte-level default does.
_GPT2_PRES = {"default", "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
              "mellum", "exaone4"}
# Hugging Face's apply_chat_template arguments that shape its return, not the template: no template variables.
_HF_ONLY_ARGUMENTS = {"chat_template", "return_dict", "return_tensors", "padding", "truncation", "max_length",
                      "return_assistant_tokens_mask", "tokenizer_kwargs"}
# Names whose vocabularies split every digit off, then split as GPT-2's.
_DIGIT_PRES = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
# Tokens that end generation in llama.cpp (src/llama-vocab.cpp) whatever the file's metadata names.
_END_OF_GENERATION = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
                      "_<EOT>", "<|end_of_text|>", "<end_of_utterance>")
# Byte-level vocabularies that llama.cpp gives a BOS where the file does not say.
_BOS_PRES = {*_LLAMA3_PRES, "tekken", "chameleon"}


@lru_cache(maxsize=8)
def literal_backend(backend: BackendTokenizer) -> BackendTokenizer:
    """A copy of backend that reads special-token text as plain text (llama.cpp's parse_special false): the flag is
    the backend's own state, which concurrent encodes share."""
    literal = BackendTokenizer.from_str(backend.to_str())
    literal.encode_special_tokens = True
    return literal


class Tokenizer:
    """Encodes and decodes text and renders chat templates for one model."""

    def __init__(
        self,
        backend: BackendTokenizer,
        eos_token_ids: list[int],
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        tool_chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.eos_token_ids = eos_token_ids
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        # A second template for chats with tools, where the model has one (Hugging Face's and llama.cpp's tool_use).
        self.tool_chat_template = tool_chat_template
        # The other special tokens a Hugging Face folder names (pad_token, unk_token, ...), which transformers (and so
        # vLLM) gives every template beside bos_token and eos_token; a request's chat_template_kwargs may set them.
        self.template_tokens: dict[str, Any] = {}
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        # Byte-level BPE (GPT-2 style) spells each byte as one printable character; SentencePiece does not.
        # The decoder's own JSON, not the whole tokenizer's (megabytes of vocabulary and merges).
        self._byte_level = backend.decoder is not None and b'"ByteLevel"' in backend.decoder.__getstate__()
        added = backend.get_added_tokens_decoder()
        self._added = {i: t.content for i, t in added.items()}
        self._special = {i for i, t in added.items() if t.special}  # what decode leaves out

    @property
    def eos_token_id(self) -> int | None:
        """The first end token's id, by Hugging Face's name (vLLM scripts stop on it)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def bos_token_id(self) -> int | None:
        """The BOS token's id, by Hugging Face's name."""
        return self.backend.token_to_id(self.bos_token) if self.bos_token else None

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """Vocabulary strings' ids (None for one not in it), by Hugging Face's name."""
        return self.backend.token_to_id(tokens) if isinstance(tokens, str) else [self.backend.token_to_id(t)
                                                                                for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        """Every vocabulary string's id, added tokens too, by Hugging Face's name."""
        return self.backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @cached_property
    def fingerprint(self) -> str:
        """A digest of the whole tokenizer (vocabulary, merges, added tokens): equal where token ids mean the same."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids for text; add_special_tokens adds the model's BOS where it wants one, parse_special false reads
        special-token text ("<|im_end|>") as plain text."""
        backend = self.backend if parse_special else literal_backend(self.backend)
        try:
            return backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # what tokenizers makes of a lone surrogate (bytes that were not UTF-8): say that
            if isinstance(text, str) and not is_text(text):
                raise InvalidRequestError("the text holds bytes that are not UTF-8 (lone surrogates); send valid "
                                          "Unicode") from None
            raise

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text for token ids."""
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def special_token_ids(self) -> list[int]:
        """Ids of the control tokens, which text never spells and decoding leaves out.

        Not every added token: Gemma 3's user-defined ones ("\n", runs of newlines, HTML tags) are ordinary text.
        """
        return sorted(self._special)

    def is_special(self, token_id: int) -> bool:
        """Whether decoding leaves this token out."""
        return token_id in self._special

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for; a token may hold just part of a UTF-8 character."""
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self.backend.id_to_token(token_id) or ""
        if self._byte_level and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # SentencePiece byte fallback
        if byte:
            return bytes([int(byte.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def token_text(self, token_id: int) -> str:
        """One token's text as it stands in a decoded output: its own bytes (so SentencePiece's word-initial space
        stays, which decoding it alone strips), or nothing for a special token."""
        return "" if self.is_special(token_id) else self.decoded_token(token_id)

    def decoded_token(self, token_id: int) -> str:
        """One token's text as vLLM's Logprob.decoded_token shows it: token_text, but a special token's too."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    @property
    def renders_tools(self) -> bool:
        """Whether the template for chats with tools has its own tool format (it reads `tools`); else the server
        writes tools in."""
        template = self.tool_chat_template or self.chat_template
        return bool(template) and re.search(r"\btools\b", template) is not None

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None,
                            template_kwargs: Mapping[str, Any] | None = None, *,
                            tokenize: bool = False, **variables: Any) -> str | list[int]:
        """Render messages (and the tools on offer, as Hugging Face passes them) into one prompt string (or its
        ids, with tokenize, as the scripts that call Hugging Face's method of this name ask); the template's own
        variables (Qwen3's enable_thinking) come in template_kwargs, or as keywords, as Hugging Face takes them."""
        if tokenize or variables:
            # Hugging Face's arguments that shape what it returns are no template variables: at its defaults (what
            # is returned here) they are let be, else refused as its own method would refuse a stranger.
            shaping = {k: variables.pop(k) for k in _HF_ONLY_ARGUMENTS & set(variables)}
            if unknown := sorted(k for k, v in shaping.items() if v not in (None, False)):
                raise TypeError(f"apply_chat_template() takes no {', '.join(unknown)} here")
            continued = variables.pop("continue_final_message", False)  # Hugging Face's: the final message left open
            kwargs = {**(template_kwargs or {}), **variables}
            if continued:
                text = self._through_final_message(messages, tools, kwargs)
            else:
                text = self.apply_chat_template(messages, add_generation_prompt, tools, kwargs)
            return self.encode(text, add_special_tokens=False) if tokenize else text
        text = self.tool_chat_template if tools and self.tool_chat_template else self.chat_template
        if not text:
            raise InvalidRequestError("this model has no chat template; use a plain completion prompt instead")
        # Imported with the first chat (1.9 MiB): a process that completes text or token ids never needs it.
        import jinja2

        try:
            template = _compiled_template(text)
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"chat template failed on these messages: {exc}") from exc
        _check_template_kwargs(template_kwargs or {}, template.environment.globals)
        try:
            return template.render(
                **{**self.template_tokens, **(template_kwargs or {})},
                messages=messages,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"chat template failed on these messages: {exc}") from exc
        except (TypeError, ValueError) as exc:
            if not template_kwargs:
                raise
            # A variable of the wrong kind (Llama 3.1's date_string as a number) fails inside the template.
            raise InvalidRequestError(f"chat template failed with these chat_template_kwargs: {exc}",
                                      param="chat_template_kwargs") from exc

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    add_generation_prompt: bool | None = None, continue_final_message: bool = False,
                    template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
        """Prompt token ids of a conversation awaiting the reply (add_generation_prompt None: unless continued)."""
        # Hugging Face and vLLM take add_generation_prompt True by default and refuse it beside continuing.
        if not continue_final_message:
            text = self.apply_chat_template(messages, add_generation_prompt is not False, tools, template_kwargs)
        elif add_generation_prompt:
            raise InvalidRequestError("continue_final_message continues the last message and add_generation_prompt "
                                      "opens a new one; set at most one", param="continue_final_message")
        else:
            text = self._through_final_message(messages, tools, template_kwargs)
        # The template writes BOS itself where the model wants one; adding it again would double it.
        return self.encode(text, add_special_tokens=False)

    def _through_final_message(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                               template_kwargs: Mapping[str, Any] | None) -> str:
        """The chat rendered up to the end of its final message's text, so that the model continues that message."""
        if not messages:
            raise InvalidRequestError("continue_final_message needs a message to continue",
                                      param="continue_final_message")
        # As transformers does: a tag after the text marks where it ends (the text itself may stand again later, in
        # an end-of-turn token like <|im_end|> for "d").
        final = {**messages[-1], "content": (messages[-1].get("content") or "") + _CONTINUE_TAG}
        rendered = self.apply_chat_template([*messages[:-1], final], False, tools, template_kwargs)
        end = rendered.rfind(_CONTINUE_TAG.strip())
        if end < 0:
            raise InvalidRequestError("continue_final_message: the chat template does not write the final message's "
                                      "text as given, so it cannot be continued", param="continue_final_message")
        # A template that strips the text's trailing space strips the tag's: then the text's own goes too.
        return rendered[:end] if rendered.startswith(_CONTINUE_TAG, end) else rendered[:end].rstrip()

    @classmethod
    def from_hf_dir(cls, path: Path, eos_token_ids: list[int]) -> "Tokenizer":
        """Load tokenizer.json plus the chat template and special tokens from tokenizer_config.json."""
        if not (path / "tokenizer.json").is_file() and (path / "tokenizer.model").is_file():
            raise ModelLoadError(f"{path} has a SentencePiece tokenizer.model but no tokenizer.json, which is what "
                                 "tokenmill reads; write one with transformers' AutoTokenizer.from_pretrained(folder)"
                                 ".save_pretrained(folder)")
        try:
            backend = BackendTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception on a missing or bad file
            raise ModelLoadError(f"cannot read {path / 'tokenizer.json'}: {exc}") from exc
        # A file saved with padding or truncation on (after training, as all-MiniLM's) padded every prompt to, or
        # cut it at, that length, silently; transformers' tokenizer applies neither unless asked.
        backend.no_padding()
        backend.no_truncation()
        config_file = path / "tokenizer_config.json"
        config = read_json_object(config_file) if config_file.is_file() else {}
        bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        # The tokenizer's own EOS ends a reply too, beside generation_config's: a ChatML fine-tune names <|im_end|>
        # here and keeps its base's </s> there (vLLM stops at both; llama.cpp's converter takes this one).
        eos_id = None if eos is None else backend.token_to_id(eos)
        if eos_id is not None and eos_id not in eos_token_ids:
            eos_token_ids = [*eos_token_ids, eos_id]
        tokenizer = cls(backend, eos_token_ids, bos, eos, *_hf_chat_templates(path, config.get("chat_template")))
        tokenizer.template_tokens = {key: _token_text(config[key]) for key in _TEMPLATE_TOKENS if config.get(key)}
        return tokenizer

    @classmethod
    def from_gguf(cls, gguf: "GGUFFile", eos_token_ids: list[int]) -> "Tokenizer":
        """Rebuild the tokenizer a GGUF file describes in its tokenizer.ggml.* metadata."""
        metadata = gguf.metadata
        kind = metadata.get("tokenizer.ggml.model")
        if kind is None:
            raise ModelLoadError(f"{gguf.path} has no tokenizer (no tokenizer.ggml.model key); convert the model again "
                                 "with llama.cpp's convert_hf_to_gguf.py, which writes it into the file")
        if kind not in _GGUF_BACKENDS:
            raise ModelLoadError(
                f"GGUF tokenizer model {kind!r} is not supported yet; supported: 'gpt2' (byte-level BPE), "
                "'llama' (SentencePiece BPE)"
            )
        # The vocabulary's strings live only inside this call: what the Tokenizer keeps is made after.
        backend = _gguf_backend(gguf, kind)
        bos_id, eos_id = metadata.get("tokenizer.ggml.bos_token_id"), metadata.get("tokenizer.ggml.eos_token_id")
        bos, eos = _special_token(backend, "bos", bos_id), _special_token(backend, "eos", eos_id)
        # llama.cpp adds BOS to a SentencePiece vocabulary, and to Llama 3's, whose file does not say otherwise.
        adds_bos = kind == "llama" or metadata.get("tokenizer.ggml.pre") in _BOS_PRES
        first = [(bos, bos_id)] if metadata.get("tokenizer.ggml.add_bos_token", adds_bos) and bos is not None else []
        last = [(eos, eos_id)] if metadata.get("tokenizer.ggml.add_eos_token", False) and eos is not None else []
        if first or last:
            single = " ".join([*(t for t, _ in first), "$A", *(t for t, _ in last)])
            backend.post_processor = processors.TemplateProcessing(
                single=single, pair=f"{single} {single.replace('$A', '$B')}", special_tokens=first + last
            )
        # llama.cpp ends generation at these tokens too, found by their text: a file's metadata often names only
        # one end (Gemma 3's <eos>, where its chats end each turn with <end_of_turn>). The file's own ids stay first.
        ends = (backend.token_to_id(text) for text in _END_OF_GENERATION)
        eos_token_ids = [*eos_token_ids, *sorted({i for i in ends if i is not None} - set(eos_token_ids))]
        return cls(backend, eos_token_ids, bos, eos, metadata.get("tokenizer.chat_template"),
                   metadata.get("tokenizer.chat_template.tool_use"))  # llama.cpp's name for the named template


def _hf_chat_templates(path: Path, configured: str | list | None) -> tuple[str | None, str | None]:
    """The folder's chat template (chat_template.jinja, where transformers now saves it, else tokenizer_config's)
    and, from a list of named ones as older transformers saved several, its tool_use template."""
    if isinstance(configured, list):
        named = {t.get("name"): t.get("template") for t in configured if isinstance(t, dict)}
    else:
        named = {"default": configured}
    jinja_file = path / "chat_template.jinja"
    default = jinja_file.read_text() if jinja_file.is_file() else named.get("default")
    # Where transformers 5 saves the named ones beside it.
    tool_file = path / "additional_chat_templates" / "tool_use.jinja"
    return default, tool_file.read_text() if tool_file.is_file() else named.get("tool_use")


def _gguf_backend(gguf: "GGUFFile", kind: str) -> BackendTokenizer:
    """The backend for the file's vocabulary, its control and user-defined tokens added as llama.cpp matches them."""
    tokens: list[str] | None = gguf.array("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"GGUF file {gguf.path} names a {kind!r} tokenizer but has no tokenizer.ggml.tokens")
    types: list[int] = gguf.array("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    backend = _GGUF_BACKENDS[kind](gguf, tokens, types)
    # llama.cpp matches unknown-type tokens (SentencePiece's <unk>) whole too, as transformers does.
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (_UNKNOWN, _CONTROL)]
    )
    # A run of spaces the SentencePiece backend respelled is an ordinary piece, reached by merges.
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types)
            if k == _USER_DEFINED and backend.token_to_id(t) is not None
        ]
    )
    return backend


def _special_token(backend: BackendTokenizer, kind: str, token_id: int | None) -> str | None:
    """The text of the file's BOS or EOS token; None where the file names none."""
    if token_id is None:
        return None
    text = backend.id_to_token(token_id)
    if text is None:  # past the vocabulary, or a duplicate string whose later id took it
        raise ModelLoadError(f"GGUF tokenizer.ggml.{kind}_token_id {token_id} names no token of the vocabulary")
    return text


def _byte_level_backend(gguf: "GGUFFile", tokens: list[str], types: list[int]) -> BackendTokenizer:
    """Byte-level BPE (GPT-2 style) from the file's vocabulary and merges."""
    merges = [tuple(m.split(" ", 1)) for m in gguf.array("tokenizer.ggml.merges") or []]
    backend = BackendTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(gguf.metadata.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    return backend


def _gpt2_byte_chars() -> dict[str, int]:
    """GPT-2's map from the printable stand-in character of each byte back to the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _gpt2_byte_chars()


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre in _PRE_SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in _DIGIT_PRES:
        # SmolLM's own tokenizer.json splits every digit, then applies GPT-2's regex (so does llama.cpp, for these).
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if pre is not None and pre not in _GPT2_PRES:
        # As llama.cpp does; such a vocabulary may split text (digits, punctuation, newlines) as it was not trained to.
        logger.warning("GGUF pre-tokenizer %r is not known here: splitting text as GPT-2 does", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def _sentencepiece_backend(gguf: "GGUFFile", tokens: list[str], types: list[int]) -> BackendTokenizer:
    """SentencePiece BPE: merges implied by the pieces' ranks, characters outside the vocabulary as <0xNN> bytes."""
    # Gemma's file spells its runs of spaces with real spaces, but text reaches the pieces with each space as U+2581.
    pieces = [_SPM_SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
    # llama.cpp scores every piece 0 where the file has no scores (equal scores then rank merges in file order
    # here, where llama.cpp merges the leftmost pair of the text first).
    scores = gguf.array("tokenizer.ggml.scores") or [0.0] * len(pieces)
    unk_id = gguf.metadata.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(
        {p: i for i, p in enumerate(pieces)},
        _sentencepiece_merges(pieces, scores, types),
        unk_token=pieces[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = BackendTokenizer(model)
    # llama.cpp's default where the file does not say: the text's first word is marked as a word start too.
    prefix = gguf.metadata.get("tokenizer.ggml.add_space_prefix", True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        _SPM_SPACE, prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    # The space the encoder put before the text is not the text's own.
    backend.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)
    return backend


def _sentencepiece_merges(pieces: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges that make SentencePiece's choices: every split of a piece into two pieces, best piece first."""
    known = set(pieces)
    # SentencePiece merges the pair that forms the highest-scored piece. Pieces it never builds by merging
    # (control, user-defined, bytes) carry placeholder scores, -1000 on Gemma's runs of spaces; it matches
    # user-defined ones whole before merging anything, so their merges rank first, in file order.
    order = sorted(range(len(pieces)), key=lambda i: (True, -scores[i]) if types[i] == _NORMAL else (False, i))
    merges = []
    for i in order:
        piece = pieces[i]
        for cut in range(len(piece) - 1, 0, -1):  # longer left part first, as transformers orders them
            if piece[:cut] in known and piece[cut:] in known:
                merges.append((piece[:cut], piece[cut:]))
    return merges


_GGUF_BACKENDS = {"gpt2": _byte_level_backend, "llama": _sentencepiece_backend}



def _token_text(token: Any) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as AddedToken dicts.
    return token.get("content") if isinstance(token, dict) else token


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """Jinja's tojson as transformers defines it for chat templates: unescaped, with json.dumps' keywords."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# transformers' {% generation %} marks the assistant's tokens for training masks and renders its body as it is.
_GENERATION_TAG = re.compile(r"(\{%[-+]?\s*)(end)?generation(\s*[-+]?%\})")
# Appended to a final message to be continued, to find where its text ends once rendered.
_CONTINUE_TAG = "TOKENMILL_CONTINUE_HERE "
# What apply_chat_template itself passes a template: a request's chat_template_kwargs may not replace them.
_TEMPLATE_VARIABLES = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}
# tokenizer_config.json's other special tokens, as transformers' special_tokens_map names them.
_TEMPLATE_TOKENS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _plain_block(tag: re.Match) -> str:
    """A generation tag as a block that renders its body (its whitespace control kept)."""
    return f"{tag[1]}{'endif' if tag[2] else 'if true'}{tag[3]}"


def _check_template_kwargs(template_kwargs: Mapping[str, Any], functions: Mapping[str, Any]) -> None:
    """Refuse kwargs that would replace what apply_chat_template sets, or a function templates call (namespace)."""
    if not all(isinstance(name, str) for name in template_kwargs):
        raise InvalidRequestError("chat_template_kwargs must map names to values", param="chat_template_kwargs")
    taken = sorted((_TEMPLATE_VARIABLES | set(functions)) & set(template_kwargs))
    if taken:
        raise InvalidRequestError(f"chat_template_kwargs may not set {', '.join(taken)}: the request's own fields, "
                                  "the model's tokens and the template's functions are set",
                                  param="chat_template_kwargs")


@lru_cache(maxsize=16)
def _compiled_template(text: str) -> "Template":
    """A chat template compiled once (2.4 ms each chat for SmolLM2's small one; tool templates take longer)."""
    return _jinja_env().from_string(_GENERATION_TAG.sub(_plain_block, text))


def _jinja_env() -> "ImmutableSandboxedEnvironment":
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The same settings Hugging Face uses, so templates written for it render identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
