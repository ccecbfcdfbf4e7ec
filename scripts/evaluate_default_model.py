"""Evaluate the embedded default model on held-out standard-library code prompts.

For each prompt (benchmarks/default_model_prompts.json: the first lines of functions from stdlib files
that the model never saw in training) this generates greedily in the modes ar, orthrus and ngram and
reports τ (tokens per iteration) of the diffusion view and of the n-gram drafter, tokens/s of each mode,
and whether orthrus and ngram reproduced the ar tokens exactly. Results are merged per device into
benchmarks/default_model_results.json, and the table between the result markers of
benchmarks/default_model_results.md is rewritten from it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orthrus  # noqa: E402

PROMPTS_FILE = ROOT / "benchmarks" / "default_model_prompts.json"
RESULTS_JSON = ROOT / "benchmarks" / "default_model_results.json"
RESULTS_MD = ROOT / "benchmarks" / "default_model_results.md"
BEGIN, END = "<!-- results:begin (scripts/evaluate_default_model.py) -->", "<!-- results:end -->"
MODES = ("ar", "orthrus", "ngram")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def evaluate(model_path, prompts: list[str], device: str, max_new_tokens: int) -> dict:
    model = orthrus.load(model_path, device=device)
    for mode in MODES:  # warm-up: CUDA graphs, allocator, first-call costs
        model.generate(prompts[0], max_new_tokens=16, mode=mode)
    per_mode = {mode: {"tokens": 0, "iterations": 0, "seconds": 0.0, "taus": [], "histogram": {}}
                for mode in MODES}
    exact = {"orthrus": 0, "ngram": 0}
    for prompt in prompts:
        outputs = {}
        for mode in MODES:
            result = model.generate(prompt, max_new_tokens=max_new_tokens, mode=mode)
            stats = result.stats
            entry = per_mode[mode]
            entry["tokens"] += stats["generated_tokens"]
            entry["iterations"] += stats["iterations"]
            entry["seconds"] += stats["prefill_seconds"] + stats["decode_seconds"]
            entry["taus"].append(stats["tokens_per_iteration"])
            for count, iterations in stats["accepted_histogram"].items():
                entry["histogram"][count] = entry["histogram"].get(count, 0) + iterations
            outputs[mode] = result.tokens
        for mode in exact:
            exact[mode] += outputs[mode] == outputs["ar"]
    summary = {"device": device_name(model.device), "dtype": str(model.dtype).removeprefix("torch."),
               "block_size": model.config.block_size, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "modes": {}}
    for mode, entry in per_mode.items():
        summary["modes"][mode] = {
            "tokens_per_second": entry["tokens"] / entry["seconds"],
            "tau_mean_over_prompts": sum(entry["taus"]) / len(entry["taus"]),
            "tau_pooled": entry["tokens"] / entry["iterations"] if entry["iterations"] else 0.0,
            "generated_tokens": entry["tokens"],
            "iterations_by_tokens": {str(k): entry["histogram"][k] for k in sorted(entry["histogram"])},
            "identical_to_ar": len(prompts) if mode == "ar" else exact[mode]}
    return summary


def markdown(results: dict) -> str:
    lines = ["| device | dtype | block | prompts | mode | τ (mean over prompts) | τ (pooled) | tok/s | "
             "output == ar |", "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(results):
        r = results[key]
        for mode in MODES:
            m = r["modes"][mode]
            tau = "-" if mode == "ar" else f"{m['tau_mean_over_prompts']:.2f}"
            pooled = "-" if mode == "ar" else f"{m['tau_pooled']:.2f}"
            lines.append(f"| {r['device']} | {r['dtype']} | {r['block_size']} | {r['prompts']} | {mode} | {tau} | "
                         f"{pooled} | {m['tokens_per_second']:.1f} | {m['identical_to_ar']}/{r['prompts']} |")
    lines.append("")
    lines.append(f"Greedy, up to {next(iter(results.values()))['max_new_tokens']} new tokens per prompt; "
                 "tok/s = generated tokens / (prefill + decode time), summed over prompts; "
                 "dates and torch versions are in default_model_results.json.")
    return "\n".join(lines)


def write_markdown(results: dict) -> None:
    table = f"{BEGIN}\n{markdown(results)}\n{END}"
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Embedded default model: results\n\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + table + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    RESULTS_MD.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", default=str(PROMPTS_FILE))
    parser.add_argument("--count", type=int, default=64, help="how many prompts to use")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--results", default=str(RESULTS_JSON), help="results json to merge into ('' : none)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="only merge results files written elsewhere (e.g. on a GPU machine) into --results")
    args = parser.parse_args(argv)
    from orthrus.default_model import default_model_path

    if args.merge:
        path = Path(args.results)
        results = json.loads(path.read_text()) if path.exists() else {}
        for file in args.merge:
            results.update(json.loads(Path(file).read_text()))
        path.write_text(json.dumps(results, indent=1) + "\n")
        if path.resolve() == RESULTS_JSON.resolve():
            write_markdown(results)
        return 0

    prompts = [p["prompt"] for p in json.loads(Path(args.prompts).read_text())["prompts"]][:args.count]
    summary = evaluate(args.model or default_model_path(), prompts, args.device, args.max_new_tokens)
    print(json.dumps(summary, indent=1))
    if args.results:
        path = Path(args.results)
        results = json.loads(path.read_text()) if path.exists() else {}
        results[f"{summary['device']} / {summary['dtype']}"] = summary
        path.write_text(json.dumps(results, indent=1) + "\n")
        if path.resolve() == RESULTS_JSON.resolve():
            write_markdown(results)
        print(markdown({"this run": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
