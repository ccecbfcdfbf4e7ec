"""The benchmark harness end to end on CPU (`benchmarks/run.py --device cpu --quick`): a smoke run of every
code path on a tiny model, not a timing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("orthrus_ext", reason="the benchmark drives our engine, which needs the built extension")

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    completed = subprocess.run([sys.executable, str(RUN), "--device", "cpu", "--quick", "--out", str(out)],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return out, completed.stdout


def test_writes_every_output(quick_run):
    out, stdout = quick_run
    results = json.loads((out / "results.json").read_text())
    for name in ["results.md"] + results["plots"]:
        assert (out / name).stat().st_size > 0, name
    assert set(results["plots"]) == {"tokens_per_second_vs_context.png", "iteration_breakdown.png"}
    # The tables are printed last.
    assert stdout.rstrip().endswith((out / "results.md").read_text().rstrip())


def test_results_have_every_measurement(quick_run):
    results = json.loads((quick_run[0] / "results.json").read_text())
    assert {"meta", "copy_bandwidth", "models", "skipped", "plots"} <= set(results)
    assert results["copy_bandwidth"]["bytes_per_second"] > 0
    model = results["models"]["tiny"]
    assert {"config", "bytes", "memory", "ar", "orthrus", "contexts", "hf", "exact"} <= set(model)

    assert model["ar"]["tokens_per_second"] > 0
    assert 0 < model["ar"]["floor_ms"] and model["ar"]["fraction_of_floor"] > 0
    assert set(model["orthrus"]) == {"16", "32"}
    for block, run in model["orthrus"].items():
        full = run["full_acceptance"]
        for key in ("draft_ms", "verify_ms", "rest_ms", "iteration_ms", "floor_ms", "fraction_of_floor"):
            assert full[key] > 0, (block, key)
        # Forced full acceptance emits the whole block every iteration ...
        assert full["tokens_per_iteration"] == int(block)
        # ... and forced partial acceptance really emits about tau tokens per iteration.
        assert set(run["tau"]) == {"6.9", "9.6", "11.7"}
        for tau, forced in run["tau"].items():
            assert abs(forced["tokens_per_iteration"] - float(tau)) <= 1.0, (block, tau)
            assert forced["predicted_tokens_per_second"] > 0
    assert set(model["contexts"]) == {"64", "128"}
    for context in model["contexts"].values():
        assert context["ar"]["tokens_per_second"] > 0
        assert set(context["orthrus"]) == {"16", "32"}

    memory = model["memory"]
    assert memory["diffusion_view_extra_bytes"] == (memory["diffusion_view_weight_bytes"]
                                                    + memory["diffusion_block_scratch_bytes"]) > 0
    assert model["bytes"]["ar_pass_weights"] < model["bytes"]["unique_weights"]


def test_tables_state_the_target_ratios(quick_run):
    out = quick_run[0]
    model = json.loads((out / "results.json").read_text())["models"]["tiny"]
    short, long = model["contexts"]["64"], model["contexts"]["128"]
    growth = long["orthrus"]["32"]["iteration_ms"] / short["orthrus"]["32"]["iteration_ms"]
    over_floor = short["orthrus"]["32"]["iteration_ms"] / short["orthrus"]["32"]["floor_ms"]
    row = f"| tiny | 32 | 64 | {100 * short['ar']['fraction_of_floor']:.0f}% | {over_floor:.2f}x | 128 | {growth:.2f}x |"
    assert row in (out / "results.md").read_text()


def test_orthrus_reproduces_ar_decoding(quick_run):
    """fp32 on the CPU promises bit-exact equality: every forced iteration emits the AR continuation."""
    model = json.loads((quick_run[0] / "results.json").read_text())["models"]["tiny"]
    assert model["exact"], model["mismatches"]


def test_hf_baseline_runs_on_the_same_weights(quick_run):
    model = json.loads((quick_run[0] / "results.json").read_text())["models"]["tiny"]
    if model["hf"].get("skipped"):
        pytest.skip(model["hf"]["skipped"])
    for cache in ("dynamic", "static"):
        run = model["hf"][cache]
        assert run["tokens_per_second"] > 0
        # Same weights, fp32: HF greedy decoding must produce our AR tokens, which checks the weight mapping.
        assert run["tokens_equal_to_ours"] == run["new_tokens"]
