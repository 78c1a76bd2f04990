"""Response log-probs computed in chunks through the output head (`loss_chunk_tokens`) equal the one-piece
computation and the plain full-logits formula, in value and in every gradient, and the head never sees
more than a chunk of positions at once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunesmith.config import ModelConfig
from tunesmith.data.collate import IGNORE_INDEX
from tunesmith.data.preference import tokenize_preference_record
from tunesmith.methods import METHODS
from tunesmith.models import load_model, load_tokenizer
from tunesmith.objectives.branched_rows import forward_flops
from tunesmith.objectives.preference import DPOSettings, collate_pairs, sequence_logps


def pair_batch(tokenizer) -> dict:
    """Three pairs: long chosen replies (several chunks) and short rejected ones (a single piece)."""
    records = [
        {"prompt": [{"role": "user", "content": f"What is {index} plus {index}?"}],
         "chosen": [{"role": "assistant", "content": f"{index} plus {index} is {2 * index}, because adding a "
                                                     f"number to itself doubles it: {index} times 2."}],
         "rejected": [{"role": "assistant", "content": "No."}]}
        for index in range(3)
    ]
    examples = [tokenize_preference_record(record, "dpo", tokenizer, 128)[0] for record in records]
    return collate_pairs(examples, tokenizer.pad_token_id)


def logps_and_gradients(model, batch: dict, chunk_tokens: int | None) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    logps, _ = sequence_logps(model, batch, chunk_tokens)  # (R,)
    weights = torch.linspace(1.0, 2.0, len(logps))  # rows weigh differently, as in DPO's loss
    (logps * weights).sum().backward()
    return logps.detach(), {name: parameter.grad.clone() for name, parameter in model.named_parameters()
                            if parameter.grad is not None}


def full_logits_logps(model, batch: dict) -> torch.Tensor:
    """The formula written plainly: log-softmax of the whole (R, T, V) logits, summed over response tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()  # (R, T, V)
    targets = batch["targets"]  # (R, T)
    token_logps = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * (targets != IGNORE_INDEX)).sum(-1)  # (R,)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_chunked_logps_and_gradients_equal_the_one_piece_computation(method, tiny_llama_dir):
    model_config = ModelConfig(name=str(tiny_llama_dir))
    tokenizer = load_tokenizer(model_config)
    batch = pair_batch(tokenizer)
    lengths = (batch["targets"] != IGNORE_INDEX).sum(-1)
    chunk = 4
    assert lengths.max() > 3 * chunk and lengths.min() <= chunk  # both paths: several chunks and one piece
    torch.manual_seed(0)
    model = METHODS.get(method).apply(load_model(model_config, "dpo"), METHODS.get(method).settings(), "dpo")
    model.eval()  # no dropout: the two computations must see the same network
    if method == "lora":  # move the adapters off their zero start so their gradients are not trivial
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.1)

    whole, whole_gradients = logps_and_gradients(model, batch, None)
    chunked, chunked_gradients = logps_and_gradients(model, batch, chunk)

    torch.testing.assert_close(chunked, whole)
    with torch.no_grad():
        torch.testing.assert_close(whole, full_logits_logps(model, batch))
    assert whole_gradients and set(chunked_gradients) == set(whole_gradients)
    for name, gradient in whole_gradients.items():
        assert gradient.abs().sum() > 0, name
        torch.testing.assert_close(chunked_gradients[name], gradient, msg=name)


@pytest.mark.parametrize("trained_head", [False, True])
def test_the_head_sees_at_most_one_chunk_at_a_time(tiny_llama_dir, trained_head):
    """The forward pass runs the output head (here with a hook: not fused) on <= chunk positions per call. A frozen
    head's chunks compute their gradients there, so the backward pass does not run it again; a trained head's are
    checkpointed and recomputed in the backward pass (per-row gradients of its weights would be held until then)."""
    model_config = ModelConfig(name=str(tiny_llama_dir))
    batch = pair_batch(load_tokenizer(model_config))
    model = load_model(model_config, "dpo")
    head = model.get_output_embeddings()
    if not trained_head:
        head.requires_grad_(False)
    positions_per_call: list[int] = []
    head.register_forward_hook(lambda module, inputs, output: positions_per_call.append(output.shape[0]))
    logps, _ = sequence_logps(model, batch, chunk_tokens=4)
    forward_calls = len(positions_per_call)
    logps.sum().backward()
    assert max(positions_per_call) <= 4 and forward_calls > 1
    recomputed = len(positions_per_call) - forward_calls
    assert recomputed == (forward_calls if trained_head else 0)
    assert sum(positions_per_call[:forward_calls]) == int((batch["targets"] != IGNORE_INDEX).sum())


def test_chunk_size_is_a_setting_with_a_one_line_error():
    assert DPOSettings().loss_chunk_tokens == 128 and DPOSettings(loss_chunk_tokens=None).loss_chunk_tokens is None
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        DPOSettings(loss_chunk_tokens=0)


def test_a_rows_logp_does_not_depend_on_the_other_rows(tiny_llama_dir):
    """Each row's sum is its own: a row's log-prob does not depend on the other rows of the batch."""
    model_config = ModelConfig(name=str(tiny_llama_dir))
    batch = pair_batch(load_tokenizer(model_config))
    model = load_model(model_config, "dpo").eval()
    with torch.no_grad():
        together, _ = sequence_logps(model, batch, 4)
        row = {key: value[1:2] if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        alone, _ = sequence_logps(model, row, 4)
        logits = model(input_ids=row["input_ids"], attention_mask=row["attention_mask"]).logits[0]  # (T, V)
        has_target = row["targets"][0] != IGNORE_INDEX
        by_cross_entropy = -F.cross_entropy(logits[has_target], row["targets"][0][has_target], reduction="sum")
    torch.testing.assert_close(alone[0], together[1])
    torch.testing.assert_close(alone[0], by_cross_entropy)


def prefix_pair_batch(tokenizer) -> dict:
    """Pairs whose prompts differ in length, whose sides share their first response words or not, and whose chosen
    side is the shorter or the longer."""
    replies = [("The answer is 4.", "The answer is 5, since four and one more make five."),
               ("Four, because two and two make four.", "Five."),
               ("It is 4", "It is 4 or so")]
    records = [
        {"prompt": [{"role": "user", "content": "What is two plus two?" + " Think it through." * index}],
         "chosen": [{"role": "assistant", "content": chosen}], "rejected": [{"role": "assistant", "content": rejected}]}
        for index, (chosen, rejected) in enumerate(replies)
    ]
    examples = [tokenize_preference_record(record, "dpo", tokenizer, 128)[0] for record in records]
    return collate_pairs(examples, tokenizer.pad_token_id)


@pytest.mark.parametrize(("method", "recompute"), [("full", False), ("lora", False), ("lora", True)])
def test_a_pairs_common_beginning_runs_once(method, recompute, tiny_llama_dir):
    """Each pair runs as one row (its prompt and the response tokens both sides share, then the rest of each side,
    the rejected side's tokens not seeing the chosen side's): the log-probs equal the whole-logits formula, every
    gradient equals running both sides whole (recomputed layers too), and the model sees B x max(Lc + Lr - S)
    positions instead of 2B x max(L). Eager attention, or rows long enough for attention to dominate, take the
    whole rows."""
    from tunesmith.objectives import preference
    from tunesmith.training.recompute import enable_recompute

    model_config = ModelConfig(name=str(tiny_llama_dir))
    batch = prefix_pair_batch(load_tokenizer(model_config))
    pairs = batch["input_ids"].shape[0] // 2
    chosen_lengths, rejected_lengths = batch["attention_mask"].sum(-1).chunk(2)
    chosen, rejected = batch["input_ids"].chunk(2)
    shared = torch.tensor([next(index for index, (one, other) in enumerate(zip(a, b, strict=True)) if one != other)
                           for a, b in zip(chosen.tolist(), rejected.tolist(), strict=True)])
    first_targets = (batch["targets"] != IGNORE_INDEX).long().argmax(-1)[:pairs]
    assert (shared > first_targets).any()  # a pair shares response tokens, not only its prompt
    torch.manual_seed(0)
    model = METHODS.get(method).apply(load_model(model_config, "dpo"), METHODS.get(method).settings(), "dpo").train()
    if method == "lora":
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.1)
    if recompute:
        enable_recompute(model)
    positions: list[int] = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: positions.append(args[0].numel()))

    def logps_and_gradients(paired: bool):
        model.zero_grad(set_to_none=True)
        positions.clear()
        logps, _ = sequence_logps(model, batch, 4, paired=paired)
        (logps * torch.linspace(1.0, 2.0, len(logps))).sum().backward()
        return logps.detach(), [parameter.grad.clone() for parameter in model.parameters() if parameter.requires_grad]

    (shared_logps, shared_grads), shared_positions = logps_and_gradients(True), list(positions)
    (whole_logps, whole_grads), whole_positions = logps_and_gradients(False), list(positions)
    row_width = int((chosen_lengths + rejected_lengths - shared).max())
    assert shared_positions[0] == pairs * row_width < whole_positions[0] == batch["input_ids"].numel()
    with torch.no_grad():
        torch.testing.assert_close(shared_logps, full_logits_logps(model, batch))
    torch.testing.assert_close(shared_logps, whole_logps)
    for one, both in zip(shared_grads, whole_grads, strict=True):
        assert both.abs().sum() > 0
        torch.testing.assert_close(one, both, rtol=1e-4, atol=1e-6)

    model.config._attn_implementation = "eager"
    assert preference.pair_row_hidden(model, batch, torch.tensor([0]), torch.tensor([0])) is None
    # A pair's row is fewer positions than its two sides' rows but longer: taken while a layer's weights outweigh
    # its attention, not where the attention of a row nearly twice as long costs more than the positions saved.
    assert forward_flops(model.config, 1, 80) < forward_flops(model.config, 2, 64)
    assert forward_flops(model.config, 1, 2 * 4096 - 8) > forward_flops(model.config, 2, 4096)


@pytest.mark.parametrize("precision", ["float32", "bf16 autocast", "bf16 model"])
def test_a_pair_rows_mask_is_kept_once_for_every_layer(precision, tiny_llama_dir):
    """The pair rows' attention mask reaches every layer as one tensor in the attention's dtype, which each
    layer's backward keeps as it is: one (B, 1, W, W) tensor saved for the backward in all, where a boolean mask
    became a float32 copy in each layer. The log-probs are the two-row layout's."""
    model_config = ModelConfig(name=str(tiny_llama_dir))
    batch = prefix_pair_batch(load_tokenizer(model_config))
    model = load_model(model_config, "dpo").train()
    if precision == "bf16 model":
        model = model.to(torch.bfloat16)
    masks: dict[int, torch.dtype] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 4 and tensor.shape[1] == 1 and tensor.shape[2] == tensor.shape[3] > 1:
            masks[tensor.untyped_storage().data_ptr()] = tensor.dtype
        return tensor

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast")
    with autocast, torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        paired, _ = sequence_logps(model, batch, 4, paired=True)
    with autocast, torch.no_grad():
        rows, _ = sequence_logps(model, batch, 4)
    attention_dtype = torch.float32 if precision == "float32" else torch.bfloat16
    assert list(masks.values()) == [attention_dtype]
    tolerance = {"rtol": 1e-5, "atol": 1e-4} if precision == "float32" else {"rtol": 2e-2, "atol": 0.5}
    torch.testing.assert_close(paired.detach(), rows, **tolerance)


def test_a_reward_models_pair_runs_as_one_row(tiny_llama_dir):
    """reward: each side's score read from the pair's one row equals scoring the sides as rows of their own, in
    value and every gradient, from fewer positions."""
    from tunesmith.objectives.reward import sequence_rewards

    model_config = ModelConfig(name=str(tiny_llama_dir))
    batch = prefix_pair_batch(load_tokenizer(model_config))
    torch.manual_seed(0)
    model = load_model(model_config, "reward", label_names=["reward"]).train()
    positions: list[int] = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: positions.append(args[0].numel()))

    def rewards_and_gradients(paired: bool):
        model.zero_grad(set_to_none=True)
        rewards = sequence_rewards(model, batch, paired=paired)
        (rewards * torch.linspace(1.0, 2.0, len(rewards))).sum().backward()
        gradients = [parameter.grad.clone() for parameter in model.parameters() if parameter.grad is not None]
        return rewards.detach(), gradients

    (one_row, one_row_grads), (two_rows, two_rows_grads) = rewards_and_gradients(True), rewards_and_gradients(False)
    assert positions[0] < positions[1] == batch["input_ids"].numel()
    torch.testing.assert_close(one_row, two_rows, rtol=1e-5, atol=1e-6)
    assert len(one_row_grads) == len(two_rows_grads) > 0
    for one, two in zip(one_row_grads, two_rows_grads, strict=True):
        torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-6)


def test_a_sliding_window_model_keeps_two_rows_where_its_window_is_shorter(tiny_tokenizer_dir, tmp_path):
    """The pair row's one mask serves every layer, so a model with sliding-window layers (here Mistral's, 8
    positions) keeps the two-row layout for rows wider than its window, and its log-probs stay those of each side
    alone; rows within the window may still share their prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig

    from tunesmith.objectives import preference
    from tunesmith.objectives.branched_rows import takes_branched_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                           pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = load_model(ModelConfig(name=str(tmp_path)), "dpo").eval()
    batch = prefix_pair_batch(tokenizer)
    assert takes_branched_rows(model, 8) and not takes_branched_rows(model, 9) and not takes_branched_rows(model)
    assert preference.pair_row_hidden(model, batch, torch.tensor([0]), torch.tensor([0])) is None
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(model, batch, 4, paired=True)[0], full_logits_logps(model, batch))


def test_pair_rows_in_a_bf16_training_step_take_the_masked_kernel(tiny_llama_dir, monkeypatch):
    """Inside a CPU training step (`step_attention`, masked) the pair rows' causal mask goes to the half-precision
    masked kernel in every layer: log-probs and LoRA gradients equal transformers' SDPA under the same mask, to
    bf16's rounding."""
    from tunesmith.training import packed_attention
    from tunesmith.training.packed_attention import step_attention

    model_config = ModelConfig(name=str(tiny_llama_dir))
    batch = prefix_pair_batch(load_tokenizer(model_config))
    torch.manual_seed(0)
    lora = METHODS.get("lora")
    model = lora.apply(load_model(model_config, "dpo"), lora.settings(), "dpo").train()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    calls = []
    kernel = packed_attention.masked_attention_by_matmul
    monkeypatch.setattr(packed_attention, "masked_attention_by_matmul", lambda *args: calls.append(1) or kernel(*args))

    def logps_and_gradients(masked: bool):
        model.zero_grad(set_to_none=True)
        with step_attention(model, packed=False, masked=masked), torch.autocast("cpu", dtype=torch.bfloat16):
            logps, _ = sequence_logps(model, batch, 4, paired=True)
        (logps * torch.linspace(1.0, 2.0, len(logps))).sum().backward()
        return logps.detach(), [parameter.grad.clone() for parameter in model.parameters() if parameter.requires_grad]

    masked_logps, masked_grads = logps_and_gradients(True)
    assert len(calls) == model.config.num_hidden_layers
    sdpa_logps, sdpa_grads = logps_and_gradients(False)
    assert len(calls) == model.config.num_hidden_layers
    assert model.config._attn_implementation == "sdpa"  # restored after the step
    torch.testing.assert_close(masked_logps, sdpa_logps, rtol=2e-2, atol=0.5)
    for ours, reference in zip(masked_grads, sdpa_grads, strict=True):
        assert reference.abs().sum() > 0
        torch.testing.assert_close(ours, reference, rtol=5e-2, atol=5e-2 * reference.abs().max().item())
