"""The `smoe-ops` command line: train a sparse MoE reward model and report its routing.

    smoe-ops demo --out runs/demo          # train, report, personalize, cost: ~20 s
    smoe-ops train --synthetic prompt_regions --out runs/regions
    smoe-ops train --data pairs.jsonl --encoder minilm --out runs/text
    torchrun --nproc-per-node 4 -m smoe_ops.cli train --synthetic prompt_regions --out runs/dp
    smoe-ops report --model runs/regions/model.safetensors --data runs/regions/val.safetensors
    smoe-ops info

Only this module prints; the library logs through `logging.getLogger("smoe_ops")`.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

from smoe_ops._io import write_atomically

__all__ = ["main"]

SYNTHETIC = ("prompt_regions", "user_types")
DATA_SUFFIXES = (".npz", ".safetensors", ".jsonl")


def _write_json(path: str, value) -> None:
    """Write `value` as JSON atomically, so an interrupted run never leaves a half-written
    file behind."""
    write_atomically(path, json.dumps(value, indent=2, default=float) + "\n")


def _synthetic(kind: str, args):
    """(data, info) generated with known ground truth; info describes the truth."""
    from smoe_ops.reward import synthetic

    if kind == "prompt_regions":
        made = synthetic.prompt_regions(args.pairs, num_clusters=args.types, seed=args.seed)
    else:
        users = max(1, args.pairs // args.pairs_per_user)
        made = synthetic.user_types(users, args.pairs_per_user, num_types=args.types,
                                    seed=args.seed)
    return made.data, {"oracle_accuracy": made.oracle_accuracy(), "kind": kind}


def load_data(path: str, encoder: str = "minilm", cache_dir: Optional[str] = None,
              progress: bool = True):
    """(PreferenceData, info) from a feature file (.npz, .safetensors) or JSONL text pairs
    (encoded with `encoder`, embeddings cached in `cache_dir`)."""
    from smoe_ops.reward import PreferenceData

    if not os.path.exists(path):
        raise SystemExit(f"smoe-ops: data file {path} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        return PreferenceData.load_npz(path), {}
    if suffix == ".safetensors":
        return PreferenceData.load_safetensors(path), {}
    if suffix == ".jsonl":
        from smoe_ops.reward import text

        chosen_encoder = text.MiniLMEncoder() if encoder == "minilm" else text.HashingEncoder()
        data, info = text.load_jsonl(path, encoder=chosen_encoder, cache_dir=cache_dir,
                                     progress=progress)
        return data, {"encoder": chosen_encoder.name, **_plain(info)}
    raise SystemExit(f"smoe-ops: data file {path} has suffix {suffix!r}; expected one of "
                     f"{DATA_SUFFIXES}")


def _plain(info) -> dict:
    """A JSON-friendly view of a loader's info (dataclass or dict)."""
    if dataclasses.is_dataclass(info):
        info = dataclasses.asdict(info)
    return {key: value for key, value in dict(info).items()
            if isinstance(value, (str, int, float, list, dict, type(None)))}


def _model(args, data):
    from smoe_ops.reward import SparseMoERewardModel

    num_users = None
    if args.objective == "user_mixture":
        if len(data) == 0 or bool((data.user_ids < 0).any()):
            raise SystemExit("smoe-ops train: --objective user_mixture needs a user id on "
                             "every pair")
        num_users = int(data.user_ids.max()) + 1
    return SparseMoERewardModel(
        data.context_dim, data.response_dim, num_experts=args.experts, k=args.k,
        router_hidden=args.router_hidden, prior_scale=args.prior_scale, score=args.score,
        seed=args.seed, num_users=num_users, **_hidden(args))


def _hidden(args) -> dict:
    return {} if args.expert_hidden is None else {"expert_hidden": args.expert_hidden}


def _table(rows: Sequence[Sequence[str]]) -> str:
    """A markdown table; rows[0] is the header."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def cmd_train(args) -> int:
    import datetime

    import torch.distributed as dist

    from smoe_ops.reward.distributed import init_from_env

    # Under torchrun every rank runs this command; rank 0 alone prints and writes files.
    # gloo: the reward model trains on the CPU. TODO: NCCL once train moves to a device.
    distributed = init_from_env(backend="gloo",
                                timeout=datetime.timedelta(seconds=args.dist_timeout))
    is_main = not distributed or dist.get_rank() == 0
    try:
        return _train_and_write(args, is_main, dist.get_world_size() if distributed else 1)
    finally:
        if distributed:
            dist.destroy_process_group()


def _train_and_write(args, is_main: bool, world_size: int) -> int:
    from smoe_ops.reward import Regularizers, evaluate, save, train

    os.makedirs(args.out, exist_ok=True)
    if args.synthetic:
        data, info = _synthetic(args.synthetic, args)
    else:
        data, info = load_data(args.data, args.encoder, args.cache_dir,
                               not args.quiet and is_main)
    train_data, val_data = data.split(1.0 - args.val_fraction, seed=args.seed)
    if len(val_data) == 0:
        val_data = None
    model = _model(args, data)
    regularizers = Regularizers(sparsity=args.sparsity, balance=args.balance,
                                balance_kind=args.balance_kind, diversity=args.diversity)
    started = time.perf_counter()
    history = train(model, train_data, val_data, epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                    objective=args.objective, regularizers=regularizers, seed=args.seed,
                    patience=args.patience, progress=not args.quiet,
                    checkpoint=os.path.join(args.out, "train_state.pt"),
                    checkpoint_every=args.checkpoint_every, resume=args.resume)
    seconds = time.perf_counter() - started
    if not is_main:
        return 0

    model_path = os.path.join(args.out, "model.safetensors")
    save(model, model_path)
    summary = dict(
        model=model_path, config=model.config, data=info, pairs=len(data),
        train_pairs=len(train_data), seconds=seconds, epochs=len(history),
        train_accuracy=evaluate(model, train_data, args.objective),
        val_accuracy=None if val_data is None else evaluate(model, val_data, args.objective),
        regularizers=dataclasses.asdict(regularizers), objective=args.objective,
        processes=world_size, history=history)
    if val_data is not None:
        val_path = os.path.join(args.out, "val.safetensors")
        val_data.save_safetensors(val_path)
        summary["val_data"] = val_path
    _write_json(os.path.join(args.out, "train.json"), summary)

    rows = [("pairs", "epochs", "train acc", "val acc", "seconds"),
            (str(len(train_data)), str(len(history)), f"{summary['train_accuracy']:.2%}",
             "-" if val_data is None else f"{summary['val_accuracy']:.2%}", f"{seconds:.1f}")]
    print(_table(rows))
    if "oracle_accuracy" in info:
        print(f"oracle (Bayes) accuracy of the generated data: {info['oracle_accuracy']:.2%}")
    print(f"wrote {model_path} and {os.path.join(args.out, 'train.json')}")
    return 0


def _write_text(path: str, text: str) -> None:
    write_atomically(path, text)


def cmd_report(args) -> int:
    from smoe_ops.reward import load, routing_report

    if not os.path.exists(args.model):
        raise SystemExit(f"smoe-ops report: model file {args.model} does not exist")
    model = load(args.model)
    data, _info = load_data(args.data, args.encoder, args.cache_dir, not args.quiet)
    report = routing_report(model, data, top=args.top)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, allow_nan=False))
    else:
        print(report.to_markdown(), end="")
    if args.out is None:
        return 0
    os.makedirs(args.out, exist_ok=True)
    _write_json(os.path.join(args.out, "report.json"), report.to_dict())
    _write_text(os.path.join(args.out, "report.md"), report.to_markdown())
    written = [os.path.join(args.out, name) for name in ("report.json", "report.md")]
    try:
        from smoe_ops.reward.plots import save_report_plots

        written += [str(path) for path in save_report_plots(report, args.out)]
    except ImportError as error:  # matplotlib is an optional extra
        print(f"no plots: {error}", file=sys.stderr)
    print("wrote " + ", ".join(written), file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_demo(args) -> int:
    from smoe_ops.reward.demo import run_demo

    result = run_demo(args.out, seed=args.seed, pairs=args.pairs,
                      train_users=args.train_users, held_out_users=args.held_out_users,
                      resamples=args.resamples, cost_batch=args.cost_batch,
                      cost_users=args.cost_users,
                      skip_cost=args.skip_cost)
    for name, table in result.tables.items():
        print(f"\n## {name}\n\n{table}", end="")
    print(f"\n{len(result.files)} files in {args.out} ({result.summary['seconds']:.0f} s); "
          f"start with {os.path.join(args.out, 'demo.md')}")
    return 0


def cmd_info(_args) -> int:
    import smoe_ops

    print(json.dumps(smoe_ops.build_info(), indent=2, default=str))
    return 0


def _add_train(commands) -> None:
    parser = commands.add_parser("train", help="train a sparse MoE reward model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help=f"pairs: a feature file or JSONL ({DATA_SUFFIXES})")
    source.add_argument("--synthetic", choices=SYNTHETIC, help="generated data")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--pairs", type=int, default=20000, help="synthetic: pairs")
    parser.add_argument("--types", type=int, default=4,
                        help="synthetic: clusters (prompt_regions) or user types")
    parser.add_argument("--pairs-per-user", type=int, default=20, help="user_types only")
    parser.add_argument("--encoder", choices=("minilm", "hashing"), default="minilm",
                        help="JSONL: text encoder")
    parser.add_argument("--cache-dir", help="JSONL: embedding cache folder")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--expert-hidden", type=int, help="MLP experts of this width")
    parser.add_argument("--router-hidden", type=int, help="MLP router of this width")
    parser.add_argument("--prior-scale", type=float, default=0.0)
    parser.add_argument("--score", choices=("softmax", "sigmoid"), default="softmax")
    parser.add_argument("--objective", default="mixture",
                        choices=("mixture", "reward_mixture", "user_mixture"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--sparsity", type=float, default=0.01)
    parser.add_argument("--balance", type=float, default=0.1)
    parser.add_argument("--balance-kind", choices=("kl", "switch"), default="kl")
    parser.add_argument("--diversity", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int,
                        help="also write OUT/train_state.pt every this many optimizer steps "
                             "(it is always written at the end of every epoch)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/train_state.pt if it exists")
    parser.add_argument("--dist-timeout", type=float, default=600.0,
                        help="under torchrun: seconds a rank waits for the others before "
                             "the job fails")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=cmd_train)


def _add_report(commands) -> None:
    parser = commands.add_parser("report", help="routing report of a trained model")
    parser.add_argument("--model", required=True, help="a checkpoint written by train")
    parser.add_argument("--data", required=True,
                        help=f"pairs to route: a feature file or JSONL ({DATA_SUFFIXES})")
    parser.add_argument("--out", help="folder for report.md, report.json and the PNGs")
    parser.add_argument("--json", action="store_true", help="print JSON, not markdown")
    parser.add_argument("--top", type=int, default=5, help="pairs per expert card list")
    parser.add_argument("--encoder", choices=("minilm", "hashing"), default="minilm",
                        help="JSONL: text encoder (the one the model was trained with)")
    parser.add_argument("--cache-dir", help="JSONL: embedding cache folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=cmd_report)


def _add_demo(commands) -> None:
    parser = commands.add_parser(
        "demo", help="train, report the routing, personalize new users, measure the cost")
    parser.add_argument("--out", default="smoe-demo", help="output folder (default: "
                        "smoe-demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=20000, help="prompt-region pairs")
    parser.add_argument("--train-users", type=int, default=300)
    parser.add_argument("--held-out-users", type=int, default=100)
    parser.add_argument("--resamples", type=int, default=20,
                        help="adaptation sets per point of the few-shot curve")
    parser.add_argument("--cost-batch", type=int, default=4096,
                        help="pairs per scoring call in the cost table")
    parser.add_argument("--cost-users", type=int, default=10_000,
                        help="users personalized at once in the cost table")
    parser.add_argument("--skip-cost", action="store_true", help="no inference-cost table")
    parser.set_defaults(run=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoe-ops", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_demo(commands)
    _add_train(commands)
    _add_report(commands)
    commands.add_parser("info", help="version and compiled backends").set_defaults(
        run=cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "val_fraction", 0.0) is not None and not (
            0.0 <= getattr(args, "val_fraction", 0.0) < 1.0):
        raise SystemExit(f"smoe-ops: --val-fraction must be in [0, 1), got {args.val_fraction}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
