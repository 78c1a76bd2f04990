"""Each preference loss equals its paper's formula on hand-computed numbers, and trl's implementation on
the same log-probs (trl 1.x keeps its losses inside trainer methods; they are called here with a stand-in
`self` holding only what the loss reads)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunesmith.objectives.preference import (
    PAIRWISE_LOSSES,
    DPOSettings,
    KTOSettings,
    ORPOSettings,
    SimPOSettings,
    kto_losses,
    orpo_loss,
    orpo_odds_ratio_term,
    simpo_loss,
)
from tunesmith.objectives.reward import reward_loss

# Two pairs: summed response log-probs under the policy and the reference, and response lengths.
LOGPS = {
    "policy_chosen_logps": torch.tensor([-10.0, -22.0]),
    "policy_rejected_logps": torch.tensor([-12.0, -18.0]),
    "reference_chosen_logps": torch.tensor([-11.0, -20.0]),
    "reference_rejected_logps": torch.tensor([-11.5, -19.0]),
    "chosen_lengths": torch.tensor([5.0, 8.0]),
    "rejected_lengths": torch.tensor([4.0, 6.0]),
}


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def hand_margins(beta: float) -> list[float]:
    # pair 0: (-10 + 11) - (-12 + 11.5) = 1.5 ; pair 1: (-22 + 20) - (-18 + 19) = -3
    return [beta * 1.5, beta * -3.0]


def test_dpo_sigmoid_by_hand():
    result = PAIRWISE_LOSSES.get("sigmoid")(LOGPS, DPOSettings(beta=0.1))
    expected = [-log_sigmoid(margin) for margin in hand_margins(0.1)]
    torch.testing.assert_close(result.losses, torch.tensor(expected))
    torch.testing.assert_close(result.chosen_rewards, torch.tensor([0.1, -0.2]))
    torch.testing.assert_close(result.rejected_rewards, torch.tensor([-0.05, 0.1]))


def test_dpo_hinge_ipo_robust_by_hand():
    hinge = PAIRWISE_LOSSES.get("hinge")(LOGPS, DPOSettings(beta=0.5, loss="hinge")).losses
    torch.testing.assert_close(hinge, torch.tensor([max(0.0, 1 - m) for m in hand_margins(0.5)]))

    # ipo: log-ratios averaged per token: pair 0: 1/5 - (-0.5)/4 = 0.325 ; pair 1: -2/8 - 1/6
    ipo = PAIRWISE_LOSSES.get("ipo")(LOGPS, DPOSettings(beta=0.1, loss="ipo")).losses
    torch.testing.assert_close(ipo, torch.tensor([(0.325 - 5.0) ** 2, (-2 / 8 - 1 / 6 - 5.0) ** 2]))

    eps = 0.2
    robust = PAIRWISE_LOSSES.get("robust")(LOGPS, DPOSettings(beta=0.1, loss="robust", label_smoothing=eps)).losses
    expected = [(-(1 - eps) * log_sigmoid(m) + eps * log_sigmoid(-m)) / (1 - 2 * eps) for m in hand_margins(0.1)]
    torch.testing.assert_close(robust, torch.tensor(expected))


def test_simpo_and_orpo_by_hand():
    simpo = simpo_loss(LOGPS, SimPOSettings(beta=2.0, gamma=1.0)).losses
    expected = [-log_sigmoid(2.0 * (-10 / 5) - 2.0 * (-12 / 4) - 1.0),
                -log_sigmoid(2.0 * (-22 / 8) - 2.0 * (-18 / 6) - 1.0)]
    torch.testing.assert_close(simpo, torch.tensor(expected))

    def log_odds(mean_logp: float) -> float:
        probability = math.exp(mean_logp)
        return math.log(probability / (1 - probability))

    orpo = orpo_loss(LOGPS, ORPOSettings(beta=0.1)).losses
    expected = [
        -chosen - 0.1 * log_sigmoid(log_odds(chosen) - log_odds(rejected))
        for chosen, rejected in ((-10 / 5, -12 / 4), (-22 / 8, -18 / 6))
    ]
    torch.testing.assert_close(orpo, torch.tensor(expected))


def test_kto_by_hand():
    policy, reference = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -11.5])
    desirable = torch.tensor([True, False])
    settings = KTOSettings(beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)
    losses, rewards = kto_losses(policy, reference, desirable, torch.tensor(0.2), settings)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [1 - sigmoid(0.1 * (1.0 - 0.2)), 1.5 * (1 - sigmoid(0.1 * (0.2 - (-0.5))))]
    torch.testing.assert_close(losses, torch.tensor(expected))
    torch.testing.assert_close(rewards, torch.tensor([0.1, -0.05]))


def test_reward_model_loss_is_bradley_terry():
    class FixedRewards(torch.nn.Module):
        pass

    rewards = torch.tensor([2.0, -1.0, 0.5, 1.0])  # chosen rows then rejected rows

    import tunesmith.objectives.reward as reward_module

    original = reward_module.sequence_rewards
    reward_module.sequence_rewards = lambda model, batch, paired=False: rewards
    try:
        output = reward_loss(FixedRewards(), {"num_loss_tokens": 2})
    finally:
        reward_module.sequence_rewards = original
    assert output.loss_sum.item() == pytest.approx(-log_sigmoid(1.5) - log_sigmoid(-2.0), rel=1e-6)
    assert output.metrics["reward_accuracy"].item() == 1.0


# --- against trl ------------------------------------------------------------------------------------------


def _trl_stand_in(**fields) -> SimpleNamespace:
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    return SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1, **fields,
    )


def _fake_forward(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths):
    """Inputs and a model for trl's DPO/KTO `_compute_loss`: each response's log-prob spread evenly over
    its completion tokens, zero elsewhere (as trl's fused head gives for -100 labels)."""
    logps = torch.cat([chosen_logps, rejected_logps])  # (R,)
    lengths = torch.cat([chosen_lengths, rejected_lengths]).long()  # (R,)
    width = int(lengths.max()) + 2
    completion_mask = torch.zeros(len(logps), width, dtype=torch.long)  # (R, T)
    for row, length in enumerate(lengths.tolist()):
        completion_mask[row, 1 : 1 + length] = 1
    shifted = completion_mask[:, 1:].float()  # (R, T-1)
    per_token = shifted * (logps / lengths).unsqueeze(1)  # (R, T-1)

    def model(**kwargs):
        return SimpleNamespace(
            log_probs=per_token, entropy=torch.zeros_like(per_token), mean_logits=torch.zeros_like(per_token),
            is_top1=torch.zeros_like(per_token, dtype=torch.bool),
        )

    inputs = {
        "input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
    }
    return model, inputs


@pytest.mark.parametrize(
    ("loss", "label_smoothing"), [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1)]
)
def test_dpo_losses_equal_trl(loss, label_smoothing):
    from trl.trainer.dpo_trainer import DPOTrainer

    beta = 0.2
    model, inputs = _fake_forward(
        LOGPS["policy_chosen_logps"], LOGPS["policy_rejected_logps"], LOGPS["chosen_lengths"], LOGPS["rejected_lengths"]
    )
    inputs |= {"ref_chosen_logps": LOGPS["reference_chosen_logps"],
               "ref_rejected_logps": LOGPS["reference_rejected_logps"]}
    stand_in = _trl_stand_in(
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss],
        loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
    )
    trl_loss = DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    ours = PAIRWISE_LOSSES.get(loss)(LOGPS, DPOSettings(beta=beta, loss=loss, label_smoothing=label_smoothing))
    torch.testing.assert_close(ours.losses.mean(), trl_loss)
    torch.testing.assert_close(ours.chosen_rewards.mean().item(), stand_in._metrics["train"]["rewards/chosen"][0])
    torch.testing.assert_close(
        (ours.chosen_rewards > ours.rejected_rewards).float().mean().item(),
        stand_in._metrics["train"]["rewards/accuracies"][0],
    )


def test_kto_loss_equals_trl():
    from trl.trainer.kto_trainer import KTOTrainer

    policy = torch.tensor([-10.0, -22.0, -12.0, -18.0])
    reference = torch.tensor([-11.0, -20.0, -11.5, -19.0])
    labels = torch.tensor([True, True, False, False])
    model, inputs = _fake_forward(policy[:2], policy[2:], torch.tensor([5.0, 8.0]), torch.tensor([4.0, 6.0]))
    inputs |= {"label": labels, "ref_logps": reference}
    stand_in = _trl_stand_in(
        precompute_ref_logps=True, calculate_KL=False, loss_type="kto", beta=0.1,
        desirable_weight=1.0, undesirable_weight=1.3, _compute_kl_logps=lambda model, batch: None,
    )
    trl_loss = KTOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    # trl without its KL estimate uses z0 = 0; the reference point is an argument of ours.
    losses, _ = kto_losses(policy, reference, labels, torch.tensor(0.0), KTOSettings(undesirable_weight=1.3))
    torch.testing.assert_close(losses.mean(), trl_loss)


def test_simpo_equals_trl_cpo_simpo():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    chosen_mean = LOGPS["policy_chosen_logps"] / LOGPS["chosen_lengths"]
    rejected_mean = LOGPS["policy_rejected_logps"] / LOGPS["rejected_lengths"]
    stand_in = _trl_stand_in(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.5, label_smoothing=0.0)
    trl_losses, trl_chosen, _ = CPOTrainer.cpo_loss(stand_in, chosen_mean, rejected_mean)
    ours = simpo_loss(LOGPS, SimPOSettings(beta=2.5, gamma=0.7))
    torch.testing.assert_close(ours.losses, trl_losses)
    torch.testing.assert_close(ours.chosen_rewards, trl_chosen)


def test_orpo_odds_ratio_equals_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    chosen_mean = torch.tensor([-0.3, -2.0, -0.01, -5.0])
    rejected_mean = torch.tensor([-0.9, -1.0, -0.02, -7.0])
    stand_in = _trl_stand_in(beta=0.1)
    trl_terms = ORPOTrainer.odds_ratio_loss(stand_in, chosen_mean, rejected_mean)[0]
    torch.testing.assert_close(0.1 * orpo_odds_ratio_term(chosen_mean, rejected_mean), trl_terms)


def test_unknown_dpo_loss_is_a_config_error(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="did you mean 'sigmoid'"):
        DPOSettings(loss="sigmoidd")
    with pytest.raises(ValidationError, match="robust only"):
        DPOSettings(loss="sigmoid", label_smoothing=0.1)
