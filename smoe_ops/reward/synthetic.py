"""Seeded preference data with known ground truth, for benchmarks and tests.

`user_types`: every pair comes from a user, and a user's reward vector is one of T true
type vectors (or a sparse mixture of a few); all users see the same prompts, so only the
user id tells the types apart.

`prompt_regions`: contexts fall in C clusters; cluster c labels every pair by Bradley-Terry
with its own true reward vector u_c: P(a preferred to b) = sigmoid(u_c . (a - b) / temperature),
then flips a fraction `label_noise` of the labels. With `conflict`, some clusters want the
exact opposite of another (u_{2j+1} = -u_{2j}), which a single reward head cannot fit.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from smoe_ops.reward.data import PreferenceData

__all__ = ["PromptRegions", "UserTypes", "prompt_regions", "user_types"]


def _bayes_accuracy(data, reward_rows, temperature, label_noise) -> float:
    """Mean over pairs of P(label agrees with the true preference) given each pair's true
    reward vector ([P, Dr] reward_rows)."""
    if len(data) == 0:
        return float("nan")
    true_margin = ((data.chosen - data.rejected).double() * reward_rows.double()).sum(1)
    agree = torch.sigmoid(true_margin.abs() / temperature)
    agree = (1.0 - label_noise) * agree + label_noise * (1.0 - agree)
    return agree.mean().item()


def _label(first, second, reward_rows, temperature, label_noise, generator):
    """(chosen, rejected): Bradley-Terry labels with the [P, Dr] true reward of each pair,
    a fraction label_noise of them flipped."""
    margin = ((first - second) * reward_rows).sum(1) / temperature
    first_wins = torch.rand(len(first), generator=generator) < torch.sigmoid(margin)
    flipped = torch.rand(len(first), generator=generator) < label_noise
    first_wins = first_wins ^ flipped
    chosen = torch.where(first_wins[:, None], first, second)
    rejected = torch.where(first_wins[:, None], second, first)
    return chosen, rejected


def _check_label_arguments(caller, temperature, label_noise):
    if temperature <= 0 or not 0.0 <= label_noise <= 0.5:
        raise ValueError(
            f"{caller}: need temperature > 0 and 0 <= label_noise <= 0.5, got "
            f"temperature={temperature}, label_noise={label_noise}"
        )


@dataclass
class PromptRegions:
    """What `prompt_regions` generated: the data and the truth behind it.

    data: PreferenceData, categories = the true cluster of each pair.
    true_rewards: [C, Dr] float32, unit-norm true reward vector of each cluster.
    centres: [C, Dc] float32 cluster centres of the contexts.
    """

    data: PreferenceData
    true_rewards: torch.Tensor
    centres: torch.Tensor
    temperature: float
    label_noise: float

    def oracle_accuracy(self, data: PreferenceData = None) -> float:
        """Bayes accuracy on `data` (default: self.data): the mean over pairs of the
        probability that the label agrees with the true reward's preference, computed from
        the generating probabilities (exact in expectation over labels, not sampled).
        Needs data.categories to hold the true cluster of every pair."""
        data = self.data if data is None else data
        clusters = data.categories
        if (clusters < 0).any() or (clusters >= self.true_rewards.shape[0]).any():
            raise ValueError(
                "oracle_accuracy: data.categories must hold the true cluster of every pair, "
                f"in [0, {self.true_rewards.shape[0]}), got values outside it"
            )
        return _bayes_accuracy(data, self.true_rewards[clusters], self.temperature,
                               self.label_noise)


def _true_rewards(num_clusters, response_dim, conflict, generator) -> torch.Tensor:
    rewards = torch.randn(num_clusters, response_dim, generator=generator, dtype=torch.float64)
    if conflict:
        # One opposed pair per four clusters (at least one): the rest stay independent, so
        # a single head can still learn something and the gap to the MoE is measurable.
        for pair in range(max(1, num_clusters // 4)):
            if 2 * pair + 1 < num_clusters:
                rewards[2 * pair + 1] = -rewards[2 * pair]
    return F.normalize(rewards, dim=1).float()


def prompt_regions(
    num_pairs: int,
    num_clusters: int = 4,
    context_dim: int = 64,
    response_dim: int = 64,
    conflict: bool = True,
    temperature: float = 0.5,
    label_noise: float = 0.0,
    seed: int = 0,
) -> PromptRegions:
    """Pairs whose preference depends on which of `num_clusters` regions the prompt is in.

    Contexts: centre_c + N(0, I) with centres ~ N(0, I) in context_dim dimensions (well
    separated: a linear router can find the region). Responses: N(0, I) in response_dim.
    Labels: Bradley-Terry with the cluster's unit-norm reward vector and `temperature`
    (lower: more deterministic labels), then each label flipped with probability
    `label_noise`; chosen and rejected are swapped to match the label.
    """
    if num_clusters < 1 or num_pairs < 0:
        raise ValueError(
            f"prompt_regions: need num_clusters >= 1 and num_pairs >= 0, got "
            f"num_clusters={num_clusters}, num_pairs={num_pairs}"
        )
    _check_label_arguments("prompt_regions", temperature, label_noise)
    generator = torch.Generator().manual_seed(seed)
    true_rewards = _true_rewards(num_clusters, response_dim, conflict, generator)
    centres = torch.randn(num_clusters, context_dim, generator=generator)
    clusters = torch.randint(num_clusters, (num_pairs,), generator=generator)
    context = centres[clusters] + torch.randn(num_pairs, context_dim, generator=generator)
    first = torch.randn(num_pairs, response_dim, generator=generator)
    second = torch.randn(num_pairs, response_dim, generator=generator)
    chosen, rejected = _label(first, second, true_rewards[clusters], temperature,
                              label_noise, generator)
    data = PreferenceData(context, chosen, rejected, categories=clusters)
    return PromptRegions(data, true_rewards, centres, temperature, label_noise)


@dataclass
class UserTypes:
    """What `user_types` generated: the data and the truth behind it.

    data: PreferenceData, user_ids = the user of each pair, categories = that user's
        dominant type.
    true_rewards: [T, Dr] float32, unit-norm reward vector of each type.
    user_mixtures: [U, T] float32, each user's weights over the types (rows sum to 1).
    user_rewards: [U, Dr] float32, each user's reward vector, user_mixtures @ true_rewards.
    user_types: [U] int64, each user's dominant type.
    """

    data: PreferenceData
    true_rewards: torch.Tensor
    user_mixtures: torch.Tensor
    user_rewards: torch.Tensor
    user_types: torch.Tensor
    temperature: float
    label_noise: float

    def oracle_accuracy(self, data: PreferenceData = None) -> float:
        """Bayes accuracy on `data` (default: self.data) knowing each pair's user, as
        `PromptRegions.oracle_accuracy`. Needs data.user_ids to hold valid users."""
        data = self.data if data is None else data
        users = data.user_ids
        if (users < 0).any() or (users >= self.user_rewards.shape[0]).any():
            raise ValueError(
                "oracle_accuracy: data.user_ids must hold the user of every pair, in "
                f"[0, {self.user_rewards.shape[0]}), got values outside it"
            )
        return _bayes_accuracy(data, self.user_rewards[users], self.temperature,
                               self.label_noise)


def user_types(
    num_users: int,
    pairs_per_user: int,
    num_types: int = 4,
    context_dim: int = 64,
    response_dim: int = 64,
    types_per_user: int = 1,
    conflict: bool = True,
    temperature: float = 0.5,
    label_noise: float = 0.0,
    seed: int = 0,
    type_probs: Optional[Sequence[float]] = None,
) -> UserTypes:
    """Users of `num_types` latent types, all labelling pairs on the same prompts.

    Each user draws `types_per_user` distinct types (uniformly, or with probabilities
    proportional to `type_probs`, [num_types] non-negative: imbalanced types) and
    Dirichlet(1) weights over them (1: a pure type); its reward vector is that mixture of
    the unit-norm type vectors (with `conflict`, type 1 = -type 0, as in
    `prompt_regions`). Contexts are N(0, I) for every user, responses N(0, I); labels are
    Bradley-Terry with the user's reward vector and `temperature`, then flipped with
    probability `label_noise`. Pairs are grouped by user: user u owns rows
    u * pairs_per_user to (u + 1) * pairs_per_user.
    """
    if num_types < 1 or num_users < 0 or pairs_per_user < 0:
        raise ValueError(
            f"user_types: need num_types >= 1, num_users >= 0, pairs_per_user >= 0, got "
            f"{num_types}, {num_users}, {pairs_per_user}"
        )
    if not 1 <= types_per_user <= num_types:
        raise ValueError(
            f"user_types: types_per_user must be in [1, num_types={num_types}], got "
            f"{types_per_user}"
        )
    _check_label_arguments("user_types", temperature, label_noise)
    if type_probs is not None:
        type_probs = torch.as_tensor(type_probs, dtype=torch.float64)
        if (type_probs.shape != (num_types,) or not bool((type_probs >= 0).all())
                or int((type_probs > 0).sum()) < types_per_user):
            raise ValueError(
                f"user_types: type_probs must be [num_types={num_types}] non-negative "
                f"with at least types_per_user={types_per_user} positive, got "
                f"{type_probs.tolist()}")
    generator = torch.Generator().manual_seed(seed)
    true_rewards = _true_rewards(num_types, response_dim, conflict, generator)
    mixtures = torch.zeros(num_users, num_types)
    for user in range(num_users):
        if type_probs is None:
            chosen_types = torch.randperm(num_types, generator=generator)[:types_per_user]
        else:
            chosen_types = torch.multinomial(type_probs, types_per_user, replacement=False,
                                             generator=generator)
        weights = -torch.rand(types_per_user, generator=generator).clamp_min(1e-12).log()
        mixtures[user, chosen_types] = weights / weights.sum()  # Dirichlet(1, ..., 1)
    user_rewards = mixtures @ true_rewards
    dominant = mixtures.argmax(1) if num_users else torch.zeros(0, dtype=torch.int64)

    users = torch.arange(num_users).repeat_interleave(pairs_per_user)
    num_pairs = len(users)
    context = torch.randn(num_pairs, context_dim, generator=generator)
    first = torch.randn(num_pairs, response_dim, generator=generator)
    second = torch.randn(num_pairs, response_dim, generator=generator)
    chosen, rejected = _label(first, second, user_rewards[users], temperature, label_noise,
                              generator)
    data = PreferenceData(context, chosen, rejected, user_ids=users,
                          categories=dominant[users])
    return UserTypes(data, true_rewards, mixtures, user_rewards, dominant, temperature,
                     label_noise)
