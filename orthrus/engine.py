"""`Model`: a loaded checkpoint and its generation loop (prompt handling, stop conditions, streaming, stats)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from . import ops
from .cache import KVCache
from .config import ModelConfig
from .decode import prefill
from .errors import OrthrusError
from .model import Qwen3
from .ngram import NGramDrafter
from .runner import IterationRunner
from .sampling import SamplingParams
from .tokenizer import IncrementalDecoder, Tokenizer

MODES = ("orthrus", "ar", "ngram")
CACHE_GRANULARITY = 1024
NGRAM_BLOCK_ROWS = 16  # n-gram verify block on plain Qwen3 checkpoints (Orthrus ones use their block_size)


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str | None
    stats: dict = field(default_factory=dict)


class _StopWatcher:
    """Decides where generation ends and which text may already be streamed.

    Text that could still turn out to be the start of a stop string is held back, so a stream never shows
    what the final `.text` will not contain."""

    def __init__(self, tokenizer: Tokenizer | None, stop: list[str], stream: Callable[[str], None] | None):
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.stop = stop
        self.stream = stream
        self.text = ""
        self.streamed = 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, token: int) -> bool:
        """Adds one token; True when a stop string has appeared (the text is cut before it)."""
        if self.decoder is None:
            return False
        self.text += self.decoder.push([token])
        for stop in self.stop:
            # Only the new text can complete a stop string; search from where it could begin.
            at = self.text.find(stop, max(0, self.streamed - len(stop)))
            if at >= 0:
                self.text = self.text[:at]
                return True
        self._emit(len(self.text) - self.hold)
        return False

    def finish(self, stopped_by_string: bool) -> None:
        if self.decoder is not None and not stopped_by_string:
            self.text += self.decoder.flush()
        self._emit(len(self.text))

    def _emit(self, upto: int) -> None:
        if self.stream is not None and upto > self.streamed:
            self.stream(self.text[self.streamed:upto])
            self.streamed = upto


class Model:
    def __init__(self, config: ModelConfig, network: Qwen3, tokenizer: Tokenizer | None, path: str,
                 extra_eos_token_ids: set[int] = frozenset()):
        self.config = config
        self.network = network
        self.tokenizer = tokenizer
        self.path = path
        self._cache: KVCache | None = None
        self._runners: dict[tuple, IterationRunner] = {}
        # Enqueue iteration i + 1 before reading iteration i (see runner.py). On the CPU nothing runs while
        # the host reads, so there it would only add a discarded iteration at the end; tests switch it on.
        self._read_ahead = network.device.type == "cuda"
        self.eos_token_ids = (set(config.eos_token_ids) | set(extra_eos_token_ids)
                              | (tokenizer.eos_token_ids if tokenizer else set()))

    @property
    def device(self) -> torch.device:
        return self.network.device

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    def __repr__(self) -> str:
        kind = f"orthrus, block_size={self.config.block_size}" if self.network.has_diffusion_view else "qwen3"
        return f"Model({self.path!r}, {kind}, device={self.device}, dtype={self.dtype})"

    # ------------------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt, enable_thinking: bool | None = None) -> list[int]:
        """A str (raw text), a list of token ids, or a list of chat messages -> token ids. For messages,
        `enable_thinking` goes to the chat template (Qwen3's switch for its <think> block)."""
        if isinstance(prompt, str):
            ids = self._require_tokenizer("a text prompt").encode(prompt)
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            text = self._require_tokenizer("chat messages").apply_chat_template(
                list(prompt), enable_thinking=enable_thinking)
            ids = self.tokenizer.encode(text)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            ids = list(prompt)
            bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
            if bad:
                raise OrthrusError(
                    f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        else:
            raise OrthrusError("prompt must be a str, a list of token ids, or a list of chat messages "
                               f"(dicts with 'role' and 'content'), got {type(prompt).__name__}")
        if not ids:
            raise OrthrusError("prompt is empty: at least one token is needed to start generating")
        return ids

    def _require_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise OrthrusError(f"{self.path} has no tokenizer.json, so {what} cannot be encoded; "
                               "pass the prompt as a list of token ids")
        return self.tokenizer

    def _cache_for(self, capacity: int, block_rows: int) -> KVCache:
        cache = self._cache
        if cache is None or cache.capacity < capacity or cache.block_rows < block_rows:
            self._cache = None  # free the old one (and the graphs that use it) before allocating anew
            self._runners.clear()
            cache = self._cache = KVCache(self.config, capacity, block_rows, self.device, self.dtype)
        return cache

    def _runner(self, mode: str, params: SamplingParams, cache: KVCache, block_rows: int) -> IterationRunner:
        """Runners (and their CUDA graphs) are kept per mode and sampling parameters other than the seed,
        which the graphs read from the device: a repeated call replays the graphs captured by the first,
        whatever its seed."""
        if mode == "ngram":  # the number of drafts changes every iteration: nothing to capture
            return IterationRunner(self.network, cache, params, drafts=block_rows - 1, diffusion=False,
                                   use_graphs=False)
        key = (mode, replace(params, seed=0))
        if key not in self._runners:
            self._runners[key] = IterationRunner(self.network, cache, params, drafts=block_rows - 1,
                                                 diffusion=mode == "orthrus")
        runner = self._runners[key]
        runner.use_seed(params.seed)
        return runner

    # ------------------------------------------------------------------------------------------------------
    def generate(self, prompt, *, max_new_tokens: int = 256, mode: str = "orthrus", temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop=None,
                 stream: Callable[[str], None] | None = None,
                 enable_thinking: bool | None = None) -> GenerationResult:
        if mode not in MODES:
            raise OrthrusError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "orthrus" and not self.network.has_diffusion_view:
            raise OrthrusError(f"{self.path} is a plain Qwen3 checkpoint without the diffusion view; use "
                               "mode='ar', or turn it into an Orthrus checkpoint with `orthrus train`")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise OrthrusError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        params = SamplingParams.create(temperature, top_k, top_p, seed)
        stops = list(stop) if isinstance(stop, (list, tuple)) else [] if stop is None else [stop]
        if not all(isinstance(s, str) and s for s in stops):
            raise OrthrusError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        if stops and self.tokenizer is None:
            raise OrthrusError(f"stop strings need a tokenizer, and {self.path} has no tokenizer.json")
        if stream is not None and not callable(stream):
            raise OrthrusError(f"stream must be a callable taking a str, got {type(stream).__name__}")
        prompt_ids = self.encode_prompt(prompt, enable_thinking)
        limit = self.config.max_position_embeddings
        if len(prompt_ids) + max_new_tokens > limit:
            raise OrthrusError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"max_position_embeddings ({limit})")

        block_rows = 1 if mode == "ar" else self.config.block_size or NGRAM_BLOCK_ROWS
        if block_rows > ops.MAX_BLOCK_ROWS:
            raise OrthrusError(f"block_size {block_rows} exceeds the kernels' limit of {ops.MAX_BLOCK_ROWS} rows")
        # Rounded up so that a run of similar requests reuses one cache and its captured graphs.
        capacity = -(-(len(prompt_ids) + max_new_tokens + block_rows) // CACHE_GRANULARITY) * CACHE_GRANULARITY
        self.network.reserve_positions(capacity)
        cache = self._cache_for(capacity, block_rows)
        watcher = _StopWatcher(self.tokenizer, stops, stream)
        ngram = NGramDrafter(max_drafts=block_rows - 1) if mode == "ngram" else None

        tokens: list[int] = []
        histogram: Counter[int] = Counter()
        finished = stopped_by_string = False

        def take(new_tokens: list[int]) -> None:
            nonlocal finished, stopped_by_string
            for token in new_tokens:
                tokens.append(token)
                if watcher.push(token):
                    finished = stopped_by_string = True
                elif token in self.eos_token_ids or len(tokens) >= max_new_tokens:
                    finished = True
                if finished:
                    return

        with torch.inference_mode():
            self._synchronize()
            start = time.perf_counter()
            prompt_tensor = torch.tensor(prompt_ids, dtype=torch.int64, device=self.device)
            first = prefill(self.network, cache, prompt_tensor, params)
            take(first.tolist())
            self._synchronize()
            prefill_done = time.perf_counter()
            runner = self._runner(mode, params, cache, block_rows) if not finished else None
            if runner is not None:
                runner.anchor.copy_(first)

            def launch():
                if ngram is not None:
                    runner.drafts = ngram.propose(prompt_ids + tokens, self.device)
                runner.step()
                return runner.readback()

            # n-gram drafts come from the tokens read so far, so those iterations cannot run ahead. Otherwise
            # the next iteration is enqueued before this one is read when its cache writes stay inside the
            # capacity even if this one emits a whole block (and the next is then discarded at a stop).
            read_ahead = self._read_ahead and ngram is None
            pending = launch() if not finished else None
            while not finished:
                ahead = launch() if read_ahead and len(tokens) + block_rows <= max_new_tokens else None
                # The one host read of the iteration: which tokens it emitted.
                block = pending.tokens()
                histogram[len(block)] += 1
                take(block)
                pending = ahead if ahead is not None or finished else launch()
            decode_done = time.perf_counter()
        watcher.finish(stopped_by_string)

        iterations = sum(histogram.values())
        decode_seconds = decode_done - prefill_done
        stats = {
            "mode": mode,
            "prompt_tokens": len(prompt_ids),
            "generated_tokens": len(tokens),
            "iterations": iterations,
            "tokens_per_iteration": (sum(k * n for k, n in histogram.items()) / iterations) if iterations else 0.0,
            "tokens_per_second": len(tokens) / (decode_done - start),
            "prefill_seconds": prefill_done - start,
            "decode_seconds": decode_seconds,
            "accepted_histogram": {k: histogram[k] for k in sorted(histogram)},
            "seed": params.seed,
        }
        text = watcher.text if self.tokenizer is not None else None
        return GenerationResult(tokens=tokens, text=text, stats=stats)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
