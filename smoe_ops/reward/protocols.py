"""Evaluation protocols for personalization: the few-shot curve.

(Named `protocols`, not `evaluate`: `smoe_ops.reward.evaluate` is the accuracy function.)

Few-shot curve on held-out users (every pair carries its user id). In each of `resamples`
rounds, every user's pairs are shuffled (seeded); the first `eval_pairs` of them (default:
half, rounded up) are that user's test pairs, the rest its adaptation pool. For n labels,
the users whose pool holds at least n pairs adapt on the first n of it and are scored on
their test pairs; users with a smaller pool sit that n out (the curve records how many
users each point has), so every method at one n is scored on the same pairs. An accuracy
counts a probability of exactly 1/2 as half right, so a predictor that knows nothing
scores 50%, not 0.

Methods (each a row of the curve):
- "population": the model with no profile (the n = 0 point of every personalized row).
- "map", "hedge", "softmax": `personalize` on the n pairs.
- "logistic": a per-user logistic regression on chosen minus rejected features, trained
  from scratch on the n pairs (L2 precision `logistic_l2`, Newton steps).
- any fixed baselines given by name (e.g. the single-head BT model): the same at every n.
"""

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import torch
from tqdm.auto import tqdm

from smoe_ops.reward.data import PreferenceData
from smoe_ops.reward.personalization import (
    personalize_batch,
    personalized_probability,
)

__all__ = ["DEFAULT_SHOTS", "FewShotCurve", "adapt_and_score", "few_shot_curve",
           "group_accuracy", "logistic_probability"]

logger = logging.getLogger("smoe_ops")

DEFAULT_SHOTS = (0, 1, 2, 4, 8, 16, 32)


@dataclass
class FewShotCurve:
    """Accuracy against the number of labels n.

    shots: the n of each column. accuracy[method]: [len(shots), resamples] float64 (NaN
        where no user had a large enough pool). users[i]: users scored at shots[i] (in the
        first round). oracle: the per-user oracle's accuracy on the same test pairs at
        each n (averaged over rounds), if an oracle was given.
    """

    shots: list
    accuracy: Dict[str, torch.Tensor]
    users: list
    oracle: Optional[list] = None
    extra: dict = field(default_factory=dict)

    def mean(self, method: str) -> list:
        return self.accuracy[method].nanmean(1).tolist()

    def std(self, method: str) -> list:
        values = self.accuracy[method]
        return [float(row[~row.isnan()].std()) if (~row.isnan()).sum() > 1 else 0.0
                for row in values]

    def gap_closed(self, method: str, shots: int) -> float:
        """(acc_n - acc_population) / (acc_oracle - acc_population) at n = shots."""
        if self.oracle is None:
            raise ValueError("gap_closed: the curve was made without an oracle")
        column = self.shots.index(shots)
        population = self.mean("population")[column]
        gap = self.oracle[column] - population
        return (self.mean(method)[column] - population) / gap if gap > 0 else math.nan

    def labels_to_reach(self, method: str, fraction: float = 0.9) -> Optional[int]:
        """The smallest n whose mean accuracy reaches `fraction` of the oracle's accuracy
        (None if no n does, or without an oracle)."""
        if self.oracle is None:
            return None
        for column, n in enumerate(self.shots):
            if self.mean(method)[column] >= fraction * self.oracle[column]:
                return n
        return None

    def to_markdown(self) -> str:
        """A table: one row per method, one column per n, mean +- std in percent."""
        header = "| method | " + " | ".join(f"n={n}" for n in self.shots) + " |"
        lines = [header, "|---|" + "---|" * len(self.shots)]
        for method in self.accuracy:
            cells = [("-" if math.isnan(m) else f"{100 * m:.1f} ± {100 * s:.1f}")
                     for m, s in zip(self.mean(method), self.std(method))]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        if self.oracle is not None:
            cells = ["-" if math.isnan(v) else f"{100 * v:.1f}" for v in self.oracle]
            lines.append("| per-user oracle | " + " | ".join(cells) + " |")
        lines.append("| users scored | " + " | ".join(str(u) for u in self.users) + " |")
        return "\n".join(lines) + "\n"


def _tie_accuracy(probability: torch.Tensor) -> float:
    """Mean of 1 for p > 1/2, 1/2 for p = 1/2, 0 below."""
    if len(probability) == 0:
        return math.nan
    return float(((probability > 0.5).double() + 0.5 * (probability == 0.5).double()).mean())


def _padded_by_user(values: torch.Tensor, user_ids: torch.Tensor):
    """(users [U] sorted, [U, n_max, D] values padded with 0, [U, n_max] bool mask)."""
    users, rows, counts = torch.unique(user_ids, return_inverse=True, return_counts=True)
    order = torch.argsort(rows, stable=True)
    slot = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[rows[order]]
    width = int(counts.max()) if len(counts) else 0
    padded = values.new_zeros(len(users), width, values.shape[1])
    mask = torch.zeros(len(users), width, dtype=torch.bool)
    padded[rows[order], slot] = values[order]
    mask[rows[order], slot] = True
    return users, padded, mask


@torch.no_grad()
def logistic_probability(train: PreferenceData, test: PreferenceData, l2: float = 1.0,
                         steps: int = 15) -> torch.Tensor:
    """[P_test] probability of each test pair under a logistic regression fitted from
    scratch to its own user's train pairs (on d = chosen - rejected, no intercept: the
    label is only ever "chosen"), all users in one batch of Newton steps on their padded
    [U, n, D] pairs. Users with no train pairs get 1/2."""
    users, diff, mask = _padded_by_user((train.chosen - train.rejected).double(),
                                        train.user_ids)
    num_users, dim = len(users), diff.shape[2]
    weights = torch.zeros(num_users, dim, dtype=torch.float64)
    eye = torch.eye(dim, dtype=torch.float64)
    for _ in range(steps):
        prob = torch.sigmoid(torch.einsum("und,ud->un", diff, weights))
        residual = torch.where(mask, 1 - prob, torch.zeros_like(prob))
        gradient = torch.einsum("und,un->ud", diff, residual) - l2 * weights
        curvature = torch.where(mask, prob * (1 - prob), torch.zeros_like(prob))
        hessian = diff.transpose(1, 2) @ (curvature[:, :, None] * diff) + l2 * eye
        # The Hessian is positive definite (l2 > 0): Cholesky, about 3x faster than LU.
        factor, _ = torch.linalg.cholesky_ex(hessian)
        weights = weights + torch.cholesky_solve(gradient[:, :, None], factor).squeeze(2)
    position = torch.searchsorted(users, test.user_ids).clamp_max(max(num_users - 1, 0))
    known = (users[position] == test.user_ids) if num_users else torch.zeros(
        len(test), dtype=torch.bool)
    test_diff = (test.chosen - test.rejected).double()
    logit = ((test_diff * weights[position]).sum(1) if num_users
             else torch.zeros(len(test), dtype=torch.float64))
    return torch.where(known, torch.sigmoid(logit), torch.full_like(logit, 0.5))


def _split(data: PreferenceData, eval_pairs: Optional[int], generator):
    """(rank of every pair within its user after a seeded shuffle [P], test size of its
    user [P])."""
    keys = torch.rand(len(data), generator=generator, dtype=torch.float64)
    order = torch.argsort(data.user_ids.double() * 2.0 + keys)  # by user, then random
    users, rows, counts = torch.unique(data.user_ids, return_inverse=True,
                                       return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(len(data), dtype=torch.int64)
    rank[order] = torch.arange(len(data)) - starts[rows[order]]
    if eval_pairs is None:
        test_size = (counts + 1) // 2
    else:
        test_size = torch.minimum(counts, torch.full_like(counts, eval_pairs))
    return rank, test_size[rows], (counts - test_size)[rows]


def few_shot_curve(model, data: PreferenceData, shots: Sequence[int] = DEFAULT_SHOTS,
                   resamples: int = 20, methods: Sequence[str] = ("map", "hedge", "softmax"),
                   baselines: Optional[Dict[str, Callable]] = None, logistic: bool = True,
                   oracle: Optional[Callable[[PreferenceData], float]] = None,
                   eval_pairs: Optional[int] = None, seed: int = 0, progress: bool = True,
                   logistic_l2: float = 1.0, **personalize_options) -> FewShotCurve:
    """The few-shot curve of `model` on the held-out users of `data` (see the module
    docstring).

    Args:
        model: the trained population model (frozen).
        data: held-out users' pairs; every pair needs its user id.
        shots: the n values; resamples: rounds (>= 1).
        methods: personalization methods to run.
        baselines: {name: probability(test_data) -> [P] tensor}, fixed models.
        logistic: include the per-user logistic regression from scratch.
        oracle: accuracy(test_data) -> float of the per-user oracle (synthetic data).
        eval_pairs: test pairs per user (None: half of each user's pairs, rounded up).
        personalize_options: passed to `personalize_batch` (prior_strength, eta, ...).
    """
    if len(data) == 0 or bool((data.user_ids < 0).any()):
        raise ValueError("few_shot_curve: data needs pairs, each with its user id (>= 0)")
    if resamples < 1 or any(n < 0 for n in shots):
        raise ValueError(f"few_shot_curve: need resamples >= 1 and shots >= 0, got "
                         f"{resamples} and {list(shots)}")
    shots = sorted(set(int(n) for n in shots))
    rows = ["population", *methods] + (["logistic"] if logistic else [])
    rows += list(baselines or {})
    accuracy = {name: torch.full((len(shots), resamples), math.nan, dtype=torch.float64)
                for name in rows}
    oracle_values = torch.full((len(shots), resamples), math.nan, dtype=torch.float64)
    users_scored = [0] * len(shots)
    generator = torch.Generator().manual_seed(seed)
    for round_ in tqdm(range(resamples), desc="few-shot", disable=not progress,
                       unit="round"):
        rank, test_size, pool_size = _split(data, eval_pairs, generator)
        for column, n in enumerate(shots):
            eligible = pool_size >= n
            test = data[eligible & (rank < test_size)]
            adapt = data[eligible & (rank >= test_size) & (rank < test_size + n)]
            if len(test) == 0:
                continue
            if round_ == 0:
                users_scored[column] = len(torch.unique(test.user_ids))
            population = personalized_probability(model, test)
            accuracy["population"][column, round_] = _tie_accuracy(population)
            for method in methods:
                if n == 0:
                    value = accuracy["population"][column, round_]
                else:
                    profiles = personalize_batch(model, adapt, method, **personalize_options)
                    value = _tie_accuracy(personalized_probability(model, test, profiles))
                accuracy[method][column, round_] = value
            if logistic:
                accuracy["logistic"][column, round_] = _tie_accuracy(
                    logistic_probability(adapt, test, logistic_l2))
            for name, probability in (baselines or {}).items():
                accuracy[name][column, round_] = _tie_accuracy(probability(test))
            if oracle is not None:
                oracle_values[column, round_] = oracle(test)
    oracle_mean = None if oracle is None else oracle_values.nanmean(1).tolist()
    return FewShotCurve(shots, accuracy, users_scored, oracle_mean)


def group_accuracy(probability: torch.Tensor, groups: torch.Tensor) -> Dict[int, float]:
    """{group: accuracy of its pairs} (a probability of 1/2 counts half), for [P]
    probabilities and [P] integer groups (e.g. the true user type of each pair); the
    worst group is min(result.values())."""
    if probability.shape != groups.shape:
        raise ValueError(f"group_accuracy: probability {list(probability.shape)} and groups "
                         f"{list(groups.shape)} must have the same shape [P]")
    return {int(group): _tie_accuracy(probability[groups == group])
            for group in torch.unique(groups).tolist()}


@torch.no_grad()
def adapt_and_score(model, data: PreferenceData, shots: int, method: str = "map",
                    eval_pairs: Optional[int] = None, seed: int = 0,
                    **personalize_options):
    """One round of the few-shot protocol at n = shots: each user with a pool of at least
    `shots` pairs adapts on `shots` of them ("population": not at all) and is scored on
    its test pairs. Returns (test pairs, [P_test] probability that chosen wins), so that
    callers can slice the accuracy (e.g. `group_accuracy` by true type)."""
    if len(data) == 0 or bool((data.user_ids < 0).any()):
        raise ValueError("adapt_and_score: data needs pairs, each with its user id (>= 0)")
    rank, test_size, pool_size = _split(data, eval_pairs, torch.Generator().manual_seed(seed))
    eligible = pool_size >= shots
    test = data[eligible & (rank < test_size)]
    adapt = data[eligible & (rank >= test_size) & (rank < test_size + shots)]
    if method == "population" or shots == 0:
        return test, personalized_probability(model, test)
    profiles = personalize_batch(model, adapt, method, **personalize_options)
    return test, personalized_probability(model, test, profiles)
