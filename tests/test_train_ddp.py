"""Data-parallel training: 2 CPU processes on the gloo backend (torch.multiprocessing, and torchrun + the CLI)."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from hass_ext.train import prepare_data
from train_fixtures import make_records, tiny_target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    target = tiny_target("chatml", seed=2, head_scale=20.0)
    target_dir = str(root / "target")
    target.model.save_pretrained(target_dir)
    target.tokenizer.save_pretrained(target_dir)
    data = str(root / "data")
    prepare_data(target, make_records(40, seed=12), data, max_len=80, shard_size=20, progress=False)
    return root, target_dir, data


def worker(rank, world, port, target_dir, data, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from hass_ext.train import TrainConfig, Trainer

    t = Trainer(TrainConfig(data_dir=data, out_dir=out, batch_size=2, lr=3e-3, max_steps=3, warmup_steps=1,
                            eval_fraction=0.1, eval_k=2, eval_max_examples=4, log_every=1, progress=False),
                target=target_dir)
    before = {k: v.clone() for k, v in t.draft.state_dict().items()}
    result = t.train()
    torch.save({"params": t.draft.state_dict(), "before": before, "history": t.history, "result": result,
                "indices": [t._indices(s) for s in range(3)]}, os.path.join(out, f"rank{rank}.pt"))
    import torch.distributed as dist

    dist.destroy_process_group()


def test_two_process_ddp_keeps_parameters_in_sync(setup):
    root, target_dir, data = setup
    out = str(root / "mp")
    os.makedirs(out)
    torch.multiprocessing.spawn(worker, args=(2, free_port(), target_dir, data, out), nprocs=2, join=True)
    r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in (0, 1))
    changed = False
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), f"{k} differs between the processes"
        changed |= not torch.equal(v, r0["before"][k])
    assert changed
    losses = [h["loss"] for h in r0["history"] + r1["history"] if h["kind"] == "train"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    # the two processes see disjoint halves of every global batch
    for a, b in zip(r0["indices"], r1["indices"]):
        assert len(a) == len(b) == 2 and not set(a) & set(b)
    assert r0["result"] == r1["result"]  # evaluation counts are all-reduced
    assert os.path.exists(os.path.join(out, "draft", "model.safetensors"))


def test_torchrun_cli(setup):
    root, target_dir, data = setup
    out = str(root / "cli")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.pathsep + env.get(
        "PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "hass_ext.train.cli", "train", "--data", data, "--out", out, "--target", target_dir,
           "--mode", "eagle", "--max-steps", "2", "--batch-size", "2", "--eval-fraction", "0.1",
           "--eval-max-examples", "2", "--log-every", "1", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["step"] == 2 and math.isfinite(summary["loss_per_step"][0])
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2]
    assert os.path.exists(os.path.join(out, "draft", "config.json"))
