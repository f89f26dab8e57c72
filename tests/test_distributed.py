"""Multi-process tests on gloo over loopback: expert-parallel SparseMoE against the
single-process layer, data-parallel training on 1, 2 and 4 ranks against one process,
a rank killed mid-training and resumed, a rank that never arrives, and torchrun.

Every rank is a subprocess (tests/distributed_worker.py) bounded by a timeout, and when one
rank fails the others are killed, as torchrun does, so no test can hang.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import smoe_ops
from smoe_ops.reward import SparseMoERewardModel, train
from smoe_ops.reward.personalize import personalize
from smoe_ops.reward.synthetic import user_types
from tests.distributed_worker import expert_layer_inputs, training_problem
from tests.helpers import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_env(world: int, port: int, rank: int) -> dict:
    return dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def launch(scenario, world, out_dir, arguments, timeout=60.0, ranks=None):
    """Run the worker's `scenario` as ranks `ranks` (default all) of `world`; returns
    {rank: (return code, log text)}. A rank that fails gets the others killed; past
    `timeout` seconds every rank is killed and the test fails."""
    port, logs, procs = free_port(), {}, {}
    os.makedirs(out_dir, exist_ok=True)
    for rank in range(world) if ranks is None else ranks:
        logs[rank] = open(os.path.join(out_dir, f"{scenario}-rank{rank}.log"), "w+")
        procs[rank] = subprocess.Popen(
            [sys.executable, WORKER, scenario, str(out_dir), json.dumps(arguments)],
            env=rank_env(world, port, rank), stdout=logs[rank], stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs.values()):
            if time.monotonic() > deadline:
                pytest.fail(f"{scenario} on {world} ranks ran past {timeout} s")
            if any(p.poll() not in (None, 0) for p in procs.values()):
                break
            time.sleep(0.05)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
    results = {}
    for rank, p in procs.items():
        logs[rank].seek(0)
        results[rank] = (p.returncode, logs[rank].read())
        logs[rank].close()
    return results


def assert_all_succeeded(results) -> None:
    for rank, (code, log) in results.items():
        assert code == 0, f"rank {rank} exited with {code}:\n{log[-3000:]}"


# -- expert parallel -------------------------------------------------------------------

EXPERT_CASES = {
    2: [
        dict(tokens=[5, 7], hidden=8, ffn=6, experts=4, k=2, seed=0),
        dict(tokens=[0, 6], hidden=8, ffn=6, experts=2, k=1, seed=1),  # a rank without tokens
        dict(tokens=[2, 1], hidden=8, ffn=6, experts=8, k=1, seed=2),  # most experts empty
        dict(tokens=[4, 4], hidden=8, ffn=6, experts=4, k=1, seed=3,
             one_expert=3),  # all rows to rank 1: rank 0 receives none
        dict(tokens=[3, 5], hidden=8, ffn=6, experts=4, k=4, seed=4),  # k = E
    ],
    4: [
        dict(tokens=[3, 0, 5, 2], hidden=8, ffn=6, experts=8, k=2, seed=5),
        dict(tokens=[1, 2, 3, 4], hidden=8, ffn=6, experts=4, k=4, seed=6),
        dict(tokens=[4, 4, 4, 4], hidden=8, ffn=4, experts=60, k=3, seed=7),  # E = 60
        dict(tokens=[0, 0, 0, 0], hidden=8, ffn=4, experts=4, k=2, seed=8),  # T = 0 everywhere
    ],
}


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_single_process(world, tmp_path):
    assert_all_succeeded(launch("expert_parallel", world, tmp_path, EXPERT_CASES[world]))
    ranks = [torch.load(tmp_path / f"expert_parallel_rank{r}.pt") for r in range(world)]
    for got in ranks:  # E = 2 G + 1 experts cannot be shared out evenly
        assert f"num_experts={2 * world + 1} must be divisible by the process group size " \
            f"{world}" in got["indivisible_error"]
    ranks = [got["cases"] for got in ranks]
    for number, case in enumerate(EXPERT_CASES[world]):
        x, router, w_in, w_out, grad = [t.requires_grad_() for t in expert_layer_inputs(case)]
        y, _aux = smoe_ops.moe_ffn(x, router, w_in, w_out, case["k"])
        (y * grad).sum().backward()
        got = [r[number] for r in ranks]
        label = f"case {number} {case}"
        assert_close(torch.cat([g["y"] for g in got]), y, msg=label)
        assert_close(torch.cat([g["x_grad"] for g in got]), x.grad, msg=label)
        for g in got:
            assert_close(g["router_grad"], router.grad, msg=label)
            experts = slice(*g["experts"])
            assert_close(g["w_in_grad"], w_in.grad[experts], msg=label)
            assert_close(g["w_out_grad"], w_out.grad[experts], msg=label)
        assert [g["experts"] for g in got] == [
            [r * case["experts"] // world, (r + 1) * case["experts"] // world]
            for r in range(world)]


def test_expert_parallel_needs_experts_divisible_by_group():
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        layer = smoe_ops.nn.SparseMoE(8, 4, 3, 1, process_group=group)
        assert layer.w_in.shape == (3, 8, 8) and "local experts [0, 3)" in repr(layer)
        # A one-rank group computes the single-process layer exactly.
        torch.manual_seed(0)
        reference = smoe_ops.nn.SparseMoE(8, 4, 3, 1)
        layer.load_state_dict(reference.state_dict())
        x = torch.randn(5, 8)
        torch.testing.assert_close(layer(x)[0], reference(x)[0], rtol=0, atol=0)
        with pytest.raises(ValueError, match="w_in must hold this rank's experts"):
            smoe_ops.ops.expert_parallel.expert_parallel_moe_ffn(
                x, reference.router_weight, reference.w_in[:2], reference.w_out, 1)
    finally:
        dist.destroy_process_group()
