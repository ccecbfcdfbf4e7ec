"""`orthrus train` on tiny checkpoints, on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from checkpoints import TINY_CONFIG, write_checkpoint, write_tokenizer

import orthrus
from orthrus import cli
from orthrus import train as trainer
from orthrus.config import ModelConfig

PHRASE = "hello world, the quick brown fox jumps over the lazy dog "
BLOCK = 8
SMALL = dict(seq_len=64, block_size=BLOCK, blocks_per_sequence=8, batch_size=4, eval_every=0, progress=False)


def engine():
    return pytest.importorskip("orthrus_ext", reason="the C++ extension is not built")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Qwen3 (tied embeddings) trained to continue PHRASE repeated, so its greedy output is the
    phrase's token cycle: a diffusion view can learn to draft it, an untrained one cannot."""
    directory = write_checkpoint(tmp_path_factory.mktemp("base"), orthrus=False, tied=True, seed=1)
    write_tokenizer(directory)
    _, raw, config, weights, tokenizer = trainer.read_base(directory)
    stream = trainer.token_stream([PHRASE * 40], tokenizer, None, seed=0)
    model = trainer.TrainableQwen3(config, weights, with_diffusion=False)
    model.reserve_positions(64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, stream.numel() - 33, (8,), generator=generator)
        batch = torch.stack([stream[s:s + 33] for s in starts])
        hidden, _ = model.ar_forward(batch[:, :-1])
        loss = F.cross_entropy(F.linear(hidden, model.output_weight).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.5, "the tiny base did not learn its phrase"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.hf_tensors().items()}, str(directory / "model.safetensors"))
    (directory / "data.txt").write_text(PHRASE * 60)
    return directory


def test_loss_falls_and_checkpoint_round_trips(base, tmp_path):
    out = tmp_path / "orthrus"
    result = trainer.train(base, out, data=[str(base / "data.txt")], steps=12, lr=3e-3, max_shard_mb=0.15,
                           **SMALL)
    losses = [loss for _, loss, _, _ in result.history if loss is not None]
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0]

    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["block_size"], config["mask_token_id"]) == ("orthrus", BLOCK, 382)
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1  # sharded at --max-shard-mb
    base_names = set(safe_open(str(base / "model.safetensors"), "pt").keys())
    diff_names = {f"model.layers.{i}.self_attn.{name}.weight" for i in range(TINY_CONFIG["num_hidden_layers"])
                  for name in ("q_proj_diff", "k_proj_diff", "v_proj_diff", "o_proj_diff", "q_norm_diff",
                               "k_norm_diff")}
    assert set(index) == base_names | diff_names

    tensors = {}
    for shard in set(index.values()):
        with safe_open(str(out / shard), "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    with safe_open(str(base / "model.safetensors"), "pt") as handle:
        for name in base_names:  # the base is frozen: bit for bit what it was
            assert torch.equal(tensors[name], handle.get_tensor(name)), name
        q = handle.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert not torch.equal(tensors["model.layers.0.self_attn.q_proj_diff.weight"], q)  # trained away from init

    engine()
    model = orthrus.load(out, device="cpu")
    assert model.config.block_size == BLOCK and model.network.has_diffusion_view


def test_trained_view_drafts_better_and_stays_exact(base, tmp_path):
    engine()
    out = tmp_path / "orthrus"
    trainer.train(base, out, data=[str(base / "data.txt")], steps=120, lr=1e-2, **SMALL)
    trained = orthrus.load(out, device="cpu")
    _, raw, config, weights, tokenizer = trainer.read_base(base)
    untrained_config = ModelConfig.from_dict(dict(raw, model_type="orthrus", block_size=BLOCK, mask_token_id=382))
    untrained = trainer.in_memory_model(
        untrained_config, trainer.TrainableQwen3(untrained_config, weights, True).hf_tensors(), tokenizer,
        torch.device("cpu"), torch.float32)

    prompts = ["hello world, the quick", "brown fox jumps over the lazy dog hello"]
    taus = {}
    for name, model in (("trained", trained), ("untrained", untrained)):
        taus[name] = sum(model.generate(p, max_new_tokens=48, mode="orthrus").stats["tokens_per_iteration"]
                         for p in prompts) / len(prompts)
    assert taus["trained"] > taus["untrained"] + 1.0, taus

    for prompt in prompts + ["the lazy"]:  # the trained view changes speed, never the output
        ar = trained.generate(prompt, max_new_tokens=40, mode="ar").tokens
        assert trained.generate(prompt, max_new_tokens=40, mode="orthrus").tokens == ar
        sampled = trained.generate(prompt, max_new_tokens=40, mode="ar", temperature=0.8, seed=7).tokens
        assert trained.generate(prompt, max_new_tokens=40, mode="orthrus", temperature=0.8, seed=7).tokens == sampled


def test_resume_continues_the_run_exactly(base, tmp_path, monkeypatch):
    options = dict(SMALL, data=[str(base / "data.txt")], steps=8, lr=3e-3, save_every=4)
    straight = trainer.train(base, tmp_path / "straight", **options)

    schedule = trainer.learning_rate

    def interrupted(step, *args):
        if step == 6:
            raise KeyboardInterrupt
        return schedule(step, *args)

    monkeypatch.setattr(trainer, "learning_rate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(base, tmp_path / "resumed", **options)
    monkeypatch.setattr(trainer, "learning_rate", schedule)
    with pytest.raises(orthrus.OrthrusError, match="--resume"):
        trainer.train(base, tmp_path / "resumed", **options)
    resumed = trainer.train(base, tmp_path / "resumed", resume=True, **options)
    assert resumed.steps == straight.steps == 8
    for name in ("straight", "resumed"):
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as handle:
            globals()[f"_{name}"] = {k: handle.get_tensor(k) for k in handle.keys() if "_diff" in k}
    assert _straight.keys() == _resumed.keys()  # noqa: F821
    for key in _straight:  # noqa: F821
        assert torch.equal(_straight[key], _resumed[key]), key  # noqa: F821


def test_self_distillation_data(base, tmp_path):
    result = trainer.train(base, tmp_path / "out", self_distill=4, self_distill_temperature=0.0,
                           **dict(SMALL, steps=2, eval_every=1, eval_prompts=1))
    sampled = torch.load(tmp_path / "out" / trainer.SELF_DISTILL_FILE)
    assert sampled.shape == (5, SMALL["seq_len"])  # 4 to train on, 1 held out for τ
    assert result.steps == 2


def test_self_distillation_from_prompt_text(base, tmp_path, monkeypatch):
    """--self-distill-prompts without --data: each sampled sequence is a window of the prompt text continued
    greedily by the base; the batch size of sampling changes nothing."""
    options = dict(SMALL, steps=1, self_distill=6, self_distill_temperature=0.0,
                   self_distill_prompts=[str(base / "data.txt")], self_distill_prompt_tokens=12)
    trainer.train(base, tmp_path / "big", **options)
    monkeypatch.setattr(trainer, "GENERATION_CPU_BYTES", 1)  # one sequence at a time
    trainer.train(base, tmp_path / "small", **options)
    sampled = torch.load(tmp_path / "big" / trainer.SELF_DISTILL_FILE)
    assert torch.equal(sampled, torch.load(tmp_path / "small" / trainer.SELF_DISTILL_FILE))
    assert sampled.shape == (6, SMALL["seq_len"])

    _, _, _, _, tokenizer = trainer.read_base(base)
    stream = trainer.token_stream([(base / "data.txt").read_text()], tokenizer, 383, seed=0).tolist()
    windows = {tuple(stream[i:i + 12]) for i in range(len(stream) - 11)}
    assert all(tuple(row[:12]) in windows for row in sampled.tolist())
    assert len({tuple(row[:12]) for row in sampled.tolist()}) > 1  # from different places of the text
    engine()
    model = orthrus.load(base, device="cpu")
    for row in sampled.tolist():
        assert model.generate(row[:12], max_new_tokens=52, mode="ar").tokens == row[12:]


def test_row_decay_weighs_block_rows(base, tmp_path):
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 16, generator=generator), torch.randn(6, 16, generator=generator)
    weight = torch.randn(40, 16, generator=generator)
    per_row = torch.stack([trainer.distillation_loss(student[i:i + 1], teacher[i:i + 1], weight, torch.ones(1))
                           for i in range(6)])
    assert torch.allclose(trainer.distillation_loss(student, teacher, weight, torch.ones(6)), per_row.mean())
    decayed = 0.5 ** torch.arange(6.0)
    assert torch.allclose(trainer.distillation_loss(student, teacher, weight, decayed),
                          (decayed * per_row).sum() / decayed.sum())

    # Training with a decay that all but ignores far rows fits the near rows better than uniform weights.
    options = dict(SMALL, data=[str(base / "data.txt")], steps=30, lr=3e-3)
    near = {}
    for decay in (1.0, 0.05):
        out = tmp_path / f"decay-{decay}"
        trainer.train(base, out, row_decay=decay, **options)
        near[decay] = row_kl(base, out)[0]
    assert near[0.05] < near[1.0], near


def row_kl(base, out) -> torch.Tensor:
    """Mean KL of each block row, uniform weights, on fixed anchors of the training text."""
    _, raw, config, weights, tokenizer = trainer.read_base(base)
    orthrus_config = ModelConfig.from_dict(dict(raw, model_type="orthrus", block_size=BLOCK, mask_token_id=382))
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        weights = dict(weights, **{k: handle.get_tensor(k) for k in handle.keys() if "_diff" in k})
    model = trainer.TrainableQwen3(orthrus_config, weights, with_diffusion=True)
    model.reserve_positions(80)
    sequences = trainer.token_stream([PHRASE * 20], tokenizer, None, seed=0)[:2 * 64].view(2, 64)
    anchors = trainer.sample_anchors(2, 64, BLOCK, 8, torch.Generator().manual_seed(5))
    mask = trainer.block_mask(anchors, 64, BLOCK)
    kl = []
    with torch.no_grad():
        for row in range(BLOCK):
            only = torch.zeros(BLOCK)
            only[row] = 1.0
            kl.append(trainer.diffusion_step_loss(model, sequences, anchors, mask, BLOCK, 382, only))
    return torch.stack(kl)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = cli.main(["train", *args])
    return code, capsys.readouterr().err.strip()


def test_bad_arguments_give_one_line_errors(base, tmp_path, capsys):
    data = str(base / "data.txt")
    cases = [
        (["--out", str(tmp_path / "o")], "required: --base"),
        (["--base", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--data", data],
         "no such checkpoint directory"),
        (["--base", str(base), "--out", str(tmp_path / "o"), "--data", str(tmp_path / "nothing.txt")],
         "--data"),
        (["--base", str(base), "--out", str(tmp_path / "o")], "no training data"),
        (["--base", str(base), "--out", str(tmp_path / "o"), "--data", data, "--mask-token-id", "999"],
         "--mask-token-id 999"),
        (["--base", str(base), "--out", str(tmp_path / "o"), "--data", data, "--block-size", "100"],
         "seq_len"),
        (["--base", str(base), "--out", str(tmp_path / "o"), "--data", data, "--row-decay", "1.5"],
         "row_decay"),
        (["--base", str(base), "--out", str(tmp_path / "o"), "--data", data, "--self-distill-prompts", data],
         "--self-distill-prompts without --self-distill"),
        (["--base", str(base), "--out", str(tmp_path / "o"), "--self-distill", "2",
          "--self-distill-prompt-tokens", "64"], "self_distill_prompt_tokens"),
    ]
    orthrus_checkpoint = write_checkpoint(tmp_path / "already", orthrus=True)
    write_tokenizer(orthrus_checkpoint)
    cases.append((["--base", str(orthrus_checkpoint), "--out", str(tmp_path / "o"), "--data", data],
                  "expected a plain 'qwen3'"))
    full = write_checkpoint(tmp_path / "full", orthrus=False)
    write_tokenizer(full)
    tokenizer = json.loads((full / "tokenizer.json").read_text())
    for token in tokenizer["added_tokens"]:
        if token["content"] == "<|mask|>":
            token["content"] = "<|reserved|>"
    (full / "tokenizer.json").write_text(json.dumps(tokenizer))
    cases.append((["--base", str(full), "--out", str(tmp_path / "o"), "--data", data], "no free id"))
    for args, expected in cases:
        code, err = run_cli(args + ["--seq-len", "64"], capsys)
        assert code != 0 and expected in err and len(err.splitlines()) == 1, (args, err)


def test_command_line_end_to_end(base, tmp_path):
    out = tmp_path / "cli"
    process = subprocess.run(
        [sys.executable, "-m", "orthrus", "train", "--base", str(base), "--out", str(out), "--data",
         str(base / "data.txt"), "--steps", "2", "--seq-len", "64", "--block-size", "4", "--batch-size", "2",
         "--blocks-per-sequence", "4", "--eval-every", "0", "--no-progress"],
        capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=120)
    assert process.returncode == 0, process.stderr
    summary = json.loads(process.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and json.loads((out / "config.json").read_text())["block_size"] == 4
