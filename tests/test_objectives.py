"""Losses and batches: packed == unpacked, no attention across packed records, exact token sums."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LogitRows
from transformers import AutoModelForCausalLM

from tunesmith.data.collate import (
    IGNORE_INDEX,
    batch_order,
    collate_packed,
    collate_padded,
    pack_examples,
    shift_labels,
)
from tunesmith.objectives import OBJECTIVES
from tunesmith.objectives.base import evaluate
from tunesmith.objectives.causal_lm import CausalLMSettings, causal_lm_loss


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.eval()
    return model


def make_examples(count: int, vocab: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(count):
        length = 5 + 3 * index
        input_ids = torch.randint(5, vocab, (length,), generator=generator).tolist()
        prompt = length // 2  # loss only on the second half, like a reply
        labels = [IGNORE_INDEX] * prompt + input_ids[prompt:]
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples


def test_shift_labels_predicts_next_token_within_record():
    assert shift_labels([IGNORE_INDEX, 7, 8]) == [7, 8, IGNORE_INDEX]


def test_packed_loss_equals_unpacked(tiny_lm):
    examples = make_examples(5, tiny_lm.config.vocab_size)
    padded = collate_padded(examples, pad_id=0)
    packed = collate_packed([examples], pad_id=0)
    with torch.no_grad():
        padded_loss = causal_lm_loss(tiny_lm, padded)
        packed_loss = causal_lm_loss(tiny_lm, packed)
    assert padded_loss.num_loss_tokens == packed_loss.num_loss_tokens
    torch.testing.assert_close(packed_loss.loss_sum, padded_loss.loss_sum, rtol=1e-5, atol=1e-4)


def test_packed_rows_padded_to_a_fixed_length_give_the_same_loss(tiny_lm):
    """train.compile pads packed rows to data.max_length: the extra tail is padding with no targets,
    and a record longer than the length keeps its own longer row."""
    examples = make_examples(4, tiny_lm.config.vocab_size, seed=3)
    rows = [examples[:2], examples[2:]]
    natural = collate_packed(rows, pad_id=0)
    fixed = collate_packed(rows, pad_id=0, length=natural["input_ids"].shape[1] + 7)
    assert fixed["input_ids"].shape[1] == natural["input_ids"].shape[1] + 7
    assert fixed["num_tokens"] == natural["num_tokens"] and fixed["num_loss_tokens"] == natural["num_loss_tokens"]
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(tiny_lm, fixed).loss_sum, causal_lm_loss(tiny_lm, natural).loss_sum,
                                   rtol=1e-5, atol=1e-5)
    assert collate_packed(rows, pad_id=0, length=3)["input_ids"].shape == natural["input_ids"].shape


def test_packed_records_do_not_attend_to_each_other(tiny_lm):
    first, second = make_examples(2, tiny_lm.config.vocab_size, seed=1)
    packed = collate_packed([[first, second]], pad_id=0)
    with torch.no_grad():
        # use_cache=False matters: with a KV cache transformers ignores packed position ids.
        packed_logits = tiny_lm(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits
        alone_logits = tiny_lm(input_ids=torch.tensor([second["input_ids"]]), use_cache=False).logits
    torch.testing.assert_close(packed_logits[0, len(first["input_ids"]) :], alone_logits[0], rtol=1e-5, atol=1e-5)


def test_loss_matches_plain_transformers_mean(tiny_lm):
    """Our summed loss / token count equals the reference cross-entropy on full logits."""
    examples = make_examples(3, tiny_lm.config.vocab_size, seed=2)
    batch = collate_padded(examples, pad_id=0)
    with torch.no_grad():
        ours = causal_lm_loss(tiny_lm, batch)
        logits = tiny_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        reference = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(ours.loss_sum / ours.num_loss_tokens, reference, rtol=1e-5, atol=1e-5)


def test_pack_examples_respects_max_length_and_keeps_every_record():
    examples = make_examples(12, 100)
    rows = pack_examples(examples, max_length=40)
    assert sorted(len(example["input_ids"]) for row in rows for example in row) == sorted(
        len(example["input_ids"]) for example in examples
    )
    assert all(sum(len(example["input_ids"]) for example in row) <= 40 for row in rows)
    assert len(rows) < len(examples)


def test_batch_order_is_seeded_and_independent_of_batch_size():
    lengths = list(range(30))
    assert batch_order(lengths, 4, seed=3, epoch=0, group_by_length=True) == batch_order(
        lengths, 4, seed=3, epoch=0, group_by_length=True
    )
    assert batch_order(lengths, 4, seed=3, epoch=0, group_by_length=True) != batch_order(
        lengths, 4, seed=3, epoch=1, group_by_length=True
    )
    flat8 = [index for batch in batch_order(lengths, 8, 3, 0, False) for index in batch]
    flat2 = [index for batch in batch_order(lengths, 2, 3, 0, False) for index in batch]
    assert flat8 == flat2


def test_length_grouping_reduces_padding():
    lengths = [int(value) for value in torch.randint(4, 400, (400,), generator=torch.Generator().manual_seed(0))]

    def padding(batches):
        return sum(max(lengths[i] for i in batch) * len(batch) - sum(lengths[i] for i in batch) for batch in batches)

    grouped = padding(batch_order(lengths, 8, 0, 0, True))
    random = padding(batch_order(lengths, 8, 0, 0, False))
    assert grouped < random / 4


def test_chunked_loss_equals_one_piece_in_value_and_gradient(tiny_lm):
    from tunesmith.objectives.causal_lm import CausalLMSettings

    examples = make_examples(6, tiny_lm.config.vocab_size, seed=4)
    batch = collate_padded(examples, pad_id=0)
    results = []
    for chunk in (None, 7):
        tiny_lm.zero_grad()
        output = causal_lm_loss(tiny_lm, batch, CausalLMSettings(loss_chunk_tokens=chunk))
        output.loss_sum.backward()
        results.append((output.loss_sum.detach(), [p.grad.clone() for p in tiny_lm.parameters()]))
    assert batch["num_loss_tokens"] > 7 * 3  # several chunks were used
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for chunked, whole in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("wrapped_head", [False, True])
def test_evaluation_in_chunks_equals_the_whole_logits(tiny_lm, wrapped_head):
    """Eval loss and token accuracy over chunks of 7 positions equal those of the whole (N, V) logits, and no
    logits matmul covers more than 7 positions: a plain head through the fused loss, a head with a hook (as an
    adapter makes it) through its own forward, chunk by chunk."""
    vocab = tiny_lm.config.vocab_size
    batches = [collate_padded(make_examples(4, vocab, seed=seed), pad_id=0) for seed in (5, 6)]
    loss_sum, correct, tokens = 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            logits = tiny_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            has_target = batch["targets"] != IGNORE_INDEX
            loss_sum += F.cross_entropy(logits[has_target], batch["targets"][has_target], reduction="sum").item()
            correct += int((logits[has_target].argmax(-1) == batch["targets"][has_target]).sum())
            tokens += int(has_target.sum())
    head = tiny_lm.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, output: None) if wrapped_head else None
    try:
        with LogitRows(vocab) as rows:
            metrics = evaluate(OBJECTIVES.get("sft"), tiny_lm, batches, CausalLMSettings(loss_chunk_tokens=7))
    finally:
        if hook is not None:
            hook.remove()
    assert tokens > 7 * 4 and 0 < rows.most <= 7
    assert metrics["eval_tokens"] == tokens
    assert metrics["token_accuracy"] == correct / tokens
    assert metrics["eval_loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)
