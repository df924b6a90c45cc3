"""DistributedDataParallel on CPU: 2 gloo processes train 2 steps and end with identical weights."""
from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from test_train import make_fake_sample, tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    import test_train  # noqa: F401  (registers the tiny test model in this process)
    from models.config import TrainConfig
    from models.train import train

    res = train(TrainConfig(**cfg_dict))
    torch.save({"params": {k: v.detach().clone() for k, v in res.model.named_parameters()},
                "steps": res.history[0]["steps"], "world": dist.get_world_size()}, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()  # leave together: a rank tearing gloo down while its peer still works aborts the peer
    dist.destroy_process_group()


def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    data = make_fake_sample(tmp_path / "d", n_images=24, n_patients=12)
    cfg = tiny_config(tmp_path, data, epochs=1, batch_size=8, threads=1, bootstrap=20, lr=0.05)
    ctx = mp.spawn(_worker, args=(2, _free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.time() + 240
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish in 240 s")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == 2  # 18 images, 4 per rank-batch
    assert r0["params"].keys() == r1["params"].keys()
    for k in r0["params"]:
        torch.testing.assert_close(r0["params"][k], r1["params"][k], rtol=0, atol=0, msg=f"{k} differs")
    # training happened, and only rank 0 wrote the run directory
    final = torch.load(tmp_path / "run" / "model_final.pt", weights_only=True)
    import test_train
    from models.registry import create_model

    torch.manual_seed(cfg.seed)
    init = create_model(cfg.model, num_classes=14, in_chans=1, drop_rate=cfg.drop_rate).state_dict()
    assert not torch.equal(init["classifier.weight"], final["model"]["classifier.weight"])
    assert torch.equal(final["model"]["classifier.weight"], r0["params"]["classifier.weight"])
    import json

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json", "last.pt", "metrics.json", "model_final.pt", "predictions.npz"]
    assert test_train.TINY == cfg.model
