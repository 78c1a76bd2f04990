"""Log-likelihood scoring equals a plain forward pass: shared-context batching and perplexity."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.evaluate.scoring import (
    MIN_SHARED_PREFIX,
    document_nll,
    encode_item,
    score_continuations,
    shared_prefix_length,
)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def _plain_scores(model, tokenizer, context, continuations):
    encoded = encode_item(tokenizer, context, continuations)
    scores = []
    for continuation in encoded.continuations:
        ids = torch.tensor([encoded.context + continuation])
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
        start = len(encoded.context) - 1
        scores.append(sum(float(logprobs[start + k, token]) for k, token in enumerate(continuation)))
    return scores


def test_shared_context_batched_scores_equal_one_forward_per_choice(tiny):
    model, tokenizer = tiny
    items = [
        ("Natalia sold clips to 48 of her friends. ", ["How many?", "She sold 72 clips in all", "x"]),
        ("Question: what is 2 + 2?\nAnswer:", [" 4", " four, of course", " 5"]),
        ("", ["An empty context is the end-of-text token."]),
        ("Short", [" A", " B", " C", " D"]),
    ]
    got = score_continuations(model, tokenizer, items, batch_size=3)  # mixed lengths, left padding, 2 batches
    for (context, continuations), scores in zip(items, got, strict=True):
        assert scores == pytest.approx(_plain_scores(model, tokenizer, context, continuations), abs=1e-4)
    # lm-eval moves the context's trailing space into the continuation.
    moved = encode_item(tokenizer, "Answer: ", ["4"])
    assert moved.context == tokenizer("Answer:", add_special_tokens=False)["input_ids"]


def test_items_sharing_a_few_shot_prefix_score_as_one_forward_per_choice(tiny):
    """The shared-prefix path (one MMLU subject: description + shots, then the question) equals plain
    forwards, with single- and multi-token continuations and suffixes of different lengths."""
    model, tokenizer = tiny
    shots = "The following are questions about arithmetic.\n\n" + "".join(
        f"Question: what is {a} + {a}?\nAnswer: {2 * a}\n\n" for a in range(1, 6))
    items = [
        (shots + "Question: what is 7 + 7?\nAnswer:", [" 14", " 15", " fourteen, of course"]),
        (shots + "Question: what is 12 + 12, and then 3 + 3?\nAnswer:", [" A", " B"]),
        (shots + "Question: 9?\nAnswer:", [" 18", " nine plus nine is eighteen"]),
        ("Another subject entirely.\nAnswer:", [" yes", " no"]),
    ]
    encoded = [encode_item(tokenizer, context, choices) for context, choices in items[:3]]
    assert shared_prefix_length([e.context for e in encoded]) >= MIN_SHARED_PREFIX
    got = score_continuations(model, tokenizer, items, batch_size=3)
    for (context, continuations), scores in zip(items, got, strict=True):
        assert scores == pytest.approx(_plain_scores(model, tokenizer, context, continuations), abs=1e-4)


def test_perplexity_is_exp_mean_token_nll_and_windows_score_every_token_once(tiny):
    model, tokenizer = tiny
    texts = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. " * 3,
             "A robe takes 2 bolts of blue fiber."]
    totals = document_nll(model, tokenizer, texts, window=512)
    nll, tokens = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        loss = float(model(ids, labels=ids).loss)  # mean NLL over the predicted tokens
        nll += loss * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    assert sum(t for _, t in totals) == tokens
    assert math.exp(sum(n for n, _ in totals) / tokens) == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    sliding = document_nll(model, tokenizer, texts, window=32, stride=16)
    assert [t for _, t in sliding] == [t for _, t in totals]  # same tokens, scored with less context
    assert sliding[1][0] == pytest.approx(totals[1][0], rel=1e-4)  # the short text fits one window
