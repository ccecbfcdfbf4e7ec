"""Our AR view against Hugging Face transformers' Qwen3ForCausalLM on the same weights, in fp32."""

import pytest
import torch

import orthrus
from checkpoints import write_checkpoint
from orthrus.cache import KVCache
from orthrus.model import AR_VIEW

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4


def hf_logits(directory, tokens):
    model = transformers.Qwen3ForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def our_logits(model, tokens, chunk):
    """Logits of every position, feeding `tokens` in blocks of `chunk` rows through the AR view."""
    network = model.network
    network.reserve_positions(len(tokens) + 1)
    cache = KVCache(model.config, len(tokens) + 1, 1, network.device, network.dtype)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(tokens), chunk):
            block = torch.tensor(tokens[start:start + chunk])
            rows.append(network.logits(network.forward(block, cache, AR_VIEW)))
            cache.rollback(start + block.shape[0])
    return torch.cat(rows)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("shards", [1, 3], ids=["single-file", "sharded"])
def test_ar_logits_match_transformers(tmp_path, tied, shards):
    directory = write_checkpoint(tmp_path, orthrus=False, tied=tied, shards=shards, seed=7,
                                 max_position_embeddings=512)
    tokens = torch.randint(0, 384, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = hf_logits(directory, tokens)
    model = orthrus.load(directory, device="cpu")
    # 100 rows take the prefill path (PyTorch kernels), 16-row blocks and single steps the
    # row-invariant extension kernels, with keys coming from the cache.
    for chunk in (100, 16, 1):
        difference = (our_logits(model, tokens, chunk) - expected).abs().max().item()
        assert difference <= TOLERANCE, f"blocks of {chunk}: max |diff| {difference}"
