"""Log-likelihood scoring equals a plain forward pass: shared-context batching and perplexity."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.evaluate import scoring
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


EXACT = {"abs": 1e-5, "rel": 1e-6}
"""1e-5, or float32 rounding of a long continuation's sum (tens of nats), whichever is larger."""


def _few_shot_subjects() -> list[tuple[str, list[str]]]:
    """Three 'subjects' of five items each (own description and solved examples, as k-shot MMLU), single-
    and multi-token choices, and two items that share nothing."""
    items = []
    for subject, (a, b) in {"arithmetic": (2, 3), "doubling": (5, 1), "counting": (7, 4)}.items():
        prefix = f"The following are questions about {subject}.\n\n" + "".join(
            f"Question: what is {a * k} and {b + k}?\nAnswer: {a * k + b + k}\n\n" for k in range(1, 5))
        for k in range(5):
            question = f"Question: what is {a + k}" + " and more" * k + "?\nAnswer:"
            items.append((prefix + question, [" A", " B", " C", f" {a + k} exactly, or near it"]))
    items += [("Nothing shared.\nAnswer:", [" yes", " no"]), ("Also alone", [" A", " B and C"])]
    return items


def test_subject_prefix_cache_runs_once_per_subject_and_equals_uncached_scores(tiny, monkeypatch):
    """k-shot items of one subject share a token prefix: it runs once for the whole subject, its cache
    serves every batch of it (batch 2, five items: three batches), and the scores equal one plain
    forward per choice over the full tokens (EXACT)."""
    model, tokenizer = tiny
    items = _few_shot_subjects()
    prefix_lengths = []
    compute_prefix = scoring._prefix_cache

    def counted(model, prefix, device):
        prefix_lengths.append(len(prefix))
        return compute_prefix(model, prefix, device)

    monkeypatch.setattr(scoring, "_prefix_cache", counted)
    got = score_continuations(model, tokenizer, items, batch_size=2)

    expected_prefixes = []
    for start in range(0, 15, 5):
        contexts = [encode_item(tokenizer, context, choices).context for context, choices in items[start : start + 5]]
        expected_prefixes.append(shared_prefix_length(contexts))
    assert min(expected_prefixes) >= MIN_SHARED_PREFIX
    assert sorted(prefix_lengths) == sorted(expected_prefixes)  # once per subject, never per batch or per item
    for (context, continuations), scores in zip(items, got, strict=True):
        assert scores == pytest.approx(_plain_scores(model, tokenizer, context, continuations), **EXACT)


def test_cached_prefix_scores_equal_scores_without_prefix_sharing(tiny, monkeypatch):
    """The same items through the same batched path with prefix sharing switched off."""
    model, tokenizer = tiny
    items = _few_shot_subjects()
    cached = score_continuations(model, tokenizer, items, batch_size=4)
    monkeypatch.setattr(scoring, "MIN_SHARED_PREFIX", 10**9)  # no group qualifies: every item runs whole
    uncached = score_continuations(model, tokenizer, items, batch_size=4)
    for with_prefix, without in zip(cached, uncached, strict=True):
        assert with_prefix == pytest.approx(without, **EXACT)


def test_sliding_window_model_does_not_share_a_prefix_and_stays_exact(tiny, monkeypatch):
    """A sliding-window layer keeps only the last `sliding_window` keys, so a cached long prefix would not
    equal recomputing it: such models score every context whole."""
    from transformers import MistralConfig, MistralForCausalLM

    _, tokenizer = tiny
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=16)
    model = MistralForCausalLM(config).eval()
    monkeypatch.setattr(scoring, "_prefix_cache", lambda *args: pytest.fail("a sliding-window model shared a prefix"))
    items = _few_shot_subjects()[:3]
    got = score_continuations(model, tokenizer, items, batch_size=1)
    for (context, continuations), scores in zip(items, got, strict=True):
        assert scores == pytest.approx(_plain_scores(model, tokenizer, context, continuations), **EXACT)


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
