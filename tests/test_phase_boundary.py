"""The phase-boundary probe (benchmarks/phase_boundary.py) on CPU: its phases stream what a decode pass
streams, and without a GPU it stops with a clear message."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from harness.models import build_network, kv_bytes_per_token, model_config, streamed_weight_bytes  # noqa: E402
from phase_boundary import layer_phase_bytes, lm_head_phase_bytes  # noqa: E402

MERGE_PHASE = 2  # the attention merge's partial states: scratch the floor does not count


@pytest.mark.parametrize("context", [0, 1, 1000])
def test_phases_stream_the_ar_floor_bytes(context):
    config = model_config("tiny")
    network = build_network(config, torch.device("cpu"), torch.bfloat16, seed=0)
    layer = layer_phase_bytes(config, context)
    streamed = (sum(layer) - layer[MERGE_PHASE]) * config.num_hidden_layers + lm_head_phase_bytes(config)
    floor = streamed_weight_bytes(network, "ar") + kv_bytes_per_token(config, torch.bfloat16) * context
    assert streamed == floor


def test_merge_phase_reads_one_state_per_split_and_head():
    config = model_config("8B")
    # 1,024 cached keys and the new one: 9 splits of 128 keys, 32 heads of 128 values and 2 statistics.
    assert layer_phase_bytes(config, 1024)[MERGE_PHASE] == 9 * 32 * 130 * 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_refuses_to_run_without_a_gpu():
    completed = subprocess.run([sys.executable, str(BENCHMARKS / "phase_boundary.py")], capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 2
    assert "needs a CUDA device" in completed.stderr
