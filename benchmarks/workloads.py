"""Routing workloads shared by the benchmarks: logits whose top-k is uniform, mildly skewed or
extremely skewed (every token on the same k experts)."""

import torch

SKEWS = ("uniform", "mild", "extreme")


def make_logits(num_tokens: int, num_experts: int, k: int, skew: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    if skew == "mild":
        # Expert e is favoured by 1.5 * (1 - e / E): the busiest expert gets a few times the
        # load of the idlest, as in a partly balanced model.
        logits += 1.5 * torch.linspace(1, 0, num_experts)
    elif skew == "extreme":
        logits[:, :k] += 100.0
    elif skew != "uniform":
        raise ValueError(f"skew must be one of {SKEWS}, got {skew!r}")
    return logits
