"""Data-parallel fine-tuning under ``accelerate launch``: 2 CPU processes (gloo) reach the same per-step
losses and LoRA weights as one process with the same global batch.

Tolerance: 1e-5 relative on losses and weight sums. The two runs differ only in the order in which
per-example gradients are summed (all-reduce), so they agree to float32 rounding.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_finetune_script.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")
CONFIG = Path(__file__).parents[1] / "configs" / "accelerate" / "cpu_ddp.yaml"


def _run(cmd, tmp_path):
    # ACCELERATE_USE_CPU makes the torchrun workers CPU (gloo) processes on a machine without GPUs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]


def test_two_process_ddp_matches_one_process(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _run([sys.executable, str(SCRIPT), str(one)], tmp_path)
    _run([str(ACCELERATE), "launch", "--config_file", str(CONFIG), "--main_process_port", "29517",
          str(SCRIPT), str(two)], tmp_path)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world"], b["world"]) == (1, 2)
    assert len(a["losses"]) == len(b["losses"]) == 4
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)
    assert a["losses"][-1] < a["losses"][0]  # it trains
    assert a["lora"].keys() == b["lora"].keys()
    for k in a["lora"]:
        assert b["lora"][k] == pytest.approx(a["lora"][k], rel=1e-5, abs=1e-6), k
