"""Text <-> token ids for a checkpoint directory in Hugging Face layout, plus its chat template.

The tokenizer itself is the `tokenizers` library reading `tokenizer.json`; `tokenizer_config.json` adds the
special-token names and the chat template, which is rendered in a sandboxed jinja2 environment that offers
what Hugging Face chat templates expect (trim_blocks/lstrip_blocks, `raise_exception`, a non-escaping
`tojson`, `strftime_now`, loop controls)."""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers

from orthrus.errors import OrthrusError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

_REPLACEMENT_CHARACTER = "\ufffd"
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _read_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OrthrusError(f"cannot read {path}: {error}") from error


def _token_content(value: object, field: str, config_path: Path) -> str | None:
    """tokenizer_config.json writes a special token either as its text or as a serialized AddedToken."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise OrthrusError(f"{config_path}: '{field}' must be a string or an object with a string 'content', got {value!r}")


def _select_chat_template(value: object, config_path: Path) -> str | None:
    """Some checkpoints store several named templates; generation uses the one named 'default'."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for entry in value:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise OrthrusError(
                    f"{config_path}: 'chat_template' list entries must be {{'name': str, 'template': str}}")
            named[entry["name"]] = entry["template"]
        if "default" not in named:
            raise OrthrusError(f"{config_path}: 'chat_template' has no template named 'default' (has {sorted(named)})")
        return named["default"]
    raise OrthrusError(f"{config_path}: 'chat_template' must be a string or a list of named templates")


class _GenerationTagExtension(jinja2.ext.Extension):
    """Training-oriented templates wrap assistant turns in {% generation %} to mark loss spans; for
    inference the body is rendered unchanged, but the tag must parse."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` objects accept attribute assignment from templates; refusing underscore names keeps
    untrusted templates away from Python internals even through that path."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set attribute {name!r} on a namespace")


def _raise_template_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson HTML-escapes '<', '>', '&' and "'", which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format_string):
    return datetime.datetime.now().strftime(format_string)


def _chat_template_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTagExtension, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_template_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["namespace"] = _TemplateNamespace
    return environment


def _validate_messages(messages: object) -> None:
    if not isinstance(messages, list):
        raise OrthrusError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise OrthrusError("messages is empty: a chat needs at least one message")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise OrthrusError(
                f"messages[{index}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        for field in ("role", "content"):
            if field not in message:
                raise OrthrusError(f"messages[{index}] has no '{field}'")
            if not isinstance(message[field], str):
                raise OrthrusError(
                    f"messages[{index}]['{field}'] must be a string, got {type(message[field]).__name__}")


def _validate_ids(ids: object, parameter: str) -> list[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise OrthrusError(f"{parameter} must be a sequence of token ids, got {type(ids).__name__}")
    checked = []
    for position, token_id in enumerate(ids):
        # Accepts numpy/torch integer scalars too; bool is an int subclass but never a token id.
        if isinstance(token_id, bool) or not hasattr(token_id, "__index__"):
            raise OrthrusError(f"{parameter}[{position}] must be an integer token id, got {type(token_id).__name__}")
        value = token_id.__index__()
        if value < 0:
            raise OrthrusError(f"{parameter}[{position}] is negative ({value})")
        checked.append(value)
    return checked


class Tokenizer:
    def __init__(self, backend: tokenizers.Tokenizer, config: dict, chat_template: str | None,
                 chat_template_source: str, config_path: Path):
        self._backend = backend
        self._chat_template = chat_template
        self._chat_template_source = chat_template_source
        self._compiled_chat_template = None
        self._special_tokens = {name: _token_content(config.get(name), name, config_path)
                                for name in _SPECIAL_TOKEN_NAMES}
        eos = self._special_tokens["eos_token"]
        self._eos_token_ids: set[int] = set()
        if eos is not None:
            eos_id = backend.token_to_id(eos)
            if eos_id is None:
                raise OrthrusError(f"{config_path}: eos_token {eos!r} is not in the tokenizer's vocabulary")
            self._eos_token_ids.add(eos_id)

    @classmethod
    def from_directory(cls, path: str | os.PathLike) -> Tokenizer | None:
        directory = Path(path)
        if not directory.is_dir():
            raise OrthrusError(f"checkpoint directory {directory} does not exist or is not a directory")
        tokenizer_path = directory / TOKENIZER_FILE
        if not tokenizer_path.exists():
            return None
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_path))
        except Exception as error:  # the Rust side raises plain Exception for every kind of bad file
            raise OrthrusError(f"cannot load {tokenizer_path}: {error}") from error

        config_path = directory / TOKENIZER_CONFIG_FILE
        config = {}
        if config_path.exists():
            config = _read_json(config_path)
            if not isinstance(config, dict):
                raise OrthrusError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
            _reconcile_added_tokens(backend, config.get("added_tokens_decoder"), config_path)

        # A separate chat_template.jinja is how newer checkpoints store the template, and it wins over a
        # (possibly stale) copy inside tokenizer_config.json, as in transformers.
        template_path = directory / CHAT_TEMPLATE_FILE
        if template_path.exists():
            try:
                chat_template = template_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise OrthrusError(f"cannot read {template_path}: {error}") from error
            template_source = str(template_path)
        else:
            chat_template = _select_chat_template(config.get("chat_template"), config_path)
            template_source = str(config_path)
        return cls(backend, config, chat_template, template_source, config_path)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise OrthrusError(f"text must be a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once, tokenized in parallel by the tokenizers library (training corpora)."""
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise OrthrusError("texts must be a list of str")
        return [encoding.ids for encoding in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Ids the vocabulary lacks decode to nothing, as in transformers: embedding tables are often
        padded beyond the tokenizer's vocabulary, and a model may still emit one of those rows."""
        return self._backend.decode(_validate_ids(ids, "ids"), skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            enable_thinking: bool | None = None) -> str:
        _validate_messages(messages)
        if self._chat_template is None:
            raise OrthrusError("this checkpoint has no chat_template (neither in tokenizer_config.json nor in "
                               "chat_template.jinja); encode a raw prompt instead")
        if self._compiled_chat_template is None:
            try:
                self._compiled_chat_template = _chat_template_environment().from_string(self._chat_template)
            except jinja2.TemplateError as error:
                raise OrthrusError(f"chat template from {self._chat_template_source} does not compile: {error}") \
                    from error
        # Unset special tokens stay undefined (not None), so `bos_token is defined` works as in transformers.
        variables = {name: token for name, token in self._special_tokens.items() if token is not None}
        variables.update(messages=messages, add_generation_prompt=add_generation_prompt)
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        try:
            return self._compiled_chat_template.render(**variables)
        except jinja2.TemplateError as error:
            raise OrthrusError(f"chat template from {self._chat_template_source} failed: {error}") from error

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self._eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        if not isinstance(token, str):
            raise OrthrusError(f"token must be a str, got {type(token).__name__}")
        return self._backend.token_to_id(token)


def _reconcile_added_tokens(backend: tokenizers.Tokenizer, added_tokens_decoder: object, config_path: Path) -> None:
    """tokenizer_config.json may declare added tokens that tokenizer.json lacks (transformers adds them on
    load). They can only be added at the ids declared, i.e. in order at the end of the vocabulary; anything
    else means the two files disagree."""
    if added_tokens_decoder is None:
        return
    if not isinstance(added_tokens_decoder, dict):
        raise OrthrusError(f"{config_path}: 'added_tokens_decoder' must be an object mapping ids to tokens")
    declared = []
    for key, entry in added_tokens_decoder.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise OrthrusError(f"{config_path}: added_tokens_decoder key {key!r} is not a token id")
        content = _token_content(entry, f"added_tokens_decoder[{key}]", config_path)
        declared.append((int(key), content, isinstance(entry, dict) and bool(entry.get("special", False))))
    for token_id, content, special in sorted(declared):
        existing_id = backend.token_to_id(content)
        if existing_id == token_id:
            continue
        if existing_id is not None:
            raise OrthrusError(f"{config_path}: added token {content!r} is declared as id {token_id} but "
                               f"{TOKENIZER_FILE} has it as id {existing_id}")
        next_id = backend.get_vocab_size(with_added_tokens=True)
        if token_id != next_id:
            raise OrthrusError(f"{config_path}: added token {content!r} is declared as id {token_id}, which "
                               f"{TOKENIZER_FILE} does not have and which cannot be appended (next free id {next_id})")
        token = tokenizers.AddedToken(content, special=special, normalized=not special)
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])


class IncrementalDecoder:
    """Streams text for a growing sequence of ids.

    Each push decodes only a short window: the ids of the previous emitted piece (so that decoders whose
    output depends on the preceding token see the same context) plus the ids not yet emitted. Text is
    emitted only when the window's decoding does not end in U+FFFD, i.e. only when the bytes so far end on
    a complete UTF-8 character; a byte-level decoding then splits exactly at that point, which makes the
    concatenation of the pieces equal to one decode of all ids."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        if not isinstance(tokenizer, Tokenizer):
            raise OrthrusError(f"tokenizer must be an orthrus Tokenizer, got {type(tokenizer).__name__}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Window = ids of the last emitted piece followed by ids not yet emitted.
        self._window: list[int] = []
        self._emitted_count = 0  # how many leading ids of the window belong to the last emitted piece

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, ids: list[int]) -> str:
        self._window.extend(_validate_ids(ids, "ids"))
        return self._emit(hold_incomplete_character=True)

    def flush(self) -> str:
        return self._emit(hold_incomplete_character=False)

    def _emit(self, hold_incomplete_character: bool) -> str:
        if len(self._window) == self._emitted_count:
            return ""
        window_text = self._decode(self._window)
        if hold_incomplete_character and window_text.endswith(_REPLACEMENT_CHARACTER):
            return ""
        context_text = self._decode(self._window[:self._emitted_count])
        if not window_text.startswith(context_text):
            raise OrthrusError("the tokenizer's decoder is not context-local (decoding more ids changed the text of "
                               "earlier ones), so incremental decoding cannot match a full decode")
        del self._window[:self._emitted_count]
        self._emitted_count = len(self._window)
        return window_text[len(context_text):]
