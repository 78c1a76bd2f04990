"""grpo: reward functions, group advantages, the clipped/KL loss by formula, and learning on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import LogitRows, prompt_examples, run_config, train_online_rl, write_jsonl
from transformers import StaticCache

from tunesmith.config import ModelConfig
from tunesmith.models import load_model, load_tokenizer
from tunesmith.objectives.rl import (
    REWARD_FUNCTIONS,
    GRPOSettings,
    collate_prompts,
    completion_logps,
    final_number,
    group_advantages,
    grpo_loss,
    grpo_token_losses,
    register_reward,
    rollout,
)
from tunesmith.training.reference import ReferenceModel


@register_reward("test_digits")
def digit_fraction(prompts, completions, answers) -> list[float]:
    """Fraction of the completion's characters that are digits: learnable by a random tiny model."""
    return [sum(char.isdigit() for char in text) / max(len(text), 1) for text in completions]


def test_gsm8k_rewards_on_real_answers(shared_data):
    record = json.loads((shared_data / "sft" / "gsm8k_train.jsonl").read_text().splitlines()[0])
    correct = REWARD_FUNCTIONS.get("gsm8k_correctness")
    assert final_number(record["answer"]) == "72"
    assert correct([], [record["answer"], "So the total is 72.", "It is 71.", ""], [record["answer"]] * 4) == [
        1.0, 1.0, 0.0, 0.0]
    assert REWARD_FUNCTIONS.get("gsm8k_format")([], ["x #### 72", "72"], [None, None]) == [1.0, 0.0]
    assert final_number("#### 1,234") == "1234" and final_number("costs $5.50.") == "5.5"


def test_group_advantages_and_loss_follow_the_formulas():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0])
    advantages = group_advantages(rewards, group=4)
    first = torch.tensor([1.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(advantages[:4], (first - 0.5) / (first.std() + 1e-4))
    assert advantages[:4].sum().abs() < 1e-6 and advantages[4:].sum().abs() < 1e-5

    settings = GRPOSettings(beta=0.1, epsilon=0.2)
    logps = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-1.5, -1.0]])  # ratios e^0.5 (clipped to 1.2 for A > 0) and e^-1
    reference = torch.tensor([[-1.2, -2.0]])
    losses, kl = grpo_token_losses(logps, old, reference, torch.tensor([2.0]), settings)
    ratio = torch.exp(logps - old)
    surrogate = torch.minimum(ratio * 2.0, ratio.clamp(0.8, 1.2) * 2.0)
    expected_kl = torch.exp(reference - logps) - (reference - logps) - 1
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(losses, -(surrogate - 0.1 * expected_kl))
    assert surrogate[0, 0].item() == pytest.approx(2.4)


def test_grpo_raises_the_reward_on_the_tiny_model(tiny_llama_dir):
    """Ten GRPO steps with a learnable reward raise the sampled reward well above where it started."""
    model_config = ModelConfig(name=str(tiny_llama_dir))
    tokenizer = load_tokenizer(model_config)
    examples = prompt_examples(tokenizer, [f"Count to {index}" for index in range(4)])
    batch = collate_prompts(examples, tokenizer.pad_token_id)
    settings = GRPOSettings(rewards=["test_digits"], group_size=8, max_new_tokens=8, beta=0.0)
    torch.manual_seed(0)
    model = load_model(model_config, "grpo").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    rewards = []
    for _ in range(12):
        output = grpo_loss(model, rollout(model, None, batch, settings), settings)
        (output.loss_sum / output.num_loss_tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
        rewards.append(output.metrics["reward"].item() / output.num_loss_tokens)
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards


@pytest.mark.parametrize("method", ["full", "lora"])
def test_rollout_scores_samples_with_the_starting_policy(tiny_llama_dir, method):
    """After the policy moves, the rollout's reference log-probs are still the STARTING model's on the new
    samples: a frozen copy for full fine-tuning, the base with adapters disabled for LoRA."""
    from tunesmith.methods import METHODS

    model_config = ModelConfig(name=str(tiny_llama_dir))
    tokenizer = load_tokenizer(model_config)
    examples = prompt_examples(tokenizer, ["Count to 3"])
    batch = collate_prompts(examples, tokenizer.pad_token_id)
    settings = GRPOSettings(rewards=["test_digits"], group_size=2, max_new_tokens=6, beta=0.1)
    torch.manual_seed(0)
    starting = load_model(model_config, "grpo").eval()
    model = load_model(model_config, "grpo")
    if method == "lora":
        lora = METHODS.get("lora")
        model = lora.apply(model, lora.settings(r=4, dropout=0.0), "grpo")
    model.train()
    reference = ReferenceModel(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and (method == "full" or "lora_B" in name):
                parameter.add_(torch.randn_like(parameter) * 0.5)
    experience = rollout(model, reference, batch, settings)
    assert model.training  # sampling and the reference pass put it back in training mode
    with torch.no_grad():
        expected = completion_logps(starting, experience["samples"])
        moved = completion_logps(model.eval(), experience["samples"])
    torch.testing.assert_close(experience["reference_logps"], expected, rtol=1e-5, atol=1e-5)
    assert (moved - expected).abs().max() > 1e-2  # the policy itself did move
    assert rollout(model, reference, batch, settings.model_copy(update={"beta": 0.0}))["reference_logps"] is None


def test_grpo_trains_through_the_loop_with_a_lora_reference(tiny_llama_dir, tmp_path):
    result = train_online_rl(tiny_llama_dir, tmp_path, "grpo", ["test_digits", "gsm8k_correctness"])
    assert result.exit_code == 0 and (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert {"eval_loss", "reward", "reward_test_digits", "reward_gsm8k_correctness"} <= set(result.summary["eval"])


def test_unknown_reward_function_is_a_config_error(tiny_llama_dir, tmp_path):
    from tunesmith.errors import ConfigError

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"question": "q", "answer": "#### 1"}])
    with pytest.raises(ConfigError, match="did you mean 'gsm8k_correctness'"):
        run_config(tiny_llama_dir, data, tmp_path / "run", task="grpo", objective={"rewards": ["gsm8k_corectness"]})


def test_chunked_log_probs_equal_the_whole_batch(tiny_llama_dir):
    """Completion log-probs over chunks of 5 positions give the reference's and the policy's log-probs, grpo's loss
    and every gradient of the whole (BG, C, V) logits at once, and no logits matmul covers more than 5 positions."""
    from tunesmith.methods import METHODS

    model_config = ModelConfig(name=str(tiny_llama_dir))
    tokenizer = load_tokenizer(model_config)
    batch = collate_prompts(prompt_examples(tokenizer, ["Count to 3", "Count to 4"]), tokenizer.pad_token_id)
    settings = GRPOSettings(rewards=["test_digits"], group_size=3, max_new_tokens=6, beta=0.1)
    torch.manual_seed(0)
    lora = METHODS.get("lora")
    model = lora.apply(load_model(model_config, "grpo"), lora.settings(r=4, dropout=0.0), "grpo").train()
    experience = rollout(model, ReferenceModel(model), batch, settings.model_copy(update={"loss_chunk_tokens": None}))
    vocab = model.config.vocab_size
    results = []
    for chunk in (None, 5):
        model.zero_grad()
        with LogitRows(vocab) as rows:
            with torch.no_grad():
                no_grad = completion_logps(model, experience["samples"], chunk)
            output = grpo_loss(model, experience, settings.model_copy(update={"loss_chunk_tokens": chunk}))
            output.loss_sum.backward()
        gradients = [parameter.grad.clone() for parameter in model.parameters() if parameter.requires_grad]
        results.append((no_grad, output.loss_sum.detach(), output.metrics["kl"], gradients, rows.most))
    (whole_logps, whole_loss, whole_kl, whole_grads, whole_rows), (logps, loss, kl, grads, chunk_rows) = results
    assert whole_rows >= experience["samples"]["completion_mask"].numel() > 2 * 5 and 0 < chunk_rows <= 5
    torch.testing.assert_close(logps, whole_logps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, whole_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl, whole_kl, rtol=1e-5, atol=1e-6)
    for chunked, whole in zip(grads, whole_grads, strict=True):
        torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["float32", "bf16 autocast"])
def test_a_frozen_heads_log_prob_gradients_are_made_in_the_forward_pass(precision, tiny_llama_dir):
    """Completion log-probs through a frozen head (LoRA) in chunks: the values and the states' gradients of the
    whole-logits autograd formula, with no vocabulary-wide matmul in the backward pass (a checkpointed chunk ran
    its head again there); a trained head keeps the checkpointed chunks, which do."""
    from tunesmith.objectives.causal_lm import _chunk_token_logps, chunked_token_logps

    model = load_model(ModelConfig(name=str(tiny_llama_dir)), "grpo")
    head, vocab = model.get_output_embeddings(), model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(13, model.config.hidden_size, generator=generator)
    targets = torch.randint(0, vocab, (13,), generator=generator)
    weights = torch.randn(13, generator=generator)  # d loss / d log-prob of each token
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast")

    def values_and_gradient(chunk: int | None, trained_head: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        head.requires_grad_(trained_head)
        hidden = states.clone().requires_grad_()
        with autocast:
            values = chunked_token_logps(hidden, head, targets, chunk) if chunk else _chunk_token_logps(
                hidden, head, targets)
        with LogitRows(vocab) as backward_rows:
            (values * weights).sum().backward()
        return values.detach(), hidden.grad, backward_rows.most

    expected_values, expected_gradient, _ = values_and_gradient(None, trained_head=False)
    values, gradient, head_rows_in_backward = values_and_gradient(5, trained_head=False)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if precision == "float32" else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(values, expected_values, **tolerance)
    torch.testing.assert_close(gradient, expected_gradient, **tolerance)
    assert head_rows_in_backward == 0
    assert values_and_gradient(5, trained_head=True)[2] == 5  # checkpointed: the head runs again, a chunk at a time


def test_a_frozen_heads_log_probs_hold_one_chunks_logits_at_a_time(tiny_llama_dir, monkeypatch):
    """The forward-pass gradients of a frozen head's log-probs work chunk by chunk: a chunk's (C, V) log-softmax
    is gone before the next chunk's is made, so the chunks peak at one chunk's buffers, not two."""
    import weakref

    from tunesmith.objectives.causal_lm import chunked_token_logps

    model = load_model(ModelConfig(name=str(tiny_llama_dir)), "grpo")
    head = model.get_output_embeddings().requires_grad_(False)
    earlier: list[weakref.ref] = []
    log_softmax = torch.log_softmax

    def watched(*args, **kwargs):
        assert all(ref() is None for ref in earlier), "an earlier chunk's log-probs are still alive"
        result = log_softmax(*args, **kwargs)
        earlier.append(weakref.ref(result))
        return result

    monkeypatch.setattr(torch, "log_softmax", watched)
    hidden = torch.randn(13, model.config.hidden_size, requires_grad=True)
    targets = torch.randint(0, model.config.vocab_size, (13,))
    chunked_token_logps(hidden, head, targets, 5).sum().backward()
    assert len(earlier) == 3 and hidden.grad is not None


def test_each_prompt_is_prefilled_once_for_its_group(tiny_llama_dir, monkeypatch):
    """G completions per prompt: with each prompt's KV cache computed once and repeated for its group, the same seed
    samples the same completions as with every copy of the prompt prefilled, prompts of different lengths (left
    padding) included; the prompts' tokens run through the model B x (P - 1) + BG times instead of BG x P."""
    from tunesmith.objectives import rl

    model_config = ModelConfig(name=str(tiny_llama_dir))
    tokenizer = load_tokenizer(model_config)
    batch = collate_prompts(prompt_examples(tokenizer, ["Count to 3", "Count to four, slowly and with care"]),
                            tokenizer.pad_token_id)
    prompts, length = batch["input_ids"].shape
    assert batch["attention_mask"].sum(-1).unique().numel() == 2  # one prompt is left-padded
    settings = GRPOSettings(rewards=["test_digits"], group_size=4, max_new_tokens=8, temperature=1.0)
    model = load_model(model_config, "grpo")
    tokens_per_forward: list[int] = []
    model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: tokens_per_forward.append(args[0].numel()))
    results = {}
    for shared in (True, False):
        if not shared:
            monkeypatch.setattr(rl, "sampling_cache", lambda *args: None)
        tokens_per_forward.clear()
        torch.manual_seed(0)
        samples = rl.sample_groups(model, batch, settings)
        results[shared] = (samples["sequences"], samples["completion_mask"], list(tokens_per_forward))
    group = prompts * settings.group_size
    assert torch.equal(results[True][0], results[False][0]) and torch.equal(results[True][1], results[False][1])
    assert results[True][2][:2] == [prompts * (length - 1), group]
    assert results[False][2][0] == group * length
    assert results[True][2][2:] == results[False][2][1:]  # then one token per completion per step, alike
    monkeypatch.undo()
    head_calls: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda *unused: head_calls.append(1))
    cache = rl.sampling_cache(model.eval(), batch["input_ids"], batch["attention_mask"], 4, settings.max_new_tokens)
    assert not head_calls  # the prompts' prefill makes the cache, no logits
    assert isinstance(cache, StaticCache) and cache.layers[0].max_cache_len == length + settings.max_new_tokens


@pytest.mark.parametrize(("method", "task"), [("lora", "grpo"), ("full", "grpo"), ("lora", "ppo")])
def test_each_prompt_runs_once_in_the_update(tiny_llama_dir, monkeypatch, method, task):
    """The update's forward with each prompt run once gives the loss, the KL and every gradient (ppo's value
    head's included) of running all G copies (left-padded prompts, completions ended early), both ways it runs
    a prompt once: its KV cache repeated for the group (B x P + BG x (C - 1) positions), or each group as one row
    (B x (max p + G x (C - 1))), which recomputed layers take, with the same gradients."""
    from tunesmith.methods import METHODS
    from tunesmith.objectives import rl
    from tunesmith.training.recompute import enable_recompute

    model_config = ModelConfig(name=str(tiny_llama_dir))
    tokenizer = load_tokenizer(model_config)
    batch = collate_prompts(prompt_examples(tokenizer, ["Count to 3", "Count to four, slowly and with care"]),
                            tokenizer.pad_token_id)
    settings_type, loss = {"grpo": (GRPOSettings, grpo_loss), "ppo": (rl.PPOSettings, rl.ppo_loss)}[task]
    settings = settings_type(rewards=["test_digits"], group_size=4, max_new_tokens=8, beta=0.1, temperature=1.0)
    torch.manual_seed(0)
    model = load_model(model_config, task)
    if method == "lora":
        lora = METHODS.get("lora")
        model = lora.apply(model, lora.settings(r=4, dropout=0.0), task)
    if task == "ppo":
        rl.add_value_head(model, settings)
    model.train()
    experience = rollout(model, ReferenceModel(model), batch, settings)
    samples = experience["samples"]
    prompts, prompt_length = batch["input_ids"].shape
    rows, completion_length = samples["completion_mask"].shape
    samples["completion_mask"][1, 3:] = 0  # as if its fourth token had been a stop token
    samples["attention_mask"][1, prompt_length + 3:] = 0
    experience["rewards"] = torch.arange(rows, dtype=torch.float32) % 3  # rewards that differ within each group
    assert batch["attention_mask"].sum(-1).unique().numel() == 2
    positions: list[int] = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, output: positions.append(args[0].numel()))
    group_row_hidden = rl.group_row_hidden

    def update(way: str):
        monkeypatch.setattr(rl, "shares_prompts", lambda model, group: way == "cache")
        monkeypatch.setattr(rl, "group_row_hidden", group_row_hidden if way == "row" else lambda *args: None)
        model.zero_grad()
        positions.clear()
        output = loss(model, experience, settings)
        output.loss_sum.backward()
        gradients = [parameter.grad.clone() for parameter in model.parameters() if parameter.requires_grad]
        return output, gradients, list(positions)

    copies, copies_grads, copies_positions = update("copies")
    assert copies_positions == [rows * (prompt_length + completion_length)]
    row_width = prompt_length + settings.group_size * (completion_length - 1)
    expected_positions = {"cache": [prompts * prompt_length, rows * (completion_length - 1)],
                          "row": [prompts * row_width]}
    for way in ("cache", "row", "row with recomputed layers"):
        if way == "row with recomputed layers":
            enable_recompute(model)
            way = "row"
        shared, shared_grads, shared_positions = update(way)
        assert shared_positions == expected_positions[way]
        torch.testing.assert_close(shared.loss_sum, copies.loss_sum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(shared.metrics["kl"], copies.metrics["kl"], rtol=1e-5, atol=1e-6)
        for one, every in zip(shared_grads, copies_grads, strict=True):
            torch.testing.assert_close(one, every, rtol=1e-4, atol=1e-6)
        assert any(gradient.abs().sum() > 0 for gradient in shared_grads)

    monkeypatch.undo()
    assert not rl.shares_prompts(model, settings.group_size) and rl.shares_prompts(model.eval(), settings.group_size)
    model.train()
    assert rl.group_row_hidden(model, samples) is not None  # recomputed layers: each group as one row
    model.model.config._attn_implementation = "eager"
    assert rl.group_row_hidden(model, samples) is None


def test_sampling_draws_each_token_with_its_softmax_probability():
    """CategoricalSample (generate's greedy pick after it) draws token i with probability softmax(scores)_i: the
    frequencies of 20,000 draws are within 5 standard errors of it, a -inf token is never drawn, each row gets one
    token; behind transformers' top-p warper, only the nucleus is drawn, in proportion."""
    from transformers import TopPLogitsWarper

    from tunesmith.objectives.rl import CategoricalSample

    torch.manual_seed(0)
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5]]).expand(1000, -1)
    sampler, draws = CategoricalSample(), 20
    picked = sampler(None, scores.clone())
    assert ((picked == 0).sum(-1) == 1).all() and (picked[picked != 0] == float("-inf")).all()

    def frequencies(processed_scores) -> torch.Tensor:
        tokens = torch.cat([sampler(None, processed_scores.clone()).argmax(-1) for _ in range(draws)])
        return torch.bincount(tokens, minlength=scores.shape[-1]).double() / tokens.numel()

    expected = torch.softmax(scores[0].double(), -1)
    standard_error = (expected * (1 - expected) / (draws * scores.shape[0])).sqrt()
    observed = frequencies(scores)
    assert ((observed - expected).abs() <= 5 * standard_error).all() and observed[4] == 0

    nucleus = TopPLogitsWarper(0.8)(None, scores.clone())  # tokens 0, 1 and 5: 0.56 + 0.21 + 0.13 of the mass
    inside = torch.tensor([True, True, False, False, False, True])
    observed = frequencies(nucleus)
    kept = expected[inside] / expected[inside].sum()
    assert (observed[~inside] == 0).all()
    assert ((observed[inside] - kept).abs() <= 5 * (kept * (1 - kept) / (draws * scores.shape[0])).sqrt()).all()


TINY_ARCHITECTURES = {  # config class, its settings, attention
    "qwen2 (sliding window on)": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 6,
                                                  "max_window_layers": 1}, "sdpa"),
    "mistral (window shorter than the prompt)": ("MistralConfig", {"sliding_window": 4}, "sdpa"),
    "gemma2 (local and global layers, soft-capped logits)": ("Gemma2Config", {"sliding_window": 4, "head_dim": 16},
                                                             "eager"),
    "phi3": ("Phi3Config", {}, "sdpa"),
}


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_the_sampling_cache_samples_what_generates_own_cache_does(architecture, tiny_tokenizer_dir, tmp_path,
                                                                  monkeypatch):
    """The static, prompt-once cache that sampling starts from gives the completions of generate's own cache on
    architectures with sliding-window and hybrid layers (windows shorter than the prompt), greedy and sampled; the
    update does not lay a group out as one row wider than a sliding window."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.objectives import rl
    from tunesmith.objectives.branched_rows import sliding_window

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config_class, extra, attention = TINY_ARCHITECTURES[architecture]
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = load_model(ModelConfig(name=str(tmp_path), attn_implementation=attention), "grpo")
    batch = collate_prompts(prompt_examples(tokenizer, ["Count to 3", "Count to four, slowly and with care"]),
                            tokenizer.pad_token_id)
    assert batch["attention_mask"].sum(-1).unique().numel() == 2  # one prompt is left-padded
    settings = GRPOSettings(rewards=["test_digits"], group_size=3, max_new_tokens=6, temperature=1.0)
    sampling_cache = rl.sampling_cache
    for greedy in (True, False):
        sequences = []
        for cache in (sampling_cache, lambda *args: None):
            monkeypatch.setattr(rl, "sampling_cache", cache)
            torch.manual_seed(0)
            samples = rl.sample_groups(model, batch, settings, greedy=greedy)
            sequences.append(samples["sequences"])
        assert torch.equal(*sequences)
    if sliding_window(model.config) is not None:  # the update's one row a group: not past the window
        samples = rl.sample_groups(model, batch, settings)
        assert rl.group_row_hidden(model, samples) is None
