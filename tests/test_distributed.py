"""Data-parallel fine-tuning under ``accelerate launch``: 2 CPU processes (gloo) reach the same per-step
losses and LoRA weights as one process with the same global batch — the loop itself, and `pkt postpkt`
end to end (its first use of accelerate's state is not the loop's ``Accelerator()``; a bare
``PartialState()`` there once made each CPU worker train alone). The KD baseline's launch test is in
tests/test_kd.py.

Tolerance: 1e-5 relative on losses and weight sums. The two runs differ only in the order in which
per-example gradients are summed (all-reduce), so they agree to float32 rounding. LoRA dropout is off:
its masks are drawn per process.
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


def _run(cmd, tmp_path, **env):
    # ACCELERATE_USE_CPU makes the torchrun workers CPU (gloo) processes on a machine without GPUs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true",
           **env}
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


def test_two_process_postpkt_cli_matches_one_process(tmp_path, tiny_tok):
    from safetensors.torch import load_file

    from pkt import testing

    data = tmp_path / "data" / "pkt_splits" / "gsm"
    data.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i + 1}?"},
                          {"role": "assistant", "content": f"The answer is {2 * i + 1}"}]} for i in range(6)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    student = testing.save_tiny(testing.tiny_model("qwen2", "student", len(tiny_tok)), tiny_tok, tmp_path / "student")
    (tmp_path / "ft.yaml").write_text("finetune:\n  dropout: 0.0\n")
    # 6 examples, steps of 4 over micro-batches of 2, 2 epochs: 4 steps, the last of each epoch 1 per process
    args = ["postpkt", "--student", student, "--task", "gsm8k", "--init", "lora", "--config", "ft.yaml", "--r", "4",
            "--alpha", "8", "--lr", "1e-2", "--batch-size", "4", "--micro-batch-size", "2", "--epochs", "2",
            "--max-length", "64", "--quiet"]
    data_env = {"PKT_DATA_DIR": str(tmp_path / "data")}
    _run([sys.executable, "-m", "pkt.cli", *args, "--out", "one"], tmp_path, **data_env)
    _run([str(ACCELERATE), "launch", "--config_file", str(CONFIG), "--main_process_port", "29532",
          "-m", "pkt.cli", *args, "--out", "two"], tmp_path, **data_env)
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    logs = [[json.loads(x)["loss"] for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
            for d in ("one", "two")]
    assert len(logs[0]) == 4 and logs[1] == pytest.approx(logs[0], rel=1e-5)
    assert logs[0][-1] < logs[0][0]
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert b[k].double().sum().item() == pytest.approx(a[k].double().sum().item(), rel=1e-5, abs=1e-6), k
