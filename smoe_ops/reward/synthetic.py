"""Seeded preference data with known ground truth, for benchmarks and tests.

`prompt_regions`: contexts fall in C clusters; cluster c labels every pair by Bradley-Terry
with its own true reward vector u_c: P(a preferred to b) = sigmoid(u_c . (a - b) / temperature),
then flips a fraction `label_noise` of the labels. With `conflict`, some clusters want the
exact opposite of another (u_{2j+1} = -u_{2j}), which a single reward head cannot fit.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smoe_ops.reward.data import PreferenceData

__all__ = ["PromptRegions", "prompt_regions"]


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
        true_margin = (data.chosen - data.rejected).double() @ self.true_rewards.double().T
        true_margin = true_margin.gather(1, clusters[:, None]).squeeze(1) / self.temperature
        agree = torch.sigmoid(true_margin.abs())
        agree = (1.0 - self.label_noise) * agree + self.label_noise * (1.0 - agree)
        return agree.mean().item() if len(data) else float("nan")


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
    if temperature <= 0 or not 0.0 <= label_noise <= 0.5:
        raise ValueError(
            f"prompt_regions: need temperature > 0 and 0 <= label_noise <= 0.5, got "
            f"temperature={temperature}, label_noise={label_noise}"
        )
    generator = torch.Generator().manual_seed(seed)
    true_rewards = _true_rewards(num_clusters, response_dim, conflict, generator)
    centres = torch.randn(num_clusters, context_dim, generator=generator)
    clusters = torch.randint(num_clusters, (num_pairs,), generator=generator)
    context = centres[clusters] + torch.randn(num_pairs, context_dim, generator=generator)
    first = torch.randn(num_pairs, response_dim, generator=generator)
    second = torch.randn(num_pairs, response_dim, generator=generator)

    margin = ((first - second) * true_rewards[clusters]).sum(1) / temperature
    first_wins = torch.rand(num_pairs, generator=generator) < torch.sigmoid(margin)
    flipped = torch.rand(num_pairs, generator=generator) < label_noise
    first_wins = first_wins ^ flipped
    chosen = torch.where(first_wins[:, None], first, second)
    rejected = torch.where(first_wins[:, None], second, first)
    data = PreferenceData(context, chosen, rejected, categories=clusters)
    return PromptRegions(data, true_rewards, centres, temperature, label_noise)
