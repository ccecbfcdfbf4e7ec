"""Our engine's decode speed: AR steps and Orthrus iterations, replayed through IterationRunner.

Each measurement drives the runner the way Model.generate does on CUDA (stage replays, then one host read
of the outputs per iteration, made while the next iteration is already enqueued) and marks the device
timeline between the stages. An iteration lasts from its start to the next iteration's start and splits
into the diffusion pass (`draft`), the verify pass (`verify`) and the rest (the readback copy and whatever
gap the host leaves between iterations).

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

    def read(readback, step: int) -> None:
        tokens = readback.tokens()
        if len(tokens) != 1:
            raise RuntimeError(f"AR step {step}: expected 1 token per step, the runner emitted {len(tokens)}")
        continuation.extend(tokens)

    starts, verified = [], []
    pending = None
    # One step more than timed: its start ends the last timed step.
    for step in range(repeats.ar_warmup + steps + 1):
        starts.append(clock.mark())
        runner.verify()
        verified.append(clock.mark())
        readback = runner.readback()
        if pending is not None:
            read(pending, step - 1)
        pending = readback
    read(pending, repeats.ar_warmup + steps)
    clock.synchronize()
    timed = range(repeats.ar_warmup, repeats.ar_warmup + steps)
    total_ms = [clock.ms(starts[i], starts[i + 1]) for i in timed]
    verify_ms = [clock.ms(starts[i], verified[i]) for i in timed]
    timing = {
        "context": context,
        "steps": len(total_ms),
        "ms_per_token": median(total_ms),
        "verify_ms": median(verify_ms),
        "rest_ms": median([t - v for t, v in zip(total_ms, verify_ms)]),
        "tokens_per_second": 1e3 * len(total_ms) / sum(total_ms),
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
    # One iteration more than timed: its first mark ends the last timed iteration.
    total = repeats.iteration_warmup + repeats.iterations + 1
    drafts, expected = forced_schedule(continuation, block_size, tau, total, repeats.cycle,
                                       runner.network.config.vocab_size, runner.drafts.device)
    anchor = torch.tensor([continuation[0]], dtype=torch.int64, device=runner.drafts.device)
    marks, emitted = [], []
    mismatches = 0

    def read(readback, index: int) -> None:
        nonlocal mismatches
        tokens = readback.tokens()
        mismatches += tokens != expected[index]
        emitted.append(len(tokens))

    pending = None
    for index in range(total):
        boundary = clock.mark()
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
        readback = runner.readback()
        marks.append((boundary, start, drafted, forced, verified))
        if pending is not None:
            read(pending, index - 1)
        pending = readback
    read(pending, total - 1)
    clock.synchronize()
    timed = range(repeats.iteration_warmup, total - 1)
    # Iteration i runs from its start to the next iteration's boundary (the harness's restart of a cycle,
    # like its forcing copy, is kept out of the iteration time).
    interval_ms = [clock.ms(marks[i][1], marks[i + 1][0]) for i in timed]
    draft_ms = [clock.ms(marks[i][1], marks[i][2]) for i in timed]
    force_ms = [clock.ms(marks[i][2], marks[i][3]) for i in timed]
    verify_ms = [clock.ms(marks[i][3], marks[i][4]) for i in timed]
    iteration_ms = [t - f for t, f in zip(interval_ms, force_ms)]
    rest_ms = [i - d - v for i, d, v in zip(iteration_ms, draft_ms, verify_ms)]
    timed_emitted = [emitted[i] for i in timed]
    return {
        "context": context,
        "block_size": block_size,
        "target_tokens_per_iteration": tau,
        "iterations": len(iteration_ms),
        "draft_ms": median(draft_ms),
        "verify_ms": median(verify_ms),
        "rest_ms": median(rest_ms),
        "iteration_ms": median(iteration_ms),
        "mean_iteration_ms": sum(iteration_ms) / len(iteration_ms),
        "harness_force_ms": median(force_ms),
        "tokens_per_iteration": sum(timed_emitted) / len(timed_emitted),
        "tokens_per_second": 1e3 * sum(timed_emitted) / sum(iteration_ms),
        "matches_ar": mismatches == 0,
        "mismatched_iterations": mismatches,
    }
