"""One rank of the multi-process tests in tests/test_distributed.py (not collected by pytest).

    python tests/distributed_worker.py SCENARIO OUT_DIR 'JSON ARGUMENTS'

with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set as torchrun sets them. Each
scenario writes its results under OUT_DIR for the test to compare with one process.
"""

import datetime
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

import smoe_ops
from smoe_ops.reward import Regularizers, SparseMoERewardModel, train
from smoe_ops.reward.distributed import init_from_env
from smoe_ops.reward import personalize
from smoe_ops.reward.synthetic import prompt_regions, user_types


def expert_layer_inputs(case: dict):
    """The full inputs and weights of one expert-parallel case, equal on every rank."""
    g = torch.Generator().manual_seed(case["seed"])
    hidden, ffn, experts = case["hidden"], case["ffn"], case["experts"]
    x = torch.randn(sum(case["tokens"]), hidden, generator=g, dtype=torch.float64)
    router = torch.randn(hidden, experts, generator=g, dtype=torch.float64)
    if case.get("one_expert") is not None:
        # A constant feature with a large router weight: every token picks this expert.
        x[:, 0] = 1.0
        router[0, case["one_expert"]] += 1e3
    w_in = torch.randn(experts, hidden, 2 * ffn, generator=g, dtype=torch.float64) / hidden**0.5
    w_out = torch.randn(experts, ffn, hidden, generator=g, dtype=torch.float64) / ffn**0.5
    grad = torch.randn(x.shape[0], hidden, generator=g, dtype=torch.float64)
    return x, router, w_in, w_out, grad


def run_expert_parallel(out_dir: str, cases: list) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        smoe_ops.nn.SparseMoE(8, 4, 2 * world + 1, 1, process_group=dist.group.WORLD)
        error = None
    except ValueError as raised:
        error = str(raised)
    results = []
    for case in cases:
        x, router, w_in, w_out, grad = expert_layer_inputs(case)
        starts = [sum(case["tokens"][:r]) for r in range(world + 1)]
        mine = slice(starts[rank], starts[rank + 1])
        layer = smoe_ops.nn.SparseMoE(case["hidden"], case["ffn"], case["experts"], case["k"],
                                      dtype=torch.float64, process_group=dist.group.WORLD)
        experts = slice(layer.expert_range.start, layer.expert_range.stop)
        with torch.no_grad():
            layer.router_weight.copy_(router)
            layer.w_in.copy_(w_in[experts])
            layer.w_out.copy_(w_out[experts])
        tokens = x[mine].clone().requires_grad_()
        y, _aux = layer(tokens)
        (y * grad[mine]).sum().backward()
        router_grad = layer.router_weight.grad.clone()
        dist.all_reduce(router_grad)  # the replicated router: its gradient is the sum
        results.append(dict(y=y.detach(), x_grad=tokens.grad, router_grad=router_grad,
                            w_in_grad=layer.w_in.grad, w_out_grad=layer.w_out.grad,
                            experts=[experts.start, experts.stop]))
    torch.save(dict(cases=results, indivisible_error=error),
               os.path.join(out_dir, f"expert_parallel_rank{rank}.pt"))


def training_problem(spec: dict):
    """(model, train data, val data) of a training case, equal on every rank."""
    if spec.get("users"):
        made = user_types(spec["users"], spec["pairs_per_user"], num_types=3, context_dim=6,
                          response_dim=5, seed=spec["seed"])
        model = SparseMoERewardModel(6, 5, 3, 1, num_users=spec["users"], seed=spec["seed"])
        return model, made.data, None
    made = prompt_regions(spec["pairs"], num_clusters=3, context_dim=6, response_dim=5,
                          seed=spec["seed"])
    data, val = made.data.split(0.8, seed=spec["seed"])
    model = SparseMoERewardModel(6, 5, 4, 2, seed=spec["seed"],
                                 expert_hidden=spec.get("expert_hidden"))
    return model, data, (val if spec.get("validate") else None)


def run_train(out_dir: str, arguments: dict) -> None:
    """Train every case of arguments["cases"] in turn; rank 0 saves model_{i}.pt,
    history_{i}.json and (with "personalize") profiles_{i}.pt."""
    init_from_env(timeout=datetime.timedelta(seconds=arguments.get("timeout", 30)))
    for number, spec in enumerate(arguments["cases"]):
        model, data, val = training_problem(spec)
        for fault in ("die", "hang"):
            at = spec.get(f"{fault}_at_step")
            if at is not None and dist.get_rank() == spec.get("fault_rank", 1):
                _fault_at_step(fault, at)
        options = train_options(spec)
        if options.get("checkpoint"):
            options["checkpoint"] = os.path.join(out_dir, options["checkpoint"])
        history = train(model, data, val, progress=False, **options)
        if dist.get_rank() == 0:
            torch.save({name: t.clone() for name, t in model.state_dict().items()},
                       os.path.join(out_dir, f"model_{number}.pt"))
            with open(os.path.join(out_dir, f"history_{number}.json"), "w") as file:
                json.dump(history, file)
        if spec.get("personalize"):
            profiles = personalize(model, personalize_data(), "map",
                                   process_group=dist.group.WORLD)
            if dist.get_rank() == 0:
                torch.save({user: p.logits for user, p in profiles.items()},
                           os.path.join(out_dir, f"profiles_{number}.pt"))


def train_options(spec: dict) -> dict:
    """The keyword arguments of `train` in a case (its regularizers given as a dict)."""
    options = dict(spec["train"])
    if "regularizers" in options:
        options["regularizers"] = Regularizers(**options["regularizers"])
    return options


def personalize_data():
    """Nine users' pairs, for sharding users across the ranks."""
    return user_types(9, 6, num_types=3, context_dim=6, response_dim=5, seed=1).data


def _fault_at_step(fault: str, step: int) -> None:
    """At this rank's `step`-th optimizer step, "die": SIGKILL itself, as a crashed node
    dies (no exception, no cleanup, the peers left waiting in a collective); "hang": stop
    answering, as a stuck node does."""
    original, taken = torch.optim.AdamW.step, [0]

    def step_then_fault(self, *args, **kwargs):
        taken[0] += 1
        if taken[0] == step and fault == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if taken[0] == step:
            time.sleep(3600)
        return original(self, *args, **kwargs)

    torch.optim.AdamW.step = step_then_fault


def run_never_arrives(out_dir: str, spec: dict) -> None:
    """Only rank 0 of WORLD_SIZE starts: joining must fail with TimeoutError."""
    init_from_env(timeout=datetime.timedelta(seconds=spec["timeout"]))


def main() -> None:
    scenario, out_dir, arguments = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    if scenario == "train":
        run_train(out_dir, arguments)
    elif scenario == "suite":  # one start of the ranks for both, as process starts dominate
        init_from_env(timeout=datetime.timedelta(seconds=30))
        run_expert_parallel(out_dir, arguments["expert_parallel"])
        run_train(out_dir, arguments)
    elif scenario == "never_arrives":
        run_never_arrives(out_dir, arguments)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
