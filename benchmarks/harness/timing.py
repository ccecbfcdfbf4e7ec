"""Clocks, medians, the time budget, and the device copy bandwidth that sets the decode floor."""

from __future__ import annotations

import statistics
import time

import torch


class Clock:
    """Timestamps in the device's own order of work: CUDA events on the GPU, the host clock on the CPU
    (where every operation has finished when the call returns)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        if self.cuda:
            return start.elapsed_time(end)
        return (end - start) * 1e3

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def median(values) -> float:
    return float(statistics.median(values))


class Budget:
    """Wall-clock allowance for the whole run; optional work is skipped, with a recorded reason, once
    too little of it is left."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter()
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, needed_seconds: float, what: str) -> bool:
        if self.remaining() >= needed_seconds:
            return True
        self.skipped.append(f"{what}: skipped, {self.remaining():.0f} s of the {self.seconds:.0f} s budget "
                            f"left and about {needed_seconds:.0f} s needed")
        return False


def capture_graph(calls) -> "torch.cuda.CUDAGraph":
    """`calls()` captured in a CUDA graph, after one eager warm-up run (lazy initialisation must not be
    captured) on the same side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        calls()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            calls()
    torch.cuda.synchronize()
    return graph


def graph_replay_ms(graph: "torch.cuda.CUDAGraph", replays: int) -> float:
    """Median milliseconds of one replay: launch gaps are those of a captured decode step."""
    clock = Clock(torch.device("cuda"))
    times = []
    for _ in range(replays):
        start = clock.mark()
        graph.replay()
        end = clock.mark()
        clock.synchronize()
        times.append(clock.ms(start, end))
    return median(times)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int, warm_up_seconds: float = 0.0) -> dict:
    """Median device-to-device copy rate, counting bytes read plus bytes written (the rate a decode pass,
    which reads weights and writes almost nothing, can at best stream at). With warm_up_seconds the
    device first copies that long, so that an idle GPU's clocks have ramped up before anything is timed."""
    clock = Clock(device)
    # Random bytes, not zeros: a copy of zeros can run faster than real data on some hardware.
    source = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    destination = torch.empty_like(source)
    for _ in range(3):
        destination.copy_(source)
    warm_up_start = time.perf_counter()
    while time.perf_counter() - warm_up_start < warm_up_seconds:
        destination.copy_(source)
        clock.synchronize()
    times = []
    for _ in range(repeats):
        start = clock.mark()
        destination.copy_(source)
        end = clock.mark()
        clock.synchronize()
        times.append(clock.ms(start, end))
    if not torch.equal(destination, source):
        raise RuntimeError("copy bandwidth: the timed copy did not reproduce its source")
    ms = median(times)
    return {"bytes_copied": nbytes, "ms": ms, "bytes_per_second": 2 * nbytes / (ms * 1e-3), "repeats": repeats}
