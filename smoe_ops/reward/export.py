"""The reward model as a scalar reward, in the shapes RLHF loops take.

Trainers of policies want one float per (prompt, response), for the population or for one
user, and most accept either a single-output `nn.Module` or a plain function:

    scorer = ScalarRewardModel(model, profile)        # nn.Module: [B, Dc], [B, Dr] -> [B]
    fn = reward_function(model, profile)              # callable: same tensors -> [B]
    text_fn = TextRewardFunction(model, encoder)      # (prompts, completions) -> [floats]
    text_fn(prompts, completions, user_id=[...])      # per-row users, given profiles

`TextRewardFunction` follows the reward-function convention of common trainers (TRL's
GRPO among them): positional `prompts` and `completions`, extra dataset columns as keyword
lists (ignored unless named by `user_key`), a list of floats back. Conversational inputs
(lists of {"role", "content"} messages) are flattened to their contents. Texts go through
the same encoder as training (`smoe_ops.reward.text`), so the model must have been
trained on that encoder's features: context = encoder(prompt), response =
encoder(response).

Every wrapper runs the frozen model under `torch.no_grad()`: a reward is a number to the
trainer, never a graph to differentiate through.
"""

import logging
from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from smoe_ops.reward.model import SparseMoERewardModel
from smoe_ops.reward.personalization import UserProfile
from smoe_ops.reward.text import TextEncoder, default_encoder, encode_texts

__all__ = ["ScalarRewardModel", "TextRewardFunction", "reward_function"]

logger = logging.getLogger("smoe_ops")


def _check_profile(caller: str, model: SparseMoERewardModel,
                   profile: Optional[UserProfile]) -> None:
    if profile is None:
        return
    if not isinstance(profile, UserProfile):
        raise TypeError(f"{caller}: profile must be a UserProfile or None, got "
                        f"{type(profile).__name__}")
    if profile.num_experts != model.num_experts:
        raise ValueError(f"{caller}: profile has {profile.num_experts} expert logits, the "
                         f"model has {model.num_experts} experts")


class ScalarRewardModel(nn.Module):
    """A single-output reward model: forward(context [B, Dc], response [B, Dr]) -> [B]
    float32, the population reward or, with `profile`, that user's.

    The wrapped model is shared, not copied, and put in eval mode; its parameters are
    not trained through this module (forward runs without autograd).
    """

    def __init__(self, model: SparseMoERewardModel, profile: Optional[UserProfile] = None):
        super().__init__()
        _check_profile("ScalarRewardModel", model, profile)
        self.model = model.eval()
        self.profile = profile

    @torch.no_grad()
    def forward(self, context: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
        for name, value, dim in (("context", context, self.model.config["context_dim"]),
                                 ("response", response, self.model.config["response_dim"])):
            if value.dim() != 2 or value.shape[1] != dim:
                raise ValueError(f"ScalarRewardModel: {name} must be [B, {dim}], got "
                                 f"{list(value.shape)}")
        return self.model.reward(context.float(), response.float(), profile=self.profile)


def reward_function(model: SparseMoERewardModel, profile: Optional[UserProfile] = None
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A plain function (context [B, Dc], response [B, Dr]) -> [B] float32 rewards."""
    return ScalarRewardModel(model, profile).forward


def _text(caller: str, name: str, index: int, value) -> str:
    """A prompt or completion as one string: plain text, or the contents of a list of
    chat messages joined by newlines."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and all(
            isinstance(message, Mapping) and isinstance(message.get("content"), str)
            for message in value):
        return "\n".join(message["content"] for message in value)
    raise TypeError(f"{caller}: {name}[{index}] must be a string or a list of "
                    f"{{'role', 'content'}} messages, got {type(value).__name__}")


class TextRewardFunction:
    """Reward function over texts: `fn(prompts, completions, **columns) -> list[float]`.

    Args:
        model: a reward model trained on `encoder`'s features of prompts (context) and
            responses.
        encoder: the text encoder (None: the default MiniLM encoder).
        profile: score every row for this user (a `UserProfile`).
        profiles: {user id: UserProfile}; with `user_key`, each row is scored for the user
            named in the `user_key` column (rows whose user has no profile get the
            population reward, logged once per call).
        user_key: the keyword column holding each row's user id (default "user_id").
        cache_dir: embedding cache folder (see `smoe_ops.reward.text`).
        batch_size: texts per encoder call.
    """

    def __init__(self, model: SparseMoERewardModel, encoder: Optional[TextEncoder] = None, *,
                 profile: Optional[UserProfile] = None,
                 profiles: Optional[Dict[Union[int, str], UserProfile]] = None,
                 user_key: str = "user_id", cache_dir=None, batch_size: int = 256):
        if profile is not None and profiles is not None:
            raise ValueError("TextRewardFunction: give profile (one user) or profiles (per "
                             "row), not both")
        _check_profile("TextRewardFunction", model, profile)
        for user, each in (profiles or {}).items():
            _check_profile(f"TextRewardFunction: profiles[{user!r}]", model, each)
        self.model = model.eval()
        self.encoder = default_encoder() if encoder is None else encoder
        for name in ("context_dim", "response_dim"):
            if model.config[name] != self.encoder.dim:
                raise ValueError(
                    f"TextRewardFunction: the model's {name} is {model.config[name]} but "
                    f"the encoder {self.encoder.name!r} gives {self.encoder.dim}-d features")
        self.profile, self.profiles, self.user_key = profile, profiles, user_key
        self.cache_dir, self.batch_size = cache_dir, batch_size
        # Trainers identify reward functions by this name in their logs.
        self.__name__ = "smoe_ops_reward"

    @torch.no_grad()
    def __call__(self, prompts: Sequence, completions: Sequence, **columns) -> list:
        if len(prompts) != len(completions):
            raise ValueError(f"TextRewardFunction: got {len(prompts)} prompts and "
                             f"{len(completions)} completions; expected one per prompt")
        if not len(prompts):
            return []
        prompt_texts = [_text("TextRewardFunction", "prompts", i, p)
                        for i, p in enumerate(prompts)]
        completion_texts = [_text("TextRewardFunction", "completions", i, c)
                            for i, c in enumerate(completions)]
        features = encode_texts(prompt_texts + completion_texts, self.encoder,
                                cache_dir=self.cache_dir, batch_size=self.batch_size,
                                progress=False)
        context, response = features[:len(prompts)], features[len(prompts):]
        if self.profiles is None:
            return self.model.reward(context, response, profile=self.profile).tolist()
        return self._per_user(context, response, columns)

    def _per_user(self, context: torch.Tensor, response: torch.Tensor, columns) -> list:
        users = columns.get(self.user_key)
        if users is None or len(users) != len(context):
            raise ValueError(
                f"TextRewardFunction: with profiles, every call needs the column "
                f"{self.user_key!r} with one user id per row; got "
                f"{'none' if users is None else f'{len(users)} ids for {len(context)} rows'}")
        rewards = self.model.reward(context, response).clone()  # population first
        missing = set()
        for user in dict.fromkeys(users):
            profile = self.profiles.get(user)
            if profile is None:
                missing.add(user)
                continue
            rows = torch.tensor([i for i, u in enumerate(users) if u == user])
            rewards[rows] = self.model.reward(context[rows], response[rows], profile=profile)
        if missing:
            logger.warning("TextRewardFunction: no profile for %d user(s), e.g. %r; scored "
                           "with the population reward", len(missing), next(iter(missing)))
        return rewards.tolist()
