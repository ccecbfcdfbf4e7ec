"""Our engine's decode speed: AR steps and Orthrus iterations, replayed through IterationRunner.

Each measurement drives the runner the way Model.generate does (stage replays, then one host read of the
outputs per iteration) and marks the device timeline between the stages, so an iteration splits into the
diffusion pass (`draft`), the verify pass (`verify`) and the rest (the host read and loop overhead).

Acceptance is forced instead of hoped for: random weights make the diffusion view's drafts useless, so
after each diffusion pass the harness overwrites `runner.drafts` with the AR continuation (computed first
by AR decoding from the same cache state). Full acceptance gives tau = B; corrupting the draft after the
first k - 1 gives an iteration that really accepts k - 1 drafts and emits k tokens, so any mean tau can be
run, not only predicted. Either way the emitted tokens must equal the AR continuation, which the harness
checks: a mismatch means verification is not reproducing AR decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from orthrus.cache import KVCache
from orthrus.decode import prefill
from orthrus.model import Qwen3
from orthrus.runner import IterationRunner
from orthrus.sampling import SamplingParams

from .timing import median

GREEDY = SamplingParams.create(temperature=0.0, seed=0)


@dataclass
class Repeats:
    ar_warmup: int
    ar_steps: int
    iteration_warmup: int
    iterations: int
    # Forced runs restart from the same position every `cycle` iterations, so the AR continuation they
    # need is only cycle * B tokens long, however many iterations are timed.
    cycle: int


def read_outputs(runner: IterationRunner) -> tuple[int, list[int]]:
    """The one host read of an iteration, exactly as Model.generate does it."""
    count, *block = torch.cat([runner.outputs.count.to(torch.int64), runner.outputs.tokens]).tolist()
    return count, block[:count]


def fill_context(cache: KVCache, length: int, generator: torch.Generator) -> None:
    """Random keys and values for positions [0, length) in every layer; the cache then holds `length`.

    Attention reads every cached row whatever it holds, so random rows cost what a real prefill's do."""
    cache.k[:, :length].normal_(generator=generator)
    cache.v[:, :length].normal_(generator=generator)
    cache.rollback(length)


def prefill_prompt(network: Qwen3, cache: KVCache, prompt: torch.Tensor) -> torch.Tensor:
    """Real prefill through the AR view; returns the first generated token (the first anchor), [1]."""
    return prefill(network, cache, prompt, GREEDY)


def time_ar(runner: IterationRunner, clock, context: int, anchor: torch.Tensor, repeats: Repeats,
            steps: int) -> tuple[dict, list[int]]:
    """AR decoding from `anchor` at position `context`; returns the timing and the continuation
    [anchor, t1, t2, ...] (t_j is the token at position context + j)."""
    runner.cache.rollback(context)
    runner.anchor.copy_(anchor)
    continuation = [int(anchor.item())]
    marks = []
    for step in range(repeats.ar_warmup + steps):
        start = clock.mark()
        runner.verify()
        verified = clock.mark()
        count, tokens = read_outputs(runner)
        end = clock.mark()
        if count != 1:
            raise RuntimeError(f"AR step {step}: expected 1 token per step, the runner emitted {count}")
        continuation += tokens
        if step >= repeats.ar_warmup:
            marks.append((start, verified, end))
    clock.synchronize()
    verify_ms = [clock.ms(s, v) for s, v, _ in marks]
    rest_ms = [clock.ms(v, e) for _, v, e in marks]
    total_ms = [clock.ms(s, e) for s, _, e in marks]
    timing = {
        "context": context,
        "steps": len(marks),
        "ms_per_token": median(total_ms),
        "verify_ms": median(verify_ms),
        "rest_ms": median(rest_ms),
        "tokens_per_second": 1e3 * len(marks) / sum(total_ms),
    }
    return timing, continuation


def tokens_this_iteration(index: int, tau: float) -> int:
    """How many tokens iteration `index` emits so that the running mean is tau (floor(i tau) steps)."""
    return math.floor((index + 1) * tau + 1e-9) - math.floor(index * tau + 1e-9)


def forced_schedule(continuation: list[int], block_size: int, tau: float, iterations: int, cycle: int,
                    vocab_size: int, device) -> tuple[torch.Tensor, list[list[int]]]:
    """Drafts to write before each verify pass, and the tokens each iteration must then emit."""
    drafts, expected = [], []
    position = 0
    for index in range(iterations):
        if index % cycle == 0:
            position = 0
        emitted = tokens_this_iteration(index, tau)
        row = list(continuation[position + 1: position + block_size])
        if len(row) != block_size - 1:
            raise RuntimeError(f"the AR continuation ({len(continuation)} tokens) is too short for "
                               f"{cycle} iterations of block size {block_size}")
        if emitted < block_size:
            row[emitted - 1] = (row[emitted - 1] + 1) % vocab_size
        drafts.append(row)
        expected.append(continuation[position + 1: position + emitted + 1])
        position += emitted
    return torch.tensor(drafts, dtype=torch.int64, device=device), expected


def time_orthrus(runner: IterationRunner, clock, context: int, continuation: list[int], tau: float,
                 repeats: Repeats) -> dict:
    """Orthrus iterations from the anchor continuation[0] at `context`, each emitting the number of tokens
    the tau schedule asks for."""
    block_size = runner.drafts.shape[0] + 1
    total = repeats.iteration_warmup + repeats.iterations
    drafts, expected = forced_schedule(continuation, block_size, tau, total, repeats.cycle,
                                       runner.network.config.vocab_size, runner.drafts.device)
    anchor = torch.tensor([continuation[0]], dtype=torch.int64, device=runner.drafts.device)
    marks, emitted, mismatches = [], [], 0
    for index in range(total):
        if index % repeats.cycle == 0:
            runner.cache.rollback(context)
            runner.anchor.copy_(anchor)
        start = clock.mark()
        runner.draft()
        drafted = clock.mark()
        runner.drafts.copy_(drafts[index])
        forced = clock.mark()
        runner.verify()
        verified = clock.mark()
        count, tokens = read_outputs(runner)
        end = clock.mark()
        if tokens != expected[index]:
            mismatches += 1
        if index >= repeats.iteration_warmup:
            marks.append((start, drafted, forced, verified, end))
            emitted.append(count)
    clock.synchronize()
    draft_ms = [clock.ms(m[0], m[1]) for m in marks]
    force_ms = [clock.ms(m[1], m[2]) for m in marks]
    verify_ms = [clock.ms(m[2], m[3]) for m in marks]
    rest_ms = [clock.ms(m[3], m[4]) for m in marks]
    # The forcing copy is the harness's doing, not the engine's: it is kept out of the iteration time.
    iteration_ms = [d + v + r for d, v, r in zip(draft_ms, verify_ms, rest_ms)]
    return {
        "context": context,
        "block_size": block_size,
        "target_tokens_per_iteration": tau,
        "iterations": len(marks),
        "draft_ms": median(draft_ms),
        "verify_ms": median(verify_ms),
        "rest_ms": median(rest_ms),
        "iteration_ms": median(iteration_ms),
        "mean_iteration_ms": sum(iteration_ms) / len(iteration_ms),
        "harness_force_ms": median(force_ms),
        "tokens_per_iteration": sum(emitted) / len(emitted),
        "tokens_per_second": 1e3 * sum(emitted) / sum(iteration_ms),
        "matches_ar": mismatches == 0,
        "mismatched_iterations": mismatches,
    }

