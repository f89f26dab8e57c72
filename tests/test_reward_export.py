"""The reward model as a scalar reward (smoe_ops.reward.export): the module, the plain
function and the text reward function each give model.reward's numbers, for the
population and per user; bad input is refused by name."""

import logging

import pytest
import torch

from smoe_ops.reward import SparseMoERewardModel
from smoe_ops.reward.export import ScalarRewardModel, TextRewardFunction, reward_function
from smoe_ops.reward.personalization import UserProfile
from smoe_ops.reward.text import HashingEncoder, encode_texts

DIM = 32


def model_and_profile(num_experts=6, k=2):
    model = SparseMoERewardModel(DIM, DIM, num_experts=num_experts, k=k, seed=3)
    with torch.no_grad():
        model.expert_bias.normal_()
    # A shift large enough to change which experts are routed.
    profile = UserProfile(torch.linspace(-4.0, 4.0, num_experts))
    return model, profile


def features(rows, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, DIM, generator=gen), torch.randn(rows, DIM, generator=gen)


@pytest.mark.parametrize("personalized", [False, True])
def test_scalar_module_and_function_give_the_models_reward(personalized):
    model, profile = model_and_profile()
    profile = profile if personalized else None
    context, response = features(9)
    expected = model.reward(context, response, profile=profile)
    scorer = ScalarRewardModel(model, profile)
    got = scorer(context, response)
    assert got.shape == (9,) and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, expected.detach())
    torch.testing.assert_close(reward_function(model, profile)(context, response),
                               expected.detach())


def test_the_profile_changes_the_reward():
    model, profile = model_and_profile()
    context, response = features(64)
    population = ScalarRewardModel(model)(context, response)
    personal = ScalarRewardModel(model, profile)(context, response)
    assert not torch.allclose(population, personal)


def test_scalar_module_refuses_bad_shapes_and_profiles():
    model, _ = model_and_profile()
    context, response = features(3)
    with pytest.raises(ValueError, match=r"context must be \[B, 32\], got \[3, 5\]"):
        ScalarRewardModel(model)(context[:, :5], response)
    with pytest.raises(ValueError, match="profile has 4 expert logits, the model has 6"):
        ScalarRewardModel(model, UserProfile(torch.zeros(4)))
    with pytest.raises(TypeError, match="profile must be a UserProfile"):
        ScalarRewardModel(model, torch.zeros(6))


def texts():
    prompts = ["How do I boil an egg?", "Explain recursion.", "Name a prime number.",
               "How do I boil an egg?"]
    completions = ["Boil it for nine minutes.", "A function that calls itself.", "Seven.",
                   "Put the egg in boiling water, wait nine minutes, then cool it."]
    return prompts, completions


def test_text_reward_matches_the_model_on_encoded_texts():
    model, profile = model_and_profile()
    encoder = HashingEncoder(DIM)
    prompts, completions = texts()
    fn = TextRewardFunction(model, encoder, profile=profile)
    got = fn(prompts, completions, unrelated_column=[1, 2, 3, 4])
    assert isinstance(got, list) and all(isinstance(value, float) for value in got)
    context = encode_texts(prompts, encoder, progress=False)
    response = encode_texts(completions, encoder, progress=False)
    expected = model.reward(context, response, profile=profile)
    torch.testing.assert_close(torch.tensor(got), expected.detach())
    assert fn([], []) == []


def test_text_reward_flattens_chat_messages():
    model, _ = model_and_profile()
    fn = TextRewardFunction(model, HashingEncoder(DIM))
    chat = [[{"role": "user", "content": "Explain recursion."}]]
    answer = [[{"role": "assistant", "content": "A function that calls itself."}]]
    assert fn(chat, answer) == fn(["Explain recursion."], ["A function that calls itself."])


def test_text_reward_scores_each_row_for_its_user(caplog):
    model, profile = model_and_profile()
    encoder = HashingEncoder(DIM)
    prompts, completions = texts()
    fn = TextRewardFunction(model, encoder, profiles={"ann": profile})
    with caplog.at_level(logging.WARNING, logger="smoe_ops"):
        got = fn(prompts, completions, user_id=["ann", "bob", "ann", "bob"])
    personal = TextRewardFunction(model, encoder, profile=profile)(prompts, completions)
    population = TextRewardFunction(model, encoder)(prompts, completions)
    torch.testing.assert_close(torch.tensor(got),
                               torch.tensor([personal[0], population[1], personal[2],
                                             population[3]]))
    assert "no profile for 1 user(s)" in caplog.text


def test_text_reward_refuses_bad_input():
    model, profile = model_and_profile()
    encoder = HashingEncoder(DIM)
    fn = TextRewardFunction(model, encoder, profiles={"ann": profile})
    with pytest.raises(ValueError, match="got 2 prompts and 1 completions"):
        fn(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="needs the column 'user_id'"):
        fn(["a"], ["b"])
    with pytest.raises(TypeError, match=r"completions\[0\] must be a string"):
        TextRewardFunction(model, encoder)(["a"], [3])
    with pytest.raises(ValueError, match="encoder .* gives 8-d features"):
        TextRewardFunction(model, HashingEncoder(8))
    with pytest.raises(ValueError, match="not both"):
        TextRewardFunction(model, encoder, profile=profile, profiles={"ann": profile})
