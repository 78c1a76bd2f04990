"""reward: a Bradley-Terry reward model, a scalar head on a causal LM trained on preference pairs.

Loss: -log sigma(r(x, y_w) - r(x, y_l)) (Bradley & Terry 1952; as used for RLHF reward models by
Ouyang et al. 2022, "Training language models to follow instructions...", eq. 1, and Stiennon et al. 2020).
The model is a transformers *ForSequenceClassification with num_labels=1 (the data layer names one
label, "reward"); its head reads the hidden state of each sequence's LAST REAL token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.objectives.base import LossOutput, ObjectiveSpec, loss_eval_sums, model_inputs, register
from tunesmith.objectives.causal_lm import _language_model
from tunesmith.objectives.preference import collate_pairs, pair_means, pair_row_hidden


def sequence_rewards(model: torch.nn.Module, batch: dict, paired: bool = False) -> torch.Tensor:
    """The scalar reward of each row (R,) in float32; a `paired` batch (collate_pairs) runs each pair as one row
    where that costs less (`pair_row_hidden`).

    Pooled here, at the last position of the attention mask, rather than by transformers' pooling,
    which takes the last token that is not pad_token_id: with pad == eos (SmolLM2, ChatML `<|im_end|>`)
    that skips the end-of-turn token of a reply that ends with it.
    """
    classifier = _language_model(model)
    rows = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)  # (R,)
    last = batch["attention_mask"].sum(-1) - 1  # (R,) right padding: the last real token
    pooled = pair_row_hidden(model, batch, rows, last) if paired else None  # (R, H)
    if pooled is None:
        backbone = getattr(classifier, classifier.base_model_prefix)
        pooled = backbone(**model_inputs(batch), use_cache=False).last_hidden_state[rows, last]  # (R, H)
    return classifier.score(pooled).float().squeeze(-1)  # (R,)


def reward_loss(model: torch.nn.Module, batch: dict, settings=None) -> LossOutput:
    rewards = sequence_rewards(model, batch, paired=True)  # (2B,): chosen rows, then rejected rows
    chosen, rejected = rewards.chunk(2)
    margin = chosen - rejected  # (B,)
    metrics = {
        "reward_accuracy": (margin > 0).float().sum(),
        "chosen_reward": chosen.detach().sum(),
        "rejected_reward": rejected.detach().sum(),
        "reward_margin": margin.detach().sum(),
    }
    return LossOutput(-F.logsigmoid(margin).sum(), batch["num_loss_tokens"], metrics)


@torch.no_grad()
def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """Rewards of whole conversations (each ending with the reply to score), rendered by the chat template."""
    from tunesmith.data.templates import ensure_chat_template, render_chat

    ensure_chat_template(tokenizer)
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(conversations), batch_size):
        texts = [render_chat(messages, tokenizer) for messages in conversations[start:start + batch_size]]
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        longest = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), longest), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, row_ids in enumerate(ids):
            input_ids[row, : len(row_ids)] = torch.tensor(row_ids)
            attention_mask[row, : len(row_ids)] = 1
        batch = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        scores += sequence_rewards(model, batch).tolist()
    return scores


register(ObjectiveSpec(
    name="reward", model_kind="sequence_classification", collate=collate_pairs, loss=reward_loss,
    eval_sums=loss_eval_sums(reward_loss), eval_metrics=pair_means, rows_independent=True,
))
