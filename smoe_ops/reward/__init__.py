"""The sparse MoE reward model: learn several preference experts from binary pairs.

    from smoe_ops.reward import PreferenceData, SparseMoERewardModel, train
    model = SparseMoERewardModel(context_dim, response_dim, num_experts=8, k=2)
    history = train(model, data, val_data)
    model.reward(context, response)   # [B] population reward
    report = routing_report(model, data)   # load, entropy, specialization, diversity

See DESIGN.md section 3. This package builds on the smoe_ops ops, never the reverse.
"""

from smoe_ops.reward import synthetic, text
from smoe_ops.reward.data import PreferenceData
from smoe_ops.reward.losses import (
    Regularizers,
    diversity_loss,
    mixture_bt_loss,
    pair_accuracy,
    preference_probability,
    reward_mixture_bt_loss,
    user_mixture_bt_loss,
)
from smoe_ops.reward.export import ScalarRewardModel, TextRewardFunction, reward_function
from smoe_ops.reward.model import SparseMoERewardModel, dense, single_head
# The module is `personalization`, so that `smoe_ops.reward.personalize` is the function
# DESIGN.md names and never shadows a module of the same name.
from smoe_ops.reward.personalization import UserProfile, personalize, shift_report, update
from smoe_ops.reward.report import ExpertCard, RoutingReport, expert_cards, routing_report
from smoe_ops.reward.text import HashingEncoder, JsonlInfo, MiniLMEncoder, load_jsonl
from smoe_ops.reward.train import evaluate, fit_router_prior, load, save, train

__all__ = [
    "ExpertCard", "HashingEncoder", "JsonlInfo", "MiniLMEncoder", "PreferenceData",
    "Regularizers", "RoutingReport", "ScalarRewardModel", "SparseMoERewardModel",
    "TextRewardFunction", "UserProfile", "dense", "diversity_loss", "evaluate",
    "expert_cards", "fit_router_prior", "load", "load_jsonl", "mixture_bt_loss",
    "pair_accuracy", "personalize", "preference_probability", "reward_function",
    "reward_mixture_bt_loss", "routing_report", "save", "shift_report", "single_head",
    "synthetic", "text", "train", "update", "user_mixture_bt_loss",
]  # fmt: skip
