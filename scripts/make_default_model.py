"""Make the embedded default model (orthrus/default_model/) reproducibly, in steps whose outputs are saved.

  base       byte-level BPE + a small Qwen3 trained from scratch on CPython's standard library
             (the .py files under sysconfig's stdlib, site-packages excluded; ~5% of the files, chosen by a
             hash of their relative path, are held out) -> WORK/base (HF Qwen3 checkpoint), WORK/prompts.json
  diffusion  `orthrus.train.train` on WORK/base for each --block-sizes value, trained on the base's own greedy
             continuations of prompts cut from the training files (the text it drafts at inference)
             -> WORK/orthrus-B and the trained *_diff tensors alone, WORK/diffusion-B.safetensors
  assemble   WORK/base + WORK/diffusion-B.safetensors -> orthrus/default_model/ (bf16, shards < 15 MB)
             and benchmarks/default_model_prompts.json

Evaluation is scripts/evaluate_default_model.py. Every step is seeded; `base` and `diffusion` take
--max-minutes, which fixes their step count after timing the first steps (the count is printed and saved:
pass it back with --steps to repeat a run exactly).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orthrus.config import ModelConfig  # noqa: E402
from orthrus.train import (Autocast, CompiledStep, StepBudget, TrainableQwen3, learning_rate,  # noqa: E402
                           save_safetensors, train, write_orthrus_checkpoint, read_base)

DEFAULT_WORK = ROOT / ".default_model_work"
PACKAGE_MODEL = ROOT / "orthrus" / "default_model"
PROMPTS_FILE = ROOT / "benchmarks" / "default_model_prompts.json"
HELD_OUT_PERCENT = 5
EOS, MASK = "<|endoftext|>", "<|mask|>"
PROMPT_LINES = 12
PROMPTS_PER_FILE = 2
MAX_SHARD_MB = 14.0


def log(message: str) -> None:
    print(f"[make_default_model {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Corpus.

def stdlib_files(stdlib: Path) -> list[Path]:
    files = []
    for directory, subdirectories, names in os.walk(stdlib):
        subdirectories[:] = sorted(d for d in subdirectories
                                   if d not in ("site-packages", "dist-packages", "__pycache__"))
        files.extend(Path(directory) / name for name in sorted(names) if name.endswith(".py"))
    return files


def is_held_out(relative: str) -> bool:
    """A fixed ~5% of the files by name, so the split is the same for every Python version's stdlib."""
    return int(hashlib.sha256(relative.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def split_corpus(stdlib: Path) -> tuple[list[Path], list[Path]]:
    train_files, held_out = [], []
    for file in stdlib_files(stdlib):
        (held_out if is_held_out(file.relative_to(stdlib).as_posix()) else train_files).append(file)
    return train_files, held_out


def read_text(file: Path) -> str | None:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # a few test files are deliberately in other encodings
        return None


def function_prompts(stdlib: Path, files: list[Path], count: int) -> list[dict]:
    """The first PROMPT_LINES lines of functions (from the def line) at least 2 * PROMPT_LINES lines long,
    at most PROMPTS_PER_FILE per file, files in sorted order."""
    prompts = []
    for file in files:
        text = read_text(file)
        if text is None:
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines(keepends=True)
        taken = 0
        for node in ast.walk(tree):
            if taken == PROMPTS_PER_FILE or len(prompts) == count:
                break
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.decorator_list and (
                    node.end_lineno - node.lineno + 1 >= 2 * PROMPT_LINES):
                start = node.lineno - 1
                prompts.append({"file": file.relative_to(stdlib).as_posix(), "line": node.lineno,
                                "prompt": "".join(lines[start:start + PROMPT_LINES])})
                taken += 1
        if len(prompts) == count:
            break
    return prompts


# ---------------------------------------------------------------------------------------------------------
# Step 1: tokenizer and base model.

def train_tokenizer(texts: list[str], vocab_size: int, directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, MASK], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": EOS, "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast"},
        indent=2) + "\n")
    return tokenizer


def encode_stream(tokenizer, texts: list[str], eos: int) -> torch.Tensor:
    ids = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def base_config(args, vocab_size: int, eos: int) -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab_size,
            "hidden_size": args.hidden, "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": args.seq_len,
            "tie_word_embeddings": True, "eos_token_id": eos, "bos_token_id": eos, "attention_bias": False,
            "hidden_act": "silu", "torch_dtype": "bfloat16"}


def initial_weights(config: ModelConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Normal(0, 0.02) matrices, residual outputs scaled down by sqrt(2 * layers), unit norms."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q_size, kv_size = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    residual_std = 0.02 / math.sqrt(2 * config.num_hidden_layers)

    def normal(rows, cols, std=0.02):
        return torch.randn(rows, cols, generator=generator) * std

    weights = {"model.embed_tokens.weight": normal(config.vocab_size, hidden), "model.norm.weight": torch.ones(hidden)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden),
            p + "self_attn.q_proj.weight": normal(q_size, hidden), p + "self_attn.k_proj.weight": normal(kv_size, hidden),
            p + "self_attn.v_proj.weight": normal(kv_size, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, q_size, residual_std),
            p + "self_attn.q_norm.weight": torch.ones(head_dim), p + "self_attn.k_norm.weight": torch.ones(head_dim),
            p + "mlp.gate_proj.weight": normal(config.intermediate_size, hidden),
            p + "mlp.up_proj.weight": normal(config.intermediate_size, hidden),
            p + "mlp.down_proj.weight": normal(hidden, config.intermediate_size, residual_std)})
    return weights


def language_model_loss(model: TrainableQwen3, sequences: torch.Tensor) -> torch.Tensor:
    hidden, _ = model.ar_forward(sequences[:, :-1])
    logits = F.linear(hidden, model.output_weight).float()
    return F.cross_entropy(logits.flatten(0, 1), sequences[:, 1:].flatten())


def step_base(args) -> None:
    started = time.time()
    torch.manual_seed(args.seed)
    work = Path(args.work)
    base_dir = work / "base"
    stdlib = Path(args.stdlib)
    train_files, held_out_files = split_corpus(stdlib)
    train_texts = [t for t in map(read_text, train_files) if t]
    held_out_texts = [t for t in map(read_text, held_out_files) if t]
    log(f"stdlib {stdlib} (Python {sys.version.split()[0]}): {len(train_texts)} training files "
        f"({sum(map(len, train_texts)) / 1e6:.1f} MB), {len(held_out_texts)} held out")

    tokenizer = train_tokenizer(train_texts, args.vocab_size, base_dir)
    eos, mask = tokenizer.token_to_id(EOS), tokenizer.token_to_id(MASK)
    vocab_size = tokenizer.get_vocab_size()
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_texts), generator=generator).tolist()
    stream = encode_stream(tokenizer, [train_texts[i] for i in order], eos)
    held_out_stream = encode_stream(tokenizer, held_out_texts, eos)
    log(f"tokenizer: {vocab_size} ids (EOS {eos}, mask {mask}); {stream.numel() / 1e6:.2f}M training tokens "
        f"({sum(map(len, train_texts)) / stream.numel():.2f} bytes/token), {held_out_stream.numel() / 1e6:.2f}M "
        f"held out; {time.time() - started:.0f} s")

    raw = base_config(args, vocab_size, eos)
    config = ModelConfig.from_dict(raw)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = TrainableQwen3(config, {k: v.to(device) for k, v in initial_weights(config, generator).items()},
                           with_diffusion=False)
    model.reserve_positions(args.seq_len)
    autocast = Autocast(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    length = args.seq_len + 1  # inputs and shifted targets
    sequences = stream[:stream.numel() // length * length].view(-1, length)
    validation = held_out_stream[:held_out_stream.numel() // length * length].view(-1, length)[:2 * args.batch_size]
    steps = args.steps or math.ceil(args.epochs * sequences.shape[0] / args.batch_size)
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (decay if parameter.dim() == 2 else no_decay).append(parameter)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    loss_step = CompiledStep(language_model_loss, device.type == "cuda", log)
    budget = StepBudget(steps, args.max_minutes, started, calibrate=args.steps is None)
    log(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {sequences.shape[0]} sequences "
        f"of {args.seq_len}; up to {steps} steps of {args.batch_size} on {device}")

    def validation_loss() -> float:
        with torch.no_grad(), autocast():
            losses = [float(language_model_loss(model, validation[i:i + args.batch_size].to(device)))
                      for i in range(0, validation.shape[0], args.batch_size)]
        return sum(losses) / len(losses)

    # Small data, many epochs: the weights kept are those with the lowest held-out loss seen.
    step, history, best = 0, [], (float("inf"), 0, None)
    while not budget.done(step):
        step_started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, budget.total, args.warmup_steps, args.lr, 0.1)
        epoch, offset = divmod(step * args.batch_size, sequences.shape[0])
        permutation = torch.randperm(sequences.shape[0], generator=torch.Generator().manual_seed(args.seed + epoch))
        rows = permutation[torch.arange(offset, offset + args.batch_size) % sequences.shape[0]]
        with autocast():
            loss = loss_step(model, sequences[rows].to(device, non_blocking=True))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(loss.detach())
        step += 1
        budget.record(step - 1, time.perf_counter() - step_started, warm=step > 3)
        if step % args.log_every == 0 or budget.done(step):
            speed = args.batch_size * args.seq_len * budget.timed_steps / max(budget.timed_seconds, 1e-9)
            validation_value = validation_loss()
            history.append({"step": step, "loss": loss, "validation_loss": validation_value, "tokens_per_second": speed})
            if validation_value < best[0]:
                best = (validation_value, step, {name: tensor.to("cpu", torch.bfloat16, copy=True)
                                                 for name, tensor in model.hf_tensors().items()})
            log(f"step {step}/{budget.total} loss {loss:.3f} held-out {validation_value:.3f} "
                f"{speed:,.0f} tok/s, epoch {step * args.batch_size / sequences.shape[0]:.2f}")

    save_safetensors(base_dir, best[2], int(MAX_SHARD_MB * 1e6))
    log(f"kept the weights of step {best[1]} (held-out loss {best[0]:.3f})")
    (base_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    prompts = function_prompts(stdlib, held_out_files, args.prompts)
    (work / "prompts.json").write_text(json.dumps(
        {"python": sys.version.split()[0], "lines": PROMPT_LINES, "prompts": prompts}, indent=1) + "\n")
    summary = {"python": sys.version.split()[0], "device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "cpu", "training_files": len(train_texts), "held_out_files": len(held_out_texts),
               "training_tokens": stream.numel(), "vocab_size": vocab_size, "steps": step, "planned_steps": budget.total,
               "stopped_by_time": budget.stopped_by_time, "kept_step": best[1], "kept_validation_loss": best[0],
               "batch_size": args.batch_size, "seq_len": args.seq_len,
               "lr": args.lr, "warmup_steps": args.warmup_steps, "seed": args.seed, "history": history,
               "seconds": time.time() - started}
    (work / "base_training.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(f"wrote {base_dir} ({len(prompts)} held-out prompts) after {time.time() - started:.0f} s")


# ---------------------------------------------------------------------------------------------------------
# Step 2: the diffusion view, one per block size.

def step_diffusion(args) -> None:
    work = Path(args.work)
    stdlib = Path(args.stdlib)
    train_files = [f for f in split_corpus(stdlib)[0] if read_text(f)]
    prompts = json.loads((work / "prompts.json").read_text())["prompts"]
    eval_prompts = [p["prompt"] for p in prompts[:args.eval_prompts]]
    results = {}
    for block_size in args.block_sizes:
        out = work / f"orthrus-{block_size}"
        if out.exists():
            shutil.rmtree(out)
        files = [str(f) for f in train_files]
        result = train(work / "base", out, data=files if args.train_on_text else None,
                       self_distill_prompts=None if args.train_on_text else files,
                       self_distill_prompt_tokens=args.self_distill_prompt_tokens, row_decay=args.row_decay,
                       block_size=block_size,
                       seq_len=args.seq_len, blocks_per_sequence=args.blocks_per_sequence,
                       batch_size=args.batch_size, steps=args.steps, epochs=args.epochs,
                       max_minutes=args.max_minutes, lr=args.lr, warmup_steps=args.warmup_steps,
                       eval_every=args.eval_every, eval_prompts=eval_prompts, seed=args.seed,
                       self_distill=args.self_distill, self_distill_temperature=args.self_distill_temperature,
                       device=args.device, max_shard_mb=MAX_SHARD_MB, progress=not args.no_progress)
        from safetensors.torch import load_file, save_file
        tensors = {}
        for shard in sorted(out.glob("model*.safetensors")):
            tensors.update({k: v for k, v in load_file(str(shard)).items() if "_diff." in k})
        save_file(tensors, str(work / f"diffusion-{block_size}.safetensors"), metadata={"format": "pt"})
        results[block_size] = {"steps": result.steps, "planned_steps": result.total_steps, "loss": result.loss,
                               "tokens_per_second": result.tokens_per_second, "tau": result.tau,
                               "stopped_by_time": result.stopped_by_time, "history": result.history}
        log(f"block size {block_size}: {result.steps} steps, loss {result.loss:.4f}, "
            f"{result.tokens_per_second:,.0f} tok/s, held-out τ {result.tau}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "seq_len": args.seq_len, "blocks_per_sequence": args.blocks_per_sequence,
               "batch_size": args.batch_size, "epochs": args.epochs, "lr": args.lr,
               "warmup_steps": args.warmup_steps, "seed": args.seed, "self_distill": args.self_distill, "train_on_text": args.train_on_text,
               "self_distill_temperature": args.self_distill_temperature,
               "self_distill_prompt_tokens": args.self_distill_prompt_tokens, "row_decay": args.row_decay,
               "results": results}
    (work / "diffusion_training.json").write_text(json.dumps(summary, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Step 3: the package's checkpoint.

def step_assemble(args) -> None:
    from safetensors.torch import load_file

    work = Path(args.work)
    base_dir, raw, _, base_weights, _ = read_base(work / "base")
    diffusion = load_file(str(work / f"diffusion-{args.block_size}.safetensors"))
    mask_token_id = json.loads((work / "base" / "tokenizer.json").read_text())
    mask_token_id = next(t["id"] for t in mask_token_id["added_tokens"] if t["content"] == MASK)
    out = Path(args.out)
    for stale in out.glob("*"):
        if stale.name != "__init__.py" and stale.is_file():
            stale.unlink()
    write_orthrus_checkpoint(out, base_dir, raw, base_weights, diffusion, args.block_size, mask_token_id,
                             int(MAX_SHARD_MB * 1e6))
    prompts_out = Path(args.prompts_out)
    prompts_out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / "prompts.json", prompts_out)
    sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    log(f"wrote {out}: {sum(sizes.values()) / 1e6:.1f} MB ({', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in sorted(sizes.items()))})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("base", "diffusion", "assemble"))
    parser.add_argument("--work", default=str(DEFAULT_WORK), help="where the steps keep their outputs")
    parser.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=None, help="time budget of this step (per block size)")
    parser.add_argument("--steps", type=int, default=None, help="fixed step count (overrides the time calibration)")
    parser.add_argument("--no-progress", action="store_true")
    # base
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048 (base), 384 (diffusion)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (base), 64 (diffusion)")
    parser.add_argument("--epochs", type=float, default=None, help="default 40 (base), 20 (diffusion)")
    parser.add_argument("--lr", type=float, default=None, help="default 3e-3 (base), 1e-3 (diffusion)")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=64, help="held-out evaluation prompts to extract")
    # diffusion
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16])
    parser.add_argument("--blocks-per-sequence", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-prompts", type=int, default=8)
    parser.add_argument("--self-distill", type=int, default=49152, metavar="N",
                        help="sequences the base continues from training-file prompts (see orthrus train)")
    parser.add_argument("--self-distill-temperature", type=float, default=0.0)
    parser.add_argument("--self-distill-prompt-tokens", type=int, default=128)
    parser.add_argument("--train-on-text", action="store_true",
                        help="train on the training files' text too, not only on the base's continuations")
    parser.add_argument("--row-decay", type=float, default=0.8, help="see orthrus train --row-decay")
    # assemble
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--out", default=str(PACKAGE_MODEL))
    parser.add_argument("--prompts-out", default=str(PROMPTS_FILE))
    args = parser.parse_args(argv)
    is_base = args.step == "base"
    args.seq_len = args.seq_len or (2048 if is_base else 384)
    args.batch_size = args.batch_size or (32 if is_base else 64)
    args.epochs = args.epochs or (40.0 if is_base else 20.0)
    args.lr = args.lr or (3e-3 if is_base else 1e-3)
    {"base": step_base, "diffusion": step_diffusion, "assemble": step_assemble}[args.step](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
