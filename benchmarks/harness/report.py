"""results.md (tables) and the PNG plots, from the results dictionary alone."""

from __future__ import annotations

from pathlib import Path

GB = 1e9


def _number(value, digits=1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def _tau_label(tau: float) -> str:
    return f"{tau:g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _hf_speed(model: dict, cache: str) -> str:
    run = model.get("hf", {}).get(cache)
    if run is None:
        return "—"
    if "tokens_per_second" not in run:
        return "skipped" if "skipped" in run else "failed"
    return _number(run["tokens_per_second"])


def _scaling_summary(models: dict) -> list[str]:
    """The ratios the speed targets are stated in, between the shortest and the longest scaling context:
    AR time over its floor, iteration time over the two-pass floor, and how the iteration grows."""
    rows = []
    for name, model in models.items():
        contexts = sorted(model.get("contexts", {}), key=int)
        if len(contexts) < 2:
            continue
        short, long = model["contexts"][contexts[0]], model["contexts"][contexts[-1]]
        for block, full in short["orthrus"].items():
            if block not in long["orthrus"]:
                continue
            rows.append([name, block, contexts[0], _percent(short["ar"]["fraction_of_floor"]),
                         f"{full['iteration_ms'] / full['floor_ms']:.2f}x", contexts[-1],
                         f"{long['orthrus'][block]['iteration_ms'] / full['iteration_ms']:.2f}x"])
    if not rows:
        return []
    return ["## Ratios between the shortest and the longest context", ""] + _table(
        ["model", "B", "short context", "AR % floor", "iteration / two-pass floor", "long context",
         "iteration long / short"], rows) + [""]


def markdown(results: dict) -> str:
    meta, models = results["meta"], results["models"]
    bandwidth = results["copy_bandwidth"]
    lines = [f"# Orthrus decode benchmark ({meta['device_name']}, {meta['dtype']}, batch 1)", "",
             f"{meta['date']}; torch {meta['torch']}; transformers {meta['transformers'] or 'not installed'}; "
             f"random weights at the real shapes; {meta['elapsed_s']:.0f} s in all.",
             f"Device copy bandwidth (bytes read + written): {bandwidth['bytes_per_second'] / GB:,.0f} GB/s. "
             "Floor = bytes a pass must stream (weights except the embedding table, plus the KV cache read) / "
             "that bandwidth; '% floor' = floor time / measured time.", ""]

    lines += ["## Decode speed at the prompt context", ""]
    rows = []
    for name, model in models.items():
        ar = model.get("ar")
        rows.append([name, str(model["prompt_tokens"]),
                     _number(ar and ar["tokens_per_second"]), _number(1e3 / model["floor"][str(model["prompt_tokens"])]["ar_step_ms"]),
                     _percent(ar and ar["fraction_of_floor"]), _hf_speed(model, "dynamic"),
                     _hf_speed(model, "static"),
                     _number(model["memory"].get("peak_bytes") and model["memory"]["peak_bytes"] / GB, 2),
                     _number(model["memory"]["diffusion_view_extra_bytes"] / GB, 2)])
    lines += _table(["model", "context", "ours AR tok/s", "AR floor tok/s", "AR % floor", "HF dynamic tok/s",
                     "HF static tok/s", "peak GB", "diffusion view GB"], rows)
    hf_notes = [f"- {name} HF {cache}: {run['skipped'] if 'skipped' in run else run['error']}"
                for name, model in models.items() for cache, run in model.get("hf", {}).items()
                if isinstance(run, dict) and ("skipped" in run or "error" in run)]
    lines += [""] + hf_notes + ([""] if hf_notes else [])
    lines += ["HF tok/s = new tokens / whole `generate` call (prompt prefill included); the static cache is "
              "compiled by transformers on CUDA. 'diffusion view GB' = the *_diff weights + one block of "
              "diffusion K/V scratch.", ""]

    taus = meta["taus"]
    rows = []
    for name, model in models.items():
        for block, run in model.get("orthrus", {}).items():
            full = run["full_acceptance"]
            row = [name, block, _number(full["draft_ms"], 2), _number(full["verify_ms"], 2),
                   _number(full["rest_ms"], 2), _number(full["iteration_ms"], 2), _number(full["floor_ms"], 2),
                   _percent(full["fraction_of_floor"]),
                   f"{_number(full['tokens_per_second'])} ({'exact' if full['matches_ar'] else 'MISMATCH'})"]
            for tau in taus:
                forced = run["tau"].get(_tau_label(tau))
                row.append("—" if forced is None else
                           f"{_number(forced['predicted_tokens_per_second'])} / "
                           f"{_number(forced['tokens_per_second'])}{'' if forced['matches_ar'] else ' MISMATCH'}")
            rows.append(row)
    if rows:
        lines += ["## Orthrus iteration at the prompt context", ""]
        lines += _table(["model", "B", "diffusion ms", "verify ms", "rest ms", "iteration ms", "floor ms",
                         "% floor", "tok/s τ=B"] + [f"tok/s τ={_tau_label(t)} pred / run" for t in taus], rows)
        lines += ["", "τ=B: drafts forced to the AR continuation, all accepted (checked against AR decoding). "
                  "'pred' = τ / mean iteration time; 'run' = a run whose drafts are corrupted after τ−1 tokens on "
                  "average, so it really accepts that many.", ""]

    rows = []
    for name, model in models.items():
        for context, scaled in model.get("contexts", {}).items():
            ar = scaled["ar"]
            for block, full in scaled["orthrus"].items():
                rows.append([name, context, _number(ar["ms_per_token"], 2), _number(ar["tokens_per_second"]),
                             _percent(ar["fraction_of_floor"]), block, _number(full["iteration_ms"], 2),
                             _number(full["tokens_per_second"]), _percent(full["fraction_of_floor"]),
                             "yes" if full["matches_ar"] else "NO"])
    if rows:
        lines += ["## Context scaling (cache filled with random K/V)", ""]
        lines += _table(["model", "context", "AR ms/token", "AR tok/s", "AR % floor", "B", "iteration ms",
                         "tok/s τ=B", "iteration % floor", "exact"], rows)
        lines += [""]
        lines += _scaling_summary(models)

    if results["skipped"]:
        lines += ["## Skipped", ""] + [f"- {note}" for note in results["skipped"]] + [""]
    return "\n".join(lines)


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    models = {name: model for name, model in results["models"].items() if "ar" in model}
    if not models:
        return written

    figure, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for axis, (name, model) in zip(axes[0], models.items()):
        points = [(model["prompt_tokens"], model["ar"], model["orthrus"])]
        points += [(int(c), s["ar"], {b: {"full_acceptance": f} for b, f in s["orthrus"].items()})
                   for c, s in model.get("contexts", {}).items()]
        points.sort(key=lambda point: point[0])
        contexts = [p[0] for p in points]
        axis.plot(contexts, [p[1]["tokens_per_second"] for p in points], "o-", label="ours AR")
        axis.plot(contexts, [1e3 / p[1]["floor_ms"] for p in points], "k--", label="AR floor")
        for block in model["orthrus"]:
            axis.plot(contexts, [p[2][block]["full_acceptance"]["tokens_per_second"] for p in points], "s-",
                      label=f"Orthrus B={block}, τ={block}")
        taus = [t for t in results["meta"]["taus"] if t <= max(map(int, model["orthrus"]))]
        if taus:
            tau, block = taus[len(taus) // 2], max(model["orthrus"], key=int)
            axis.plot(contexts, [1e3 * tau / p[2][block]["full_acceptance"]["mean_iteration_ms"] for p in points],
                      "^:", label=f"Orthrus B={block}, τ={tau:g} (τ / iteration time)")
        for cache in ("dynamic", "static"):
            run = model.get("hf", {}).get(cache, {})
            if "tokens_per_second" in run:
                axis.axhline(run["tokens_per_second"], linestyle=":", color="gray" if cache == "dynamic" else "red",
                             label=f"HF {cache} (prompt {run['prompt_tokens']})")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel("tokens / s")
        axis.set_title(name)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    path = out / "tokens_per_second_vs_context.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    written.append(path.name)

    labels, parts = [], {"diffusion pass": [], "verify pass": [], "rest": []}
    floors = []
    for name, model in models.items():
        for block, run in model["orthrus"].items():
            full = run["full_acceptance"]
            labels.append(f"{name}\nB={block}")
            parts["diffusion pass"].append(full["draft_ms"])
            parts["verify pass"].append(full["verify_ms"])
            parts["rest"].append(full["rest_ms"])
            floors.append(full["floor_ms"])
    if labels:
        figure, axis = plt.subplots(figsize=(max(5, 1.2 * len(labels) + 2), 4))
        bottom = [0.0] * len(labels)
        for part, values in parts.items():
            axis.bar(labels, values, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, values)]
        axis.scatter(labels, floors, marker="_", s=600, color="black", label="floor (2 passes)", zorder=3)
        axis.set_ylabel("ms per iteration")
        axis.set_title(f"Orthrus iteration at the prompt context ({results['meta']['device_name']})")
        axis.legend(fontsize=8)
        figure.tight_layout()
        path = out / "iteration_breakdown.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path.name)
    return written
