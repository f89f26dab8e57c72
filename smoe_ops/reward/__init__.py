"""The sparse MoE reward model: learn several preference experts from binary pairs.

    from smoe_ops.reward import PreferenceData, SparseMoERewardModel
    model = SparseMoERewardModel(context_dim, response_dim, num_experts=8, k=2)
    model.reward(context, response)   # [B] population reward

See DESIGN.md section 3. This package builds on the smoe_ops ops, never the reverse.
"""

from smoe_ops.reward import synthetic
from smoe_ops.reward.data import PreferenceData
from smoe_ops.reward.losses import (
    Regularizers,
    diversity_loss,
    mixture_bt_loss,
    pair_accuracy,
    preference_probability,
    reward_mixture_bt_loss,
)
from smoe_ops.reward.model import SparseMoERewardModel, dense, single_head

__all__ = [
    "PreferenceData", "Regularizers", "SparseMoERewardModel", "dense", "diversity_loss",
    "mixture_bt_loss", "pair_accuracy", "preference_probability",
    "reward_mixture_bt_loss", "single_head", "synthetic",
]  # fmt: skip
