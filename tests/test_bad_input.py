"""Bad checkpoints and bad arguments: each must raise OrthrusError naming the file, tensor or parameter."""

import json
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import save_file

import orthrus
from orthrus import OrthrusError
from checkpoints import TINY_CONFIG, random_weights, write_checkpoint, write_tokenizer

VOCAB = TINY_CONFIG["vocab_size"]


def load(directory):
    return orthrus.load(directory, device="cpu")


def path_pattern(path) -> str:
    return re.escape(str(path))


@pytest.fixture
def checkpoint(tmp_path, tiny_orthrus_dir):
    """A private copy of the good tiny Orthrus checkpoint (with tokenizer), free to break."""
    directory = tmp_path / "checkpoint"
    shutil.copytree(tiny_orthrus_dir, directory)
    return directory


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return path


def rewrite_weights(directory, weights):
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory / "model.safetensors"


def good_weights():
    return random_weights(dict(TINY_CONFIG), orthrus=True)


@pytest.fixture(scope="module")
def plain_qwen3_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("plain_qwen3")
    write_checkpoint(directory, orthrus=False)
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def no_tokenizer_model(tmp_path_factory):
    return load(write_checkpoint(tmp_path_factory.mktemp("no_tokenizer")))


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("sharded"), shards=3)


@pytest.fixture
def sharded(tmp_path, sharded_dir):
    directory = tmp_path / "sharded"
    shutil.copytree(sharded_dir, directory)
    return directory


# --------------------------------------------------------------------------------------------------------
# config.json

def test_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(OrthrusError, match=path_pattern(checkpoint / "config.json") + ".*not found"):
        load(checkpoint)


@pytest.mark.parametrize("content", ["{\"vocab_size\": 384,", "not json at all", ""])
def test_config_bad_json(checkpoint, content):
    (checkpoint / "config.json").write_text(content)
    with pytest.raises(OrthrusError, match=path_pattern(checkpoint / "config.json") + ": not valid JSON"):
        load(checkpoint)


def test_config_binary_garbage(checkpoint):
    (checkpoint / "config.json").write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(OrthrusError, match=path_pattern(checkpoint / "config.json") + ": not valid JSON"):
        load(checkpoint)


def test_config_not_an_object(checkpoint):
    (checkpoint / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(OrthrusError, match=path_pattern(checkpoint / "config.json") + ": expected a JSON object"):
        load(checkpoint)


def test_config_is_a_directory(checkpoint):
    (checkpoint / "config.json").unlink()
    (checkpoint / "config.json").mkdir()
    with pytest.raises(OrthrusError, match=path_pattern(checkpoint / "config.json") + ": cannot read"):
        load(checkpoint)


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads"])
def test_config_missing_field(checkpoint, field):
    edit_config(checkpoint, **{field: ...})
    with pytest.raises(OrthrusError, match=f"config.json: missing required field '{field}'"):
        load(checkpoint)


@pytest.mark.parametrize("field, value, message", [
    ("vocab_size", "384", "field 'vocab_size' must be an integer"),
    ("hidden_size", 0, "field 'hidden_size' must be >= 1"),
    ("num_hidden_layers", True, "field 'num_hidden_layers' must be an integer"),
    ("max_position_embeddings", 1.5, "field 'max_position_embeddings' must be an integer"),
    ("rms_norm_eps", -1e-6, "field 'rms_norm_eps' must be a positive number"),
    ("rope_theta", "big", "field 'rope_theta' must be a positive number"),
    ("eos_token_id", "383", "field 'eos_token_id' must be an integer or a list"),
    ("tie_word_embeddings", "no", "field 'tie_word_embeddings' must be true or false"),
    ("num_key_value_heads", 3, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    ("head_dim", 15, "head_dim must be even"),
    ("model_type", "llama", "model_type 'llama' is not supported"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope type 'yarn' is not supported"),
    ("block_size", 1, "field 'block_size' must be >= 2"),
])
def test_config_bad_field(checkpoint, field, value, message):
    path = edit_config(checkpoint, **{field: value})
    with pytest.raises(OrthrusError, match=path_pattern(path) + ": " + message):
        load(checkpoint)


def test_mask_token_id_outside_vocabulary(checkpoint):
    path = edit_config(checkpoint, mask_token_id=VOCAB)
    with pytest.raises(OrthrusError, match=path_pattern(path) + f": mask_token_id {VOCAB} is outside the vocabulary"):
        load(checkpoint)


def test_block_size_without_mask_token_id(checkpoint):
    path = edit_config(checkpoint, mask_token_id=...)
    with pytest.raises(OrthrusError, match=path_pattern(path) + ": missing required field 'mask_token_id'"):
        load(checkpoint)


def test_diff_tensors_without_block_size(tmp_path):
    # The weights carry the diffusion view, the config (a plain qwen3 one) does not describe it.
    directory = write_checkpoint(tmp_path / "ckpt", orthrus=False, weights=good_weights())
    with pytest.raises(OrthrusError, match=path_pattern(directory / "config.json") + ".*_diff tensors.*'block_size'"):
        load(directory)


def test_orthrus_config_without_diff_tensors(tmp_path):
    directory = write_checkpoint(tmp_path / "ckpt", weights=random_weights(dict(TINY_CONFIG), orthrus=False))
    with pytest.raises(OrthrusError, match="missing tensor.*model.layers.0.self_attn.k_norm_diff.weight"):
        load(directory)


# --------------------------------------------------------------------------------------------------------
# safetensors files and tensors

def test_missing_weights_file(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(OrthrusError, match=path_pattern(checkpoint) + ": no model.safetensors or "
                                           "model.safetensors.index.json"):
        load(checkpoint)


@pytest.mark.parametrize("damage", ["half", "last_bytes", "garbage", "empty", "bad_header"])
def test_corrupt_weights_file(checkpoint, damage):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    damaged = {
        "half": data[:len(data) // 2],
        "last_bytes": data[:-3],
        "garbage": bytes(range(256)) * 8,
        "empty": b"",
        "bad_header": (64).to_bytes(8, "little") + b"{this is not json" + b" " * 47,
    }[damage]
    path.write_bytes(damaged)
    with pytest.raises(OrthrusError, match=path_pattern(path) + ": cannot read safetensors file"):
        load(checkpoint)


def test_missing_tensor(checkpoint):
    weights = good_weights()
    del weights["model.layers.1.mlp.down_proj.weight"]
    rewrite_weights(checkpoint, weights)
    with pytest.raises(OrthrusError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.down_proj\.weight"):
        load(checkpoint)


def test_missing_lm_head_untied(checkpoint):
    weights = good_weights()
    del weights["lm_head.weight"]
    rewrite_weights(checkpoint, weights)
    with pytest.raises(OrthrusError, match=r"missing tensor\(s\) lm_head\.weight"):
        load(checkpoint)


def test_unexpected_tensor(checkpoint):
    weights = good_weights()
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    path = rewrite_weights(checkpoint, weights)
    with pytest.raises(OrthrusError, match=path_pattern(path) + r": unexpected tensor\(s\) "
                                           r"model\.layers\.0\.self_attn\.rotary_emb\.inv_freq"):
        load(checkpoint)


def test_tensor_for_a_layer_beyond_num_hidden_layers(checkpoint):
    weights = good_weights()
    weights["model.layers.2.input_layernorm.weight"] = torch.ones(TINY_CONFIG["hidden_size"])
    rewrite_weights(checkpoint, weights)
    with pytest.raises(OrthrusError, match=r"unexpected tensor\(s\) model\.layers\.2\.input_layernorm\.weight"):
        load(checkpoint)


@pytest.mark.parametrize("name, shape", [
    ("model.norm.weight", (3,)),
    ("model.layers.0.self_attn.q_proj.weight", (32, 64)),
    ("model.layers.1.self_attn.o_proj_diff.weight", (64, 63)),
    ("model.embed_tokens.weight", (VOCAB + 1, 64)),
])
def test_wrong_shape(checkpoint, name, shape):
    weights = good_weights()
    weights[name] = torch.zeros(shape)
    path = rewrite_weights(checkpoint, weights)
    with pytest.raises(OrthrusError, match=path_pattern(path) + f": tensor {re.escape(name)} has shape "
                                           + re.escape(str(shape))):
        load(checkpoint)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_tensor_where_floats_are_expected(checkpoint, dtype):
    name = "model.layers.0.mlp.up_proj.weight"
    weights = good_weights()
    weights[name] = weights[name].to(dtype)
    path = rewrite_weights(checkpoint, weights)
    with pytest.raises(OrthrusError, match=path_pattern(path) + f": tensor {re.escape(name)} has dtype {dtype}"):
        load(checkpoint)


# --------------------------------------------------------------------------------------------------------
# sharded checkpoints

def test_sharded_loads(sharded):
    assert load(sharded).generate([1, 2, 3], max_new_tokens=4, mode="ar").tokens


def test_missing_shard(sharded):
    shard = sharded / "model-00002-of-00003.safetensors"
    shard.unlink()
    with pytest.raises(OrthrusError, match=path_pattern(shard) + ": shard listed in model.safetensors.index.json "
                                           "is missing"):
        load(sharded)


def test_index_points_to_the_wrong_shard(sharded):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(n for n, file in sorted(index["weight_map"].items()) if file.startswith("model-00001"))
    index["weight_map"][name] = "model-00003-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(OrthrusError, match=path_pattern(index_path) + f": tensor {re.escape(name)} is not in its "
                                           "listed shard model-00003-of-00003.safetensors"):
        load(sharded)


@pytest.mark.parametrize("content", ['{"weight_map": {', "[]", '{"metadata": {}}', '{"weight_map": ["a"]}'])
def test_corrupt_index(sharded, content):
    index_path = sharded / "model.safetensors.index.json"
    index_path.write_text(content)
    with pytest.raises(OrthrusError, match=path_pattern(index_path)):
        load(sharded)


@pytest.mark.parametrize("shard", [5, ["model-00001-of-00003.safetensors"], "../elsewhere.safetensors", ""])
def test_index_shard_entry_not_a_file_name(sharded, shard):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(OrthrusError, match=path_pattern(index_path) + ": needs a 'weight_map' object mapping "
                                           "tensor names to shard file names"):
        load(sharded)


def test_truncated_shard(sharded):
    shard = sharded / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(OrthrusError, match=path_pattern(shard) + ": cannot read safetensors file"):
        load(sharded)


# --------------------------------------------------------------------------------------------------------
# other checkpoint files, load() arguments, hub ids

def test_corrupt_generation_config(checkpoint):
    (checkpoint / "generation_config.json").write_text("{\"eos_token_id\": ")
    with pytest.raises(OrthrusError, match=path_pattern(checkpoint / "generation_config.json")):
        load(checkpoint)


def test_generation_config_bad_eos(checkpoint):
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": ["383"]}))
    with pytest.raises(OrthrusError, match=path_pattern(checkpoint / "generation_config.json")
                       + ": 'eos_token_id' must be an integer"):
        load(checkpoint)


def test_corrupt_tokenizer(checkpoint):
    (checkpoint / "tokenizer.json").write_text("{\"model\": ")
    with pytest.raises(OrthrusError, match=path_pattern(checkpoint / "tokenizer.json")):
        load(checkpoint)


def test_corrupt_tokenizer_config(checkpoint):
    (checkpoint / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(OrthrusError, match=path_pattern(checkpoint / "tokenizer_config.json")):
        load(checkpoint)


def test_path_is_a_file(checkpoint):
    with pytest.raises(OrthrusError, match=path_pattern(checkpoint / "config.json") + ": not a directory"):
        load(checkpoint / "config.json")


@pytest.mark.parametrize("path", ["/nonexistent/orthrus/checkpoint", "./no-such-dir", "a/b/c"])
def test_nonexistent_directory(path):
    with pytest.raises(OrthrusError, match=re.escape(path) + ": no such checkpoint directory"):
        load(path)


def test_path_wrong_type():
    with pytest.raises(OrthrusError, match="model path must be a str or path, got int"):
        orthrus.load(5)


def test_bad_dtype(tiny_orthrus_dir):
    with pytest.raises(OrthrusError, match="dtype must be torch.float32, torch.float16 or torch.bfloat16, got "
                                           "torch.int8"):
        orthrus.load(tiny_orthrus_dir, device="cpu", dtype=torch.int8)


@pytest.mark.parametrize("device, message", [("toaster", "device 'toaster' is not a valid torch device"),
                                             ("meta", "device meta is not supported")])
def test_bad_device(tiny_orthrus_dir, device, message):
    with pytest.raises(OrthrusError, match=message):
        orthrus.load(tiny_orthrus_dir, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tiny_orthrus_dir):
    with pytest.raises(OrthrusError, match="device cuda: CUDA is not available"):
        orthrus.load(tiny_orthrus_dir, device="cuda")


def test_hub_id_unreachable(monkeypatch, tmp_path):
    constants = pytest.importorskip("huggingface_hub.constants")
    # The offline switch is read at import time into `constants`; set both for whichever the call consults.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OrthrusError, match="nonexistent-org/nonexistent-model: no such local directory, and "
                                           "fetching it from the hub failed.*pass a local checkpoint directory"):
        orthrus.load("nonexistent-org/nonexistent-model", device="cpu")


def test_hub_id_without_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OrthrusError, match="nonexistent-org/nonexistent-model: no such local directory, and "
                                           "huggingface_hub is not installed.*pass a local checkpoint directory"):
        orthrus.load("nonexistent-org/nonexistent-model", device="cpu")


# --------------------------------------------------------------------------------------------------------
# plain Qwen3 checkpoints

def test_plain_qwen3_generates_with_ar_and_refuses_orthrus(plain_qwen3_dir):
    model = load(plain_qwen3_dir)
    assert not model.config.has_diffusion_view
    result = model.generate([5, 6, 7], max_new_tokens=6, mode="ar")
    assert 1 <= len(result.tokens) <= 6 and all(0 <= t < VOCAB for t in result.tokens)
    with pytest.raises(OrthrusError, match=re.escape(str(plain_qwen3_dir)) + " is a plain Qwen3 checkpoint.*"
                                           "`orthrus train`"):
        model.generate([5, 6, 7], max_new_tokens=6, mode="orthrus")


# --------------------------------------------------------------------------------------------------------
# generate() arguments

@pytest.mark.parametrize("prompt, message", [
    ([1, VOCAB], f"prompt: token id {VOCAB} is outside the vocabulary"),
    ([-1, 2], "prompt: token id -1 is outside the vocabulary"),
    ([1, 10**12], "prompt: token id 1000000000000 is outside the vocabulary"),
])
def test_token_ids_outside_vocabulary(tiny_orthrus, prompt, message):
    with pytest.raises(OrthrusError, match=message):
        tiny_orthrus.generate(prompt, max_new_tokens=2)


def test_prompt_plus_new_tokens_beyond_max_positions(tiny_orthrus):
    limit = TINY_CONFIG["max_position_embeddings"]
    prompt = [7] * (limit - 10)
    with pytest.raises(OrthrusError, match=rf"prompt \({limit - 10} tokens\) \+ max_new_tokens \(11\) exceeds the "
                                           rf"model's max_position_embeddings \({limit}\)"):
        tiny_orthrus.generate(prompt, max_new_tokens=11)
    # Exactly at the limit is allowed.
    assert len(tiny_orthrus.generate(prompt, max_new_tokens=10, mode="ar").tokens) <= 10


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "8", None])
def test_bad_max_new_tokens(tiny_orthrus, value):
    with pytest.raises(OrthrusError, match="max_new_tokens must be an integer >= 1"):
        tiny_orthrus.generate([1, 2], max_new_tokens=value)


@pytest.mark.parametrize("value", [-0.5, float("nan"), "0.7", None])
def test_bad_temperature(tiny_orthrus, value):
    with pytest.raises(OrthrusError, match="temperature must be a number >= 0"):
        tiny_orthrus.generate([1, 2], max_new_tokens=2, temperature=value)


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.01, 2, float("nan"), "0.9"])
def test_bad_top_p(tiny_orthrus, value):
    with pytest.raises(OrthrusError, match=r"top_p must be in \(0, 1\]"):
        tiny_orthrus.generate([1, 2], max_new_tokens=2, temperature=1.0, top_p=value)


@pytest.mark.parametrize("value", [-1, 2.0, "5", True])
def test_bad_top_k(tiny_orthrus, value):
    with pytest.raises(OrthrusError, match="top_k must be an integer >= 0"):
        tiny_orthrus.generate([1, 2], max_new_tokens=2, temperature=1.0, top_k=value)


@pytest.mark.parametrize("value", [-1, 1.5, "7"])
def test_bad_seed(tiny_orthrus, value):
    with pytest.raises(OrthrusError, match="seed must be an integer >= 0"):
        tiny_orthrus.generate([1, 2], max_new_tokens=2, temperature=1.0, seed=value)


@pytest.mark.parametrize("mode", ["foo", "AR", "", None])
def test_unknown_mode(tiny_orthrus, mode):
    with pytest.raises(OrthrusError, match=r"mode must be one of \('orthrus', 'ar', 'ngram'\)"):
        tiny_orthrus.generate([1, 2], max_new_tokens=2, mode=mode)


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt(tiny_orthrus, prompt):
    with pytest.raises(OrthrusError, match="prompt is empty"):
        tiny_orthrus.generate(prompt, max_new_tokens=2)


@pytest.mark.parametrize("prompt", [torch.tensor([1, 2]), [[1, 2]], [1, "2"], [1.0, 2.0], 17, None,
                                    [True, False]])
def test_prompt_of_the_wrong_kind(tiny_orthrus, prompt):
    with pytest.raises(OrthrusError, match="prompt must be a str, a list of token ids, or a list of chat messages"):
        tiny_orthrus.generate(prompt, max_new_tokens=2)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user"}], r"messages\[0\] has no 'content'"),
    ([{"content": "hi"}], r"messages\[0\] has no 'role'"),
    ([{"role": "user", "content": 5}], r"messages\[0\]\['content'\] must be a string"),
    ([{"role": "user", "content": "hi"}, {"role": None, "content": "x"}], r"messages\[1\]\['role'\] must be a string"),
    ([{"role": "user", "content": "hi"}, "and more"], "prompt must be a str, a list of token ids, or a list of chat"),
])
def test_malformed_chat_messages(tiny_orthrus, messages, message):
    with pytest.raises(OrthrusError, match=message):
        tiny_orthrus.generate(messages, max_new_tokens=2)


@pytest.mark.parametrize("stop", ["", [""], ["ok", 3], 5])
def test_bad_stop(tiny_orthrus, stop):
    with pytest.raises(OrthrusError, match="stop must be a non-empty string or a list of them"):
        tiny_orthrus.generate([1, 2], max_new_tokens=2, stop=stop)


def test_stream_not_callable(tiny_orthrus):
    with pytest.raises(OrthrusError, match="stream must be a callable"):
        tiny_orthrus.generate([1, 2], max_new_tokens=2, stream="stdout")


def test_stop_strings_without_tokenizer(no_tokenizer_model):
    with pytest.raises(OrthrusError, match="stop strings need a tokenizer, and .* has no tokenizer.json"):
        no_tokenizer_model.generate([1, 2], max_new_tokens=2, stop=["\n"])


def test_text_prompt_without_tokenizer(no_tokenizer_model):
    assert no_tokenizer_model.tokenizer is None
    with pytest.raises(OrthrusError, match="has no tokenizer.json, so a text prompt cannot be encoded; "
                                           "pass the prompt as a list of token ids"):
        no_tokenizer_model.generate("hello", max_new_tokens=2)
    # Token ids work on the same model.
    assert no_tokenizer_model.generate([1, 2], max_new_tokens=2, mode="ar").text is None


def test_chat_without_tokenizer(no_tokenizer_model):
    with pytest.raises(OrthrusError, match="has no tokenizer.json, so chat messages cannot be encoded"):
        no_tokenizer_model.generate([{"role": "user", "content": "hi"}], max_new_tokens=2)
