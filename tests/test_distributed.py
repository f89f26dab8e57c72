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
from smoe_ops.reward import train
from smoe_ops.reward import personalize
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


def launch(*args, **kwargs):
    """Run the worker's `scenario` as ranks `ranks` (default all) of `world`; returns
    {rank: (return code, log text)} once the ranks `wait_for` (default all) have ended;
    the others are killed then. A rank that fails gets the others killed (unless
    kill_on_failure is False); past `timeout` seconds every rank is killed and the test
    fails. The port is free when picked, but another process may bind it before rank 0
    does: such a start is tried again on another port, twice at most."""
    for _attempt in range(3):
        results = _launch_once(*args, **kwargs)
        if not any("Address already in use" in log for _code, log in results.values()):
            break
    return results


def _launch_once(scenario, world, out_dir, arguments, timeout=60.0, ranks=None,
                 kill_on_failure=True, wait_for=None):
    port, logs, procs = free_port(), {}, {}
    os.makedirs(out_dir, exist_ok=True)
    for rank in range(world) if ranks is None else ranks:
        logs[rank] = open(os.path.join(out_dir, f"{scenario}-rank{rank}.log"), "w+")
        procs[rank] = subprocess.Popen(
            [sys.executable, WORKER, scenario, str(out_dir), json.dumps(arguments)],
            env=rank_env(world, port, rank), stdout=logs[rank], stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while any(procs[rank].poll() is None for rank in wait_for or procs):
            if time.monotonic() > deadline:
                pytest.fail(f"{scenario} on {world} ranks ran past {timeout} s")
            if kill_on_failure and any(p.poll() not in (None, 0) for p in procs.values()):
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
    1: [
        dict(tokens=[9], hidden=8, ffn=6, experts=5, k=2, seed=9),  # the exchange with itself
    ],
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


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """run(world) -> the output folder of one start of `world` ranks that ran the expert
    parallel cases and then the training cases (starting processes is the slow part)."""
    done = {}

    def run(world):
        if world not in done:
            out = tmp_path_factory.mktemp(f"world{world}")
            arguments = dict(expert_parallel=EXPERT_CASES[world], cases=TRAIN_CASES)
            assert_all_succeeded(launch("suite", world, out, arguments, timeout=120))
            done[world] = out
        return done[world]

    return run


@pytest.mark.parametrize("world", [1, 2, 4])
def test_expert_parallel_matches_single_process(world, suite):
    out = suite(world)
    ranks = [torch.load(out / f"expert_parallel_rank{r}.pt") for r in range(world)]
    for got in ranks:  # E = 2 G + 1 experts cannot be shared out evenly over G > 1 ranks
        expected = f"num_experts={2 * world + 1} must be divisible by the process group size"
        assert world == 1 or f"{expected} {world}" in got["indivisible_error"]
    ranks = [got["cases"] for got in ranks]
    for number, case in enumerate(EXPERT_CASES[world]):
        x, router, w_in, w_out, grad = [t.requires_grad_() for t in expert_layer_inputs(case)]
        y, _aux = smoe_ops.moe_ffn(x, router, w_in, w_out, case["k"])
        (y * grad).sum().backward()
        if "one_expert" in case:  # every row to one expert: the other ranks receive none
            counts = smoe_ops.route(x.detach() @ router.detach(), case["k"]).counts
            assert counts[case["one_expert"]] == x.shape[0]
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


def test_expert_parallel_on_one_rank_is_the_layer_and_checks_shapes():
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


# -- data parallel training ------------------------------------------------------------

TRAIN_CASES = [
    # Validation, early stop after epoch 2 (restoring epoch 1), a last global batch of 40.
    dict(pairs=410, seed=0, validate=True, personalize=True,
         train=dict(epochs=4, batch_size=48, patience=1, lr=0.1)),
    # MLP experts, reward-mixture, Switch balance; the last global batch has 3 pairs, so
    # on 4 ranks one rank has none.
    dict(pairs=410, seed=1, expert_hidden=4,
         train=dict(epochs=2, batch_size=65, objective="reward_mixture",
                    regularizers=dict(balance_kind="switch", balance=0.5))),
    # The user-level mixture: whole users per rank, EM start on every rank.
    dict(users=12, pairs_per_user=10, seed=2,
         train=dict(epochs=2, batch_size=30, objective="user_mixture")),
]

# Float32 training: the ranks sum the same terms in another order, and a few AdamW steps
# carry those last-bit differences into the weights.
TRAINED_TOLERANCE = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def single_process_runs():
    """(model state, history) of every training case in this process, no process group."""
    from tests.distributed_worker import train_options

    runs = []
    for spec in TRAIN_CASES:
        model, data, val = training_problem(spec)
        history = train(model, data, val, progress=False, **train_options(spec))
        runs.append((model, history))
    return runs


def assert_same_training(out_dir, number, model, history, **tolerance):
    state = torch.load(out_dir / f"model_{number}.pt")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(state[name], value, msg=f"case {number}: {name}",
                                   **(tolerance or TRAINED_TOLERANCE))
    with open(out_dir / f"history_{number}.json") as file:
        got = json.load(file)
    assert [h["epoch"] for h in got] == [h["epoch"] for h in history]
    for mine, theirs in zip(got, history):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
        assert mine["train_accuracy"] == pytest.approx(theirs["train_accuracy"], abs=0.01)
        assert mine["val_accuracy"] == theirs["val_accuracy"]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_data_parallel_training_matches_one_process(world, suite, single_process_runs):
    assert len(single_process_runs[0][1]) == 3  # case 0 did stop early
    out = suite(world)
    for number, (model, history) in enumerate(single_process_runs):
        assert_same_training(out, number, model, history)
    # Users shared out over the ranks, profiles gathered: those of one process.
    model = single_process_runs[0][0]
    from tests.distributed_worker import personalize_data

    expected = personalize(model, personalize_data(), "map")
    got = torch.load(out / "profiles_0.pt")
    assert sorted(got) == sorted(expected)
    for user, profile in expected.items():
        torch.testing.assert_close(got[user], profile.logits, rtol=1e-4, atol=1e-5)


def test_cli_train_under_torchrun(tmp_path):
    from smoe_ops import cli
    from smoe_ops.reward import load

    argv = ["train", "--synthetic", "prompt_regions", "--pairs", "300", "--types", "3",
            "--experts", "4", "--epochs", "2", "--batch-size", "64", "--quiet"]
    assert cli.main(argv + ["--out", str(tmp_path / "one")]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "smoe_ops.cli"] + argv + [
               "--out", str(tmp_path / "two"), "--checkpoint-every", "2"]
    done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("| pairs |") == 1  # rank 0 alone prints its table
    summary = json.loads((tmp_path / "two" / "train.json").read_text())
    assert summary["processes"] == 2
    one, two = load(tmp_path / "one" / "model.safetensors"), load(
        tmp_path / "two" / "model.safetensors")
    for name, value in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], value, msg=name,
                                   **TRAINED_TOLERANCE)
    state = torch.load(tmp_path / "two" / "train_state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (2, 0)


# -- faults ----------------------------------------------------------------------------

FAULT_CASE = dict(pairs=410, seed=3, train=dict(epochs=4, batch_size=48))  # 7 steps / epoch
CHECKPOINT_EVERY, DIE_AT_STEP = 5, 13


def test_killed_rank_resumes_to_the_uninterrupted_model(tmp_path):
    checkpointed = dict(FAULT_CASE, train=dict(FAULT_CASE["train"], checkpoint="state.pt",
                                               checkpoint_every=CHECKPOINT_EVERY))
    # Rank 1 is SIGKILLed at its 13th optimizer step; rank 0 must fail on its own, with
    # the step and the way back, not hang.
    killed = launch("train", 2, tmp_path, dict(cases=[dict(checkpointed,
                                                           die_at_step=DIE_AT_STEP)]),
                    kill_on_failure=False)
    assert killed[1][0] == -9, killed[1][1][-2000:]
    assert killed[0][0] == 1 and "a peer died or stopped answering" in killed[0][1], \
        killed[0][1][-3000:]
    assert "restart with resume=True to continue from" in killed[0][1]
    assert not (tmp_path / "model_0.pt").exists()
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    # Checkpoints came at steps 5, 7 (end of epoch 0) and 10: three steps were lost, fewer
    # than one interval. No temporary file is left beside it.
    assert state["global_step"] == 10 and (state["epoch"], state["step"]) == (1, 3)
    assert DIE_AT_STEP - state["global_step"] <= CHECKPOINT_EVERY
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []

    # The same command again, resuming, then an uninterrupted run in the same processes.
    resumed = dict(checkpointed, train=dict(checkpointed["train"], resume=True))
    assert_all_succeeded(launch("train", 2, tmp_path, dict(cases=[resumed, FAULT_CASE])))
    after_resume = torch.load(tmp_path / "model_0.pt")
    uninterrupted = torch.load(tmp_path / "model_1.pt")
    # Same ranks, same batches, same reduction order: the resumed model is bit-identical.
    for name, value in uninterrupted.items():
        assert torch.equal(after_resume[name], value), name
    with open(tmp_path / "history_0.json") as a, open(tmp_path / "history_1.json") as b:
        first, second = json.load(a), json.load(b)
    for mine, theirs in zip(first, second, strict=True):
        assert mine["loss"] == theirs["loss"] and mine["epoch"] == theirs["epoch"]


def test_rank_that_never_arrives_fails_with_a_timeout(tmp_path):
    started = time.monotonic()
    results = launch("never_arrives", 2, tmp_path, dict(timeout=2), timeout=60, ranks=[0])
    code, log = results[0]
    assert code != 0
    assert "TimeoutError" in log and "waited 2 s for the other ranks" in log, log[-3000:]
    assert time.monotonic() - started < 45


def test_stuck_rank_fails_the_job_with_a_timeout(tmp_path):
    # Rank 1 stops answering at its 3rd step; rank 0 gives up after the 3 s group timeout.
    case = dict(pairs=100, seed=5, hang_at_step=3, train=dict(epochs=1, batch_size=16))
    results = launch("train", 2, tmp_path, dict(cases=[case], timeout=3), timeout=60,
                     kill_on_failure=False, wait_for=[0])
    code, log = results[0]
    assert code == 1 and "a peer died or stopped answering" in log, log[-3000:]
    assert "Timed out" in log or "timed out" in log


def small_training():
    return training_problem(dict(pairs=120, seed=4))


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    model, data, _ = small_training()
    train(model, data, epochs=1, batch_size=32, progress=False, checkpoint=str(path))
    before = path.read_bytes()

    def dies_midway(payload, file):
        file.write(b"partial")
        raise KeyboardInterrupt  # interrupted halfway through writing

    monkeypatch.setattr(torch, "save", dies_midway)
    model, data, _ = small_training()
    with pytest.raises(KeyboardInterrupt):
        train(model, data, epochs=1, batch_size=32, progress=False, checkpoint=str(path))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_resume_in_one_process_and_bad_resumes(tmp_path):
    path = str(tmp_path / "state.pt")
    model, data, _ = small_training()
    whole = train(model, data, epochs=3, batch_size=32, progress=False)
    first, data, _ = small_training()
    train(first, data, epochs=1, batch_size=32, progress=False, checkpoint=path,
          checkpoint_every=2)
    resumed, data, _ = small_training()
    history = train(resumed, data, epochs=3, batch_size=32, progress=False, checkpoint=path,
                    resume=True)
    assert [h["loss"] for h in history] == [h["loss"] for h in whole]
    for name, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name

    fresh, data, _ = small_training()  # resume=True without a checkpoint file: from scratch
    train(fresh, data, epochs=1, batch_size=32, progress=False,
          checkpoint=str(tmp_path / "none.pt"), resume=True)
    with pytest.raises(FileNotFoundError, match="resume='missing.pt'"):
        train(fresh, data, epochs=1, progress=False, resume="missing.pt")
    with pytest.raises(ValueError, match="batch_size=32, this run has batch_size=16"):
        train(fresh, data, epochs=1, batch_size=16, progress=False, resume=path)
    with pytest.raises(ValueError, match="checkpoint_every needs a checkpoint path"):
        train(fresh, data, epochs=1, progress=False, checkpoint_every=3)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable training checkpoint"):
        train(fresh, data, epochs=1, progress=False, resume=str(tmp_path / "junk.pt"))
