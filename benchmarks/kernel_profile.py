"""Where a decode step's time goes: device time per kernel of the captured AR step and Orthrus passes.

Replays the runner's CUDA graphs (random weights at a Qwen3 shape, cache filled to each context) under the
PyTorch profiler and sums the device time of every kernel by name and pass. Kernel durations from the
profiler do not include the gaps between kernels, so 'kernels' is compared with the replay's wall time
('step'): the difference is launch gaps and dependency waits.

'critical' is the time from the previous kernel's end to each kernel's own (the kernels of a stream end in
order); the shares add up to the pass. With programmatic dependent launch (the default) a kernel starts
early and waits, so its duration says little; its share bounds what removing or speeding it could save,
but only bounds it: the next kernel's early CTAs may be doing their own work (streaming weights) during
that time, and would then simply end no sooner. With ORTHRUS_PDL=0 the durations are each kernel's own
work and the shares include launch gaps (a replay's first kernel also carries the host's gap between
replays).

    python benchmarks/kernel_profile.py --out DIR [--model 8B] [--contexts 1024,32768] [--block-size 32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness import ours  # noqa: E402
from harness.models import build_network, model_config, with_block_size  # noqa: E402
from harness.timing import Clock, median  # noqa: E402
from orthrus.cache import KVCache  # noqa: E402
from orthrus.runner import IterationRunner  # noqa: E402

REPLAYS = 10


LINEAR_EPILOGUES = {"0": "store", "1": "silu_mul", "2": "head_norm_rope", "3": "argmax", "4": "residual_norm"}


def short_name(kernel: str) -> str:
    """Template arguments and parameter lists dropped: 'linear_rows_kernel<bf16, 4>(...)' -> 'linear_rows_kernel',
    except the linear kernel's epilogue: 'linear_rows_kernel<..., (LinearEpilogue)1, 0>' -> 'linear_rows_kernel
    silu_mul'."""
    epilogue = re.search(r"LinearEpilogue\)(\d)", kernel)
    if epilogue:
        return "linear_rows_kernel " + LINEAR_EPILOGUES.get(epilogue.group(1), epilogue.group(1))
    name = kernel.split("(")[0]
    depth, out = 0, []
    for character in name:
        if character == "<":
            depth += 1
        elif character == ">":
            depth -= 1
        elif depth == 0:
            out.append(character)
    name = "".join(out).strip()
    return name.split("::")[-1].split(" ")[-1] or kernel[:60]


def profile_pass(run_pass, replays: int) -> dict:
    """Per-kernel device microseconds of one replay of `run_pass` (median wall time alongside)."""
    clock = Clock(torch.device("cuda"))
    for _ in range(3):
        run_pass()
    torch.cuda.synchronize()
    walls = []
    for _ in range(replays):
        start = clock.mark()
        run_pass()
        end = clock.mark()
        clock.synchronize()
        walls.append(clock.ms(start, end) * 1e3)
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(replays):
            run_pass()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    critical: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    events = sorted((event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda event: event.time_range.end)
    previous_end = None
    for event in events:
        name = short_name(event.name)
        totals[name] += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        # Launch gaps count for the kernel after them; the very first kernel is charged its own duration.
        since = event.time_range.start if previous_end is None else previous_end
        critical[name] += event.time_range.end - since
        previous_end = event.time_range.end
        counts[name] += 1
    kernels = {name: {"us": totals[name] / replays, "critical_us": critical[name] / replays,
                      "calls": counts[name] // replays}
               for name in sorted(totals, key=totals.get, reverse=True)}
    return {"step_us": median(walls), "kernels_us": sum(k["us"] for k in kernels.values()), "kernels": kernels}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", default="8B")
    parser.add_argument("--contexts", default="1024,32768")
    parser.add_argument("--block-size", type=int, default=32)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (it profiles the captured GPU graphs)")
    contexts = [int(c) for c in args.contexts.split(",")]
    device, dtype = torch.device("cuda"), torch.bfloat16
    config = model_config(args.model)
    network = build_network(config, device, dtype, seed=0)
    capacity = max(contexts) + 2 * args.block_size + 1
    network.reserve_positions(capacity)
    drafty = with_block_size(network, args.block_size)
    drafty.reserve_positions(capacity)
    cache = KVCache(config, capacity, args.block_size, device, dtype)
    generator = torch.Generator(device=device)
    generator.manual_seed(1)
    results = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
               "model": args.model, "block_size": args.block_size, "contexts": {}}
    with torch.inference_mode():
        ar = IterationRunner(network, cache, ours.GREEDY, drafts=0, diffusion=False)
        orthrus = IterationRunner(drafty, cache, ours.GREEDY, drafts=args.block_size - 1, diffusion=True)
        for context in contexts:
            ours.fill_context(cache, context, generator)

            def at_context(step):
                def run():
                    cache.rollback(context)
                    step()
                return run

            results["contexts"][str(context)] = {
                "ar_step": profile_pass(at_context(ar.verify), REPLAYS),
                "diffusion_pass": profile_pass(at_context(orthrus.draft), REPLAYS),
                "verify_pass": profile_pass(at_context(orthrus.verify), REPLAYS),
            }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_profile.json").write_text(json.dumps(results, indent=1))
    lines = [f"# Kernel time per pass: {args.model}, B = {args.block_size}, {results['device']}, {results['date']}", ""]
    for context, passes in results["contexts"].items():
        for name, data in passes.items():
            lines.append(f"## context {context}, {name}: step {data['step_us']:.0f} us, kernels {data['kernels_us']:.0f} us")
            lines.append("| kernel | us per step | critical us per step | calls |")
            lines.append("|---|---|---|---|")
            lines += [f"| {k} | {v['us']:.1f} | {v['critical_us']:.1f} | {v['calls']} |"
                      for k, v in data["kernels"].items()]
            lines.append("")
    text = "\n".join(lines)
    (args.out / "kernel_profile.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
