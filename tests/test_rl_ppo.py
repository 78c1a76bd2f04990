"""ppo: KL-penalised per-token rewards, GAE and the clipped losses by formula, and learning on the tiny model
(the reward rises and the value head trains)."""

from __future__ import annotations

import pytest
import torch
from helpers import LogitRows, prompt_examples, run_config, train_online_rl, write_jsonl

from tunesmith.config import ModelConfig
from tunesmith.errors import ConfigError
from tunesmith.methods import METHODS
from tunesmith.models import load_model, load_tokenizer
from tunesmith.objectives import OBJECTIVES
from tunesmith.objectives.rl import (
    PPOSettings,
    add_value_head,
    collate_prompts,
    generalised_advantages,
    kl_penalised_rewards,
    ppo_loss,
    ppo_token_losses,
    register_reward,
    rollout,
    whiten,
)
from tunesmith.training.reference import ReferenceModel


@register_reward("test_ppo_digits")
def digit_fraction(prompts, completions, answers) -> list[float]:
    """Fraction of the completion's characters that are digits: learnable by a random tiny model."""
    return [sum(char.isdigit() for char in text) / max(len(text), 1) for text in completions]


def test_kl_penalised_rewards_put_the_score_on_the_last_token():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -9.0]])
    reference = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second completion stopped after 2 tokens
    rewards, kl = kl_penalised_rewards(torch.tensor([2.0, -1.0]), logps, reference, mask, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 2.0], [-0.1, -1.0, 0.0]]))


def test_gae_equals_the_discounted_sum_of_td_errors():
    """A_t = sum_l (gamma lam)^l delta_{t+l} (Schulman et al. 2016, eq. 16), written as the double sum."""
    torch.manual_seed(0)
    rewards, values = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    gamma, lam = 0.9, 0.7
    advantages, returns = generalised_advantages(rewards, values, mask, gamma, lam)
    for row in range(2):
        length = int(mask[row].sum())
        value = [float(values[row, t]) if t < length else 0.0 for t in range(6)]
        deltas = [float(rewards[row, t]) + gamma * value[t + 1] - value[t] for t in range(length)]
        for t in range(5):
            expected = sum((gamma * lam) ** k * deltas[t + k] for k in range(length - t)) if t < length else 0.0
            assert advantages[row, t].item() == pytest.approx(expected, abs=1e-5)
            assert returns[row, t].item() == pytest.approx(expected + value[t] if t < length else 0.0, abs=1e-5)
    # by hand: one completion of 3 tokens, gamma 1, lam 0.5
    advantages, returns = generalised_advantages(
        torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.1]]), torch.ones(1, 3), 1.0, 0.5
    )
    torch.testing.assert_close(advantages, torch.tensor([[-0.125, 0.35, 0.9]]))
    torch.testing.assert_close(returns, torch.tensor([[0.375, 0.55, 1.0]]))


def test_whiten_uses_only_the_completion_tokens():
    values = torch.tensor([[1.0, 3.0, 100.0]])
    whitened = whiten(values, torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(whitened, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4, rtol=0)


def test_clipped_policy_and_value_losses_by_hand():
    settings = PPOSettings(epsilon=0.2, value_epsilon=0.5)
    logps = torch.tensor([[0.0, 0.0]])
    old_logps = torch.tensor([[-0.5, 0.5]])  # ratios e^0.5 = 1.65 (clipped to 1.2 for A > 0) and e^-0.5 = 0.61
    advantages = torch.tensor([[1.0, -1.0]])
    values, old_values, returns = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.1]]), torch.tensor([[1.0, 0.0]])
    policy, value = ppo_token_losses(logps, old_logps, advantages, values, old_values, returns, settings)
    ratio = torch.exp(logps - old_logps)
    # A > 0: min(1.65, 1.2) = 1.2 ; A < 0: min(-0.61, -0.8) = -0.8 (the pessimistic bound)
    torch.testing.assert_close(policy, -torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages))
    assert policy[0, 0].item() == pytest.approx(-1.2) and policy[0, 1].item() == pytest.approx(0.8)
    # token 0: V moved 2.0 from 0.0, clipped to 0.5: max((2-1)^2, (0.5-1)^2) / 2 ; token 1: inside the clip
    torch.testing.assert_close(value, torch.tensor([[0.5, 0.0]]))


def prompt_batch(tokenizer, count: int = 4) -> dict:
    examples = prompt_examples(tokenizer, [f"Count to {index}" for index in range(count)], task="ppo")
    return collate_prompts(examples, tokenizer.pad_token_id)


def test_ppo_raises_the_reward_and_trains_the_value_head(tiny_llama_dir):
    """PPO steps with a learnable reward raise the sampled reward; the value head's parameters change."""
    model_config = ModelConfig(name=str(tiny_llama_dir))
    tokenizer = load_tokenizer(model_config)
    batch = prompt_batch(tokenizer)
    settings = PPOSettings(rewards=["test_ppo_digits"], group_size=4, max_new_tokens=8, beta=0.0)
    torch.manual_seed(0)
    model = load_model(model_config, "ppo").train()
    OBJECTIVES.get("ppo").prepare_model(model, settings)  # as the loop does, before the optimiser is built
    value_head_before = {name: parameter.detach().clone() for name, parameter in model.value_head.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    rewards = []
    for _ in range(12):
        output = ppo_loss(model, rollout(model, None, batch, settings), settings)
        (output.loss_sum / output.num_loss_tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
        rewards.append(output.metrics["reward"].item() / output.num_loss_tokens)
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    for name, parameter in model.value_head.named_parameters():
        assert not torch.equal(parameter, value_head_before[name]), name


def test_ppo_with_a_lora_reference_logs_kl_and_value_loss(tiny_llama_dir):
    """With LoRA the reference is the base (adapters off): KL starts at 0 and grows once the adapters move."""
    model_config = ModelConfig(name=str(tiny_llama_dir))
    tokenizer = load_tokenizer(model_config)
    batch = prompt_batch(tokenizer, count=2)
    settings = PPOSettings(rewards=["test_ppo_digits"], group_size=2, max_new_tokens=6, beta=0.1)
    torch.manual_seed(0)
    lora = METHODS.get("lora")
    model = lora.apply(load_model(model_config, "ppo"), lora.settings(r=4, dropout=0.0), "ppo").train()
    add_value_head(model, settings)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert {"value_head.weight", "value_head.bias"} <= trainable
    reference = ReferenceModel(model)  # peft: the policy with its adapters disabled, as the loop builds it
    first = ppo_loss(model, rollout(model, reference, batch, settings), settings)
    assert first.metrics["kl"].abs().item() < 1e-5
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    moved = ppo_loss(model, rollout(model, reference, batch, settings), settings)
    assert moved.metrics["kl"].abs().item() > 1e-3
    moved.loss_sum.backward()
    assert model.value_head.weight.grad is not None and model.value_head.weight.grad.abs().sum() > 0


def test_ppo_refuses_a_prompt_learning_method(tiny_llama_dir):
    model_config = ModelConfig(name=str(tiny_llama_dir))
    prompt = METHODS.get("prompt")
    model = prompt.apply(load_model(model_config, "ppo"), prompt.settings(), "ppo")
    with pytest.raises(ConfigError, match="task ppo"):
        add_value_head(model, PPOSettings())


def test_ppo_trains_through_the_loop(tiny_llama_dir, tmp_path):
    result = train_online_rl(tiny_llama_dir, tmp_path, "ppo", ["test_ppo_digits", "gsm8k_correctness"])
    assert result.exit_code == 0 and (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert {"eval_loss", "reward", "reward_test_ppo_digits"} <= set(result.summary["eval"])


def test_mismatched_reward_weights_are_a_config_error(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"question": "q", "answer": "#### 1"}])
    with pytest.raises(ConfigError, match=r"objective.reward_weights: 2 weights for 1 rewards"):
        run_config(tiny_llama_dir, data, tmp_path / "run", task="ppo",
                   objective={"rewards": ["gsm8k_correctness"], "reward_weights": [1.0, 2.0]})


def test_full_fine_tuning_exports_the_policy_without_the_value_head(tiny_llama_dir, tmp_path):
    """The value head trains beside the policy; the exported model/ is a plain causal LM."""
    from safetensors.torch import load_file

    from tunesmith.training import train

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"question": f"Count to {index}", "answer": None}
                                                    for index in range(2)])
    config = run_config(
        tiny_llama_dir, data, tmp_path / "run", task="ppo", method={"name": "full"},
        objective={"rewards": ["test_ppo_digits"], "group_size": 2, "max_new_tokens": 4},
        train={"max_steps": 1, "batch_size": 2},
    )
    result = train(config)
    exported = load_file(result.run_dir / "model" / "model.safetensors")
    assert exported and not any(name.startswith("value_head") for name in exported)
    reloaded = load_model(ModelConfig(name=str(result.run_dir / "model")), "ppo")
    assert not hasattr(reloaded, "value_head")
    assert set(exported) <= set(reloaded.state_dict())


def test_chunked_log_probs_give_the_same_update(tiny_llama_dir):
    """ppo's policy log-probs over chunks of 5 positions: the loss, its metrics and every gradient (value head
    included) of the whole (BG, C, V) logits at once, with no logits matmul over more than 5 positions."""
    model_config = ModelConfig(name=str(tiny_llama_dir))
    tokenizer = load_tokenizer(model_config)
    settings = PPOSettings(rewards=["test_ppo_digits"], group_size=2, max_new_tokens=6, beta=0.0)
    torch.manual_seed(0)
    model = load_model(model_config, "ppo").train()
    OBJECTIVES.get("ppo").prepare_model(model, settings)
    experience = rollout(model, None, prompt_batch(tokenizer, count=3), settings)
    results = []
    for chunk in (None, 5):
        model.zero_grad()
        with LogitRows(model.config.vocab_size) as rows:
            output = ppo_loss(model, experience, settings.model_copy(update={"loss_chunk_tokens": chunk}))
            output.loss_sum.backward()
        results.append((output.loss_sum.detach(), output.metrics, [p.grad.clone() for p in model.parameters()],
                        rows.most))
    (whole_loss, whole_metrics, whole_grads, whole_rows), (loss, metrics, grads, chunk_rows) = results
    assert whole_rows >= experience["samples"]["completion_mask"].numel() > 2 * 5 and 0 < chunk_rows <= 5
    torch.testing.assert_close(loss, whole_loss, rtol=1e-5, atol=1e-6)
    for name, value in whole_metrics.items():
        torch.testing.assert_close(metrics[name], value, rtol=1e-5, atol=1e-6)
    for chunked, whole in zip(grads, whole_grads, strict=True):
        torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6)
