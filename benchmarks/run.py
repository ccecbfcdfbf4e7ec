#!/usr/bin/env python
"""Decode benchmark: our AR and Orthrus decoding against HF transformers and the memory-bandwidth floor.

    python benchmarks/run.py --device cuda --out DIR          # Qwen3-1.7B / 4B / 8B shapes, one GPU
    python benchmarks/run.py --device cpu --quick --out DIR   # tiny model: exercises every path in seconds

For each model (random weights at the exact Qwen3 shape plus the diffusion view, built directly on the
device; one model at a time): our AR decode speed, the Orthrus iteration split into diffusion pass / verify
pass / rest for each block size, tok/s at full acceptance and at given tau (predicted and really run),
HF transformers `generate` on the same tensors (dynamic and static cache), the same at longer contexts,
peak memory and the diffusion view's extra memory. Writes DIR/results.json, DIR/results.md and PNG plots,
then prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from harness import hf, ours, report  # noqa: E402
from harness.models import (SHAPES, build_network, diffusion_view_bytes, kv_bytes_per_token,  # noqa: E402
                            model_config, streamed_weight_bytes, tensor_bytes, unique_weight_bytes,
                            with_block_size)
from harness.timing import Budget, Clock, copy_bandwidth  # noqa: E402
from orthrus import ops  # noqa: E402
from orthrus.cache import KVCache  # noqa: E402
from orthrus.runner import IterationRunner  # noqa: E402

PARTS = ("ours", "hf")
PAPER_TAUS = (6.9, 9.6, 11.7)  # Qwen3-8B, MBPP / GSM8K / MATH-500 (paper)


@dataclass
class Settings:
    models: list[str]
    block_sizes: list[int]
    contexts: list[int]
    taus: list[float]
    prompt_tokens: int
    repeats: ours.Repeats
    hf_new_tokens: int
    hf_warmup: int
    hf_repeats: int
    copy_bytes: int
    copy_repeats: int
    budget_s: float
    # Seconds a static-cache HF run (torch.compile included) is assumed to need when none has run yet.
    hf_static_reserve_s: float
    context_reserve_s: float


FULL = dict(models=["1.7B", "4B", "8B"], contexts=[1024, 4096, 16384, 32768], prompt_tokens=64,
            repeats=ours.Repeats(ar_warmup=8, ar_steps=64, iteration_warmup=3, iterations=24, cycle=4),
            hf_new_tokens=64, hf_warmup=1, hf_repeats=3, copy_bytes=1 << 30, copy_repeats=20, budget_s=480.0,
            hf_static_reserve_s=75.0, context_reserve_s=40.0)
QUICK = dict(models=["tiny"], contexts=[64, 128], prompt_tokens=16,
             repeats=ours.Repeats(ar_warmup=2, ar_steps=8, iteration_warmup=1, iterations=4, cycle=2),
             hf_new_tokens=8, hf_warmup=1, hf_repeats=1, copy_bytes=16 << 20, copy_repeats=5, budget_s=300.0,
             hf_static_reserve_s=0.0, context_reserve_s=0.0)


def parse_args(argv=None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", required=True, type=Path, help="directory for results.json, results.md, plots")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, few repeats: a smoke run of every code path, not a timing")
    parser.add_argument("--models", help=f"comma-separated subset of {', '.join(SHAPES)} "
                                         "(default 1.7B,4B,8B; tiny with --quick)")
    parser.add_argument("--block-sizes", default="16,32", help="Orthrus block sizes B (default 16,32)")
    parser.add_argument("--contexts", help="context lengths for the scaling runs, comma-separated; 'none' for "
                                           "none (default 1024,4096,16384,32768; 64,128 with --quick)")
    parser.add_argument("--taus", default=",".join(map(str, PAPER_TAUS)),
                        help="tokens per iteration to report besides tau = B (default: the paper's 8B values)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="what to run: ours (our engine), hf (transformers baseline); the bandwidth floor "
                             "and memory figures always come with it (default ours,hf)")
    parser.add_argument("--budget-s", type=float,
                        help="wall-clock budget; optional work (HF static cache, long contexts) is skipped, "
                             "and says so, when it would not fit (default 480 s, 300 s with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    preset = dict(QUICK if args.quick else FULL)

    def integers(text: str, option: str, minimum: int) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            parser.error(f"{option}: expected comma-separated integers, got {text!r}")
        bad = [v for v in values if v < minimum]
        if bad:
            parser.error(f"{option}: values must be >= {minimum}, got {bad[0]}")
        return values

    models = args.models.split(",") if args.models else preset["models"]
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        parser.error(f"--models: unknown model {unknown[0]!r} (choose from {', '.join(SHAPES)})")
    block_sizes = sorted(set(integers(args.block_sizes, "--block-sizes", 2)))
    if not block_sizes or block_sizes[-1] > ops.MAX_BLOCK_ROWS:
        parser.error(f"--block-sizes: give at least one block size, each at most {ops.MAX_BLOCK_ROWS}")
    if args.contexts is None:
        contexts = preset["contexts"]
    elif args.contexts.strip().lower() == "none":
        contexts = []
    else:
        contexts = integers(args.contexts, "--contexts", 1)
    try:
        taus = [float(t) for t in args.taus.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--taus: expected comma-separated numbers, got {args.taus!r}")
    if any(not t >= 1.0 for t in taus):
        parser.error("--taus: every tau must be >= 1 (an iteration emits at least one token)")
    parts = [p for p in args.parts.split(",") if p.strip()]
    if not parts or any(p not in PARTS for p in parts):
        parser.error(f"--parts: choose from {', '.join(PARTS)}, got {args.parts!r}")
    args.parts = parts
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device: cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")

    settings = Settings(models=models, block_sizes=block_sizes, contexts=contexts, taus=taus,
                        prompt_tokens=preset["prompt_tokens"], repeats=preset["repeats"],
                        hf_new_tokens=preset["hf_new_tokens"], hf_warmup=preset["hf_warmup"],
                        hf_repeats=preset["hf_repeats"], copy_bytes=preset["copy_bytes"],
                        copy_repeats=preset["copy_repeats"],
                        budget_s=args.budget_s if args.budget_s is not None else preset["budget_s"],
                        hf_static_reserve_s=preset["hf_static_reserve_s"],
                        context_reserve_s=preset["context_reserve_s"])
    needed = max([settings.prompt_tokens] + contexts) + ar_step_count(settings) + max(block_sizes) + 1
    for name in models:
        limit = model_config(name).max_position_embeddings
        if needed > limit:
            parser.error(f"--contexts: {name} has max_position_embeddings {limit}, but the longest context plus "
                         f"the decoded tokens needs {needed} positions")
    return args, settings


def ar_step_count(settings: Settings) -> int:
    """AR steps per run: enough to time, and enough continuation for `cycle` fully accepted iterations."""
    repeats = settings.repeats
    return repeats.ar_warmup + max(repeats.ar_steps, repeats.cycle * max(settings.block_sizes))


def log(budget: Budget, message: str) -> None:
    print(f"[{budget.elapsed():6.1f} s] {message}", file=sys.stderr, flush=True)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def floor_bytes(byte_counts: dict, context: int) -> tuple[int, int]:
    """Bytes an AR step and an Orthrus iteration (two passes) must stream at `context`: the weights each
    pass reads plus the K/V cache rows its attention reads."""
    kv = byte_counts["kv_per_token"] * context
    ar_step = byte_counts["ar_pass_weights"] + kv
    return ar_step, ar_step + byte_counts["diffusion_pass_weights"] + kv


def with_floor(timing: dict, floor_bytes: int, bandwidth: float, measured_key: str) -> dict:
    floor_ms = 1e3 * floor_bytes / bandwidth
    return dict(timing, floor_bytes=floor_bytes, floor_ms=floor_ms,
                fraction_of_floor=floor_ms / timing[measured_key])


def measure_ours(network, settings: Settings, prompt: torch.Tensor, byte_counts: dict, bandwidth: float,
                 budget: Budget, name: str) -> tuple[dict, list[int]]:
    """Our AR and Orthrus timings at the prompt context and every scaling context; also returns the AR
    continuation of the prompt (for the HF agreement check)."""
    config, device, dtype = network.config, network.device, network.dtype
    clock = Clock(device)
    repeats = settings.repeats
    ar_steps = ar_step_count(settings) - repeats.ar_warmup
    max_block = max(settings.block_sizes)
    capacity = max([settings.prompt_tokens] + settings.contexts) + repeats.ar_warmup + ar_steps + max_block + 1
    # Positions are reserved before any graph is captured: the graphs hold the RoPE table's address.
    network.reserve_positions(capacity)
    variants = {block: with_block_size(network, block) for block in settings.block_sizes}
    for variant in variants.values():
        variant.reserve_positions(capacity)
    cache = KVCache(config, capacity, max_block, device, dtype)
    generator = torch.Generator(device=device)
    generator.manual_seed(1)
    result = {}

    with torch.inference_mode():
        anchor = ours.prefill_prompt(network, cache, prompt)
        log(budget, f"{name}: capturing runners (AR, B = {settings.block_sizes})")
        ar_runner = IterationRunner(network, cache, ours.GREEDY, drafts=0, diffusion=False)
        runners = {block: IterationRunner(variants[block], cache, ours.GREEDY, drafts=block - 1, diffusion=True)
                   for block in settings.block_sizes}

        def measure_context(context: int, anchor: torch.Tensor, with_taus: bool):
            ar, continuation = ours.time_ar(ar_runner, clock, context, anchor, repeats, ar_steps)
            ar_step_bytes, iteration_bytes = floor_bytes(byte_counts, context)
            ar = with_floor(ar, ar_step_bytes, bandwidth, "ms_per_token")
            orthrus = {}
            for block, runner in runners.items():
                full = ours.time_orthrus(runner, clock, context, continuation, float(block), repeats)
                full = with_floor(full, iteration_bytes, bandwidth, "iteration_ms")
                if not with_taus:
                    orthrus[str(block)] = full
                    continue
                taus = {}
                for tau in settings.taus:
                    if tau > block:
                        continue  # more tokens per iteration than a block holds
                    forced = ours.time_orthrus(runner, clock, context, continuation, tau, repeats)
                    # Same basis as the measured rate (all timed iterations), so the two compare directly.
                    forced["predicted_tokens_per_second"] = 1e3 * tau / full["mean_iteration_ms"]
                    taus[report._tau_label(tau)] = forced
                orthrus[str(block)] = {"full_acceptance": full, "tau": taus}
            return ar, orthrus, continuation

        log(budget, f"{name}: prompt context {settings.prompt_tokens}")
        result["ar"], result["orthrus"], continuation = measure_context(settings.prompt_tokens, anchor, True)
        result["contexts"] = {}
        for context in settings.contexts:
            if not budget.allows(settings.context_reserve_s, f"{name} context {context}"):
                continue
            log(budget, f"{name}: context {context}")
            ours.fill_context(cache, context, generator)
            start_token = torch.randint(0, config.vocab_size, (1,), device=device, generator=generator)
            ar, orthrus, _ = measure_context(context, start_token, False)
            result["contexts"][str(context)] = {"ar": ar, "orthrus": orthrus}
        mismatched = [f"prompt context, B={b}" for b, r in result["orthrus"].items()
                      if not r["full_acceptance"]["matches_ar"] or not all(t["matches_ar"] for t in r["tau"].values())]
        mismatched += [f"context {c}, B={b}" for c, s in result["contexts"].items()
                       for b, r in s["orthrus"].items() if not r["matches_ar"]]
        result["exact"] = not mismatched
        result["mismatches"] = mismatched
    result["kv_cache_bytes"] = tensor_bytes(cache.k) + tensor_bytes(cache.v)
    result["kv_cache_positions"] = capacity
    return result, continuation


def measure_hf(network, settings: Settings, prompt: torch.Tensor, budget: Budget, name: str,
               our_continuation: list[int] | None, static_history: list[tuple[int, float]]) -> dict:
    version = hf.transformers_version()
    if version is None:
        return {"skipped": "transformers is not installed"}
    device = network.device
    log(budget, f"{name}: HF transformers {version}")
    model = hf.build_hf_model(network)
    result = {"transformers": version}
    if budget.allows(settings.context_reserve_s, f"{name} HF dynamic cache"):
        result["dynamic"] = hf.time_generate(model, prompt, settings.hf_new_tokens, "dynamic", settings.hf_warmup,
                                             settings.hf_repeats)
    else:
        result["dynamic"] = {"skipped": budget.skipped[-1]}
    # A static run is mostly torch.compile, whose cost follows the number of layers it traces (50 s for
    # the 28 layers of 1.7B on an H100, 2026-11-22): estimated from the last model's run.
    layers = network.config.num_hidden_layers
    needed = settings.hf_static_reserve_s
    if static_history:
        last_layers, last_seconds = static_history[-1]
        needed = max(needed, 1.3 * last_seconds * layers / last_layers)
    if budget.allows(needed, f"{name} HF static cache"):
        log(budget, f"{name}: HF static cache (compiles on CUDA)")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        try:
            result["static"] = hf.time_generate(model, prompt, settings.hf_new_tokens, "static",
                                                settings.hf_warmup + 1, settings.hf_repeats)
        except Exception as error:  # a baseline that fails to compile is reported, not fatal
            result["static"] = {"error": f"{type(error).__name__}: {error}"}
        result["static_seconds_with_compile"] = time.perf_counter() - start
        static_history.append((layers, result["static_seconds_with_compile"]))
    else:
        result["static"] = {"skipped": budget.skipped[-1]}
    if our_continuation is not None:
        for run in (result.get("dynamic", {}), result.get("static", {})):
            if "tokens" in run:
                ours_tokens = our_continuation[:len(run["tokens"])]
                same = next((i for i, (a, b) in enumerate(zip(run["tokens"], ours_tokens)) if a != b), len(ours_tokens))
                run["tokens_equal_to_ours"] = same
    del model
    hf.forget_compiled()
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def benchmark_model(name: str, settings: Settings, args, device, dtype, bandwidth: float, budget: Budget,
                    static_history: list) -> dict:
    config = model_config(name)
    free_device_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log(budget, f"{name}: building random weights on {device}")
    start = time.perf_counter()
    network = build_network(config, device, dtype, seed=args.seed)
    Clock(device).synchronize()
    entry = {
        "config": {k: v for k, v in config.to_dict().items() if k != "architectures"},
        "build_seconds": time.perf_counter() - start,
        "prompt_tokens": settings.prompt_tokens,
    }
    element = torch.empty((), dtype=dtype).element_size()
    block_scratch = 2 * max(settings.block_sizes) * config.num_key_value_heads * config.head_dim * element
    entry["bytes"] = {
        "unique_weights": unique_weight_bytes(network),
        "embedding": tensor_bytes(network.embed),
        "ar_pass_weights": streamed_weight_bytes(network, "ar"),
        "diffusion_pass_weights": streamed_weight_bytes(network, "diffusion"),
        "kv_per_token": kv_bytes_per_token(config, dtype),
    }
    entry["memory"] = {
        "diffusion_view_weight_bytes": diffusion_view_bytes(network),
        "diffusion_block_scratch_bytes": block_scratch,
        "diffusion_view_extra_bytes": diffusion_view_bytes(network) + block_scratch,
    }
    # The floor needs no engine: bytes each pass must stream at each context, over the copy bandwidth.
    entry["floor"] = {}
    for context in [settings.prompt_tokens] + settings.contexts:
        ar_step_bytes, iteration_bytes = floor_bytes(entry["bytes"], context)
        entry["floor"][str(context)] = {"ar_step_ms": 1e3 * ar_step_bytes / bandwidth,
                                        "orthrus_iteration_ms": 1e3 * iteration_bytes / bandwidth}
    prompt_generator = torch.Generator(device=device)
    prompt_generator.manual_seed(args.seed + 1)
    prompt = torch.randint(0, config.vocab_size, (settings.prompt_tokens,), device=device,
                           generator=prompt_generator)

    continuation = None
    if "ours" in args.parts:
        measured, continuation = measure_ours(network, settings, prompt, entry["bytes"], bandwidth, budget,
                                               name)
        entry.update(measured)
        free_device_memory(device)
    if device.type == "cuda":
        entry["memory"]["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        entry["memory"]["peak_scope"] = "weights, KV cache, CUDA graphs and activations of our engine"
    if "hf" in args.parts:
        entry["hf"] = measure_hf(network, settings, prompt, budget, name, continuation, static_history)
    del network
    free_device_memory(device)
    return entry


def main(argv=None) -> int:
    args, settings = parse_args(argv)
    budget = Budget(settings.budget_s)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if "ours" in args.parts:
        ops.check_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)

    results = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
            "dtype": str(dtype).replace("torch.", ""),
            "torch": torch.__version__,
            "transformers": hf.transformers_version(),
            "quick": args.quick,
            "parts": args.parts,
            "block_sizes": settings.block_sizes,
            "contexts": settings.contexts,
            "taus": settings.taus,
            "repeats": asdict(settings.repeats),
            "hf_new_tokens": settings.hf_new_tokens,
            "budget_s": settings.budget_s,
            "timing": "CUDA events, median over repeats after warm-up" if device.type == "cuda"
            else "host clock (CPU smoke run: not a timing)",
        },
        "skipped": budget.skipped,
        "models": {},
    }
    log(budget, "measuring device copy bandwidth")
    results["copy_bandwidth"] = copy_bandwidth(device, settings.copy_bytes, settings.copy_repeats)
    bandwidth = results["copy_bandwidth"]["bytes_per_second"]
    static_history: list = []
    for name in settings.models:
        if not budget.allows(settings.context_reserve_s, f"model {name}"):
            continue
        results["models"][name] = benchmark_model(name, settings, args, device, dtype, bandwidth, budget,
                                                  static_history)
        results["meta"]["elapsed_s"] = budget.elapsed()
        # Written after every model, so that a run cut short still leaves what it measured.
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if device.type == "cpu":
        results["meta"]["process_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results["meta"]["elapsed_s"] = budget.elapsed()
    results["plots"] = report.plots(results, args.out)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = report.markdown(results)
    (args.out / "results.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
