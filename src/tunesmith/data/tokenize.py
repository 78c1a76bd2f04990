"""Tokenisation with loss masks.

Labels are unshifted and as long as `input_ids`: `labels[i]` is `input_ids[i]` where the loss is
taken and IGNORE_INDEX (-100) elsewhere; the objective shifts them. For chats the loss covers every
assistant reply of the conversation, each with the end-of-turn token its template closes it with
(`<|im_end|>`, which for SmolLM2 is also eos and pad), so the model learns to stop. The mask is
built from where each reply lies in the rendered text, never by comparing ids to the pad token.

Each function has a batch form (`tokenize_chats`, ...) that the data pipeline uses, so the fast
tokenizer encodes many records per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from tunesmith.data.templates import render_chat

IGNORE_INDEX = -100

# Rendered in place of one reply to find where the template puts a reply's text and what follows it.
_REPLY_PROBE = "TUNESMITH_REPLY_PROBE_5c1e9"


@dataclass
class TokenizedExample:
    """One tokenised record: `labels` for sft/pretrain (same length as input_ids), `label` for classify."""

    input_ids: list[int]
    labels: list[int] | None = None
    label: int | None = None
    truncated: bool = False


@dataclass
class Rejection:
    """A record that cannot become a training example, and why."""

    reason: str


# --- chats -------------------------------------------------------------------------------------


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant reply in it.

    A span runs from the first character of the reply (after the template's `<|im_start|>assistant\\n`
    header, which belongs to the prompt) to the end of the end-of-turn marker the template writes after
    it. Each reply is found by rendering the conversation up to it with a probe string as its content:
    the text before the probe must be a prefix of the full rendering (the template renders earlier
    turns the same way), and what follows the probe is the end-of-turn. This also handles templates
    that inject a default system message, like SmolLM2's. Raises ValueError when a template breaks
    these assumptions.
    """
    text = render_chat(messages, tokenizer)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        probe = render_chat([*messages[:index], {"role": "assistant", "content": _REPLY_PROBE}], tokenizer)
        start = probe.find(_REPLY_PROBE)
        if start < 0 or not text.startswith(probe[:start]):
            raise ValueError("the chat template renders earlier turns differently once a reply follows; "
                             "cannot locate assistant reply")
        end = _reply_end(text, start, message["content"])
        if end is None:
            raise ValueError(f"the chat template rewrites assistant reply {len(spans) + 1}; cannot locate it")
        end_of_turn = _end_of_turn(probe[start + len(_REPLY_PROBE):], tokenizer)
        if text.startswith(end_of_turn, end):
            end += len(end_of_turn)
        spans.append((start, end))
    return text, spans


def _reply_end(text: str, start: int, content: str) -> int | None:
    # Some templates trim replies; accept the content as written or trimmed.
    for written in (content, content.strip(), content.lstrip(), content.rstrip()):
        if written and text.startswith(written, start):
            return start + len(written)
    return None


def _end_of_turn(after_reply: str, tokenizer) -> str:
    """What the template writes after a reply that belongs to it: up to and including eos if it is
    there, else the first special token, else all of it but trailing whitespace (an end-of-turn
    marker that is not a special token)."""
    markers = [tokenizer.eos_token] if tokenizer.eos_token and tokenizer.eos_token in after_reply else [
        token for token in tokenizer.all_special_tokens if token and token in after_reply
    ]
    if markers:
        position, marker = min((after_reply.find(marker), marker) for marker in markers)
        return after_reply[: position + len(marker)]
    return after_reply.rstrip()


def tokenize_chats(
    conversations: list[list[dict]], tokenizer, max_length: int, train_on_prompt: bool = False
) -> list[TokenizedExample | Rejection]:
    """Tokenise many conversations; loss on assistant replies (or every token with train_on_prompt)."""
    results: list[TokenizedExample | Rejection | None] = [None] * len(conversations)
    texts, spans, positions = [], [], []
    for position, messages in enumerate(conversations):
        try:
            if train_on_prompt:  # every token is trained: no need to find the replies
                text, reply_spans = render_chat(messages, tokenizer), []
            else:
                text, reply_spans = assistant_spans(messages, tokenizer)
        except Exception as error:  # jinja raises its own errors for conversations a template refuses
            results[position] = Rejection(f"chat template: {error}")
            continue
        texts.append(text)
        spans.append(reply_spans)
        positions.append(position)
    for position, ids, offsets, reply_spans in zip(
        positions, *_encode_with_offsets(texts, spans, tokenizer), spans, strict=True
    ):
        labels = list(ids) if train_on_prompt else _reply_labels(ids, offsets, reply_spans)
        results[position] = _truncated(ids, labels, max_length)
    return results


def tokenize_chat(
    messages: list[dict], tokenizer, max_length: int, train_on_prompt: bool = False
) -> TokenizedExample | Rejection:
    """Tokenise one conversation: see `tokenize_chats`."""
    return tokenize_chats([messages], tokenizer, max_length, train_on_prompt)[0]


def _reply_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """ids of tokens that overlap a reply span, IGNORE_INDEX elsewhere.

    Overlap, not containment: with a template like `Assistant: {reply}` a byte-level BPE merges the
    space before the reply with its first characters (` 48`); that token is the first one the model
    must produce, so it is trained."""
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # (T, 2): start, end character
    in_reply = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        in_reply |= (bounds[:, 0] < end) & ((bounds[:, 1] > start) | (bounds[:, 0] == start))
    return np.where(in_reply, np.asarray(ids), IGNORE_INDEX).tolist()


def _encode_with_offsets(
    texts: list[str], spans: list[list[tuple[int, int]]], tokenizer
) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids of each text (no special tokens added: chat templates write their own) and the
    character span of each token."""
    if not texts:
        return [], []
    backend = getattr(tokenizer, "backend_tokenizer", None)  # the `tokenizers` object of a fast tokenizer
    if backend is not None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings], [encoding.offsets for encoding in encodings]
    # Slow tokenizers give no offsets: encode the text piece by piece, cut at the reply boundaries.
    all_ids, all_offsets = [], []
    for text, reply_spans in zip(texts, spans, strict=True):
        cuts = sorted({0, len(text), *(edge for span in reply_spans for edge in span)})
        ids, offsets = [], []
        for begin, end in pairwise(cuts):
            piece = tokenizer(text[begin:end], add_special_tokens=False)["input_ids"]
            ids += piece
            offsets += [(begin, end)] * len(piece)
        all_ids.append(ids)
        all_offsets.append(offsets)
    return all_ids, all_offsets


def _truncated(ids: list[int], labels: list[int], max_length: int) -> TokenizedExample | Rejection:
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        if truncated:
            return Rejection(f"no loss token left after truncation to max_length={max_length}")
        return Rejection("no loss token: the record has no token to learn from")
    return TokenizedExample(input_ids=ids, labels=labels, truncated=truncated)


# --- plain text (pretrain) -----------------------------------------------------------------------


def tokenize_texts(texts: list[str], tokenizer, max_length: int) -> list[TokenizedExample | Rejection]:
    """Tokenise documents for causal LM training: the tokenizer's own special tokens (bos where it
    adds one), then eos so each document ends; loss on every token. Longer documents keep their
    beginning."""
    eos = tokenizer.eos_token_id
    results = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []:
        if eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids, eos]
        results.append(_truncated(ids, list(ids), max_length))
    return results


def tokenize_text(text: str, tokenizer, max_length: int) -> TokenizedExample | Rejection:
    """Tokenise one document: see `tokenize_texts`."""
    return tokenize_texts([text], tokenizer, max_length)[0]


# --- classification ------------------------------------------------------------------------------


def tokenize_classifications(
    texts: list[str], label_ids: list[int], tokenizer, max_length: int
) -> list[TokenizedExample]:
    """Tokenise texts for sequence classification, with the tokenizer's special tokens ([CLS] ...
    [SEP] for BERT). Longer texts keep their beginning, and the tokenizer keeps its closing tokens."""
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    too_long = [index for index, ids in enumerate(encoded) if len(ids) > max_length]
    if too_long:
        shortened = tokenizer(
            [texts[index] for index in too_long], add_special_tokens=True, truncation=True, max_length=max_length
        )["input_ids"]
        for index, ids in zip(too_long, shortened, strict=True):
            encoded[index] = ids
    too_long = set(too_long)
    return [
        TokenizedExample(input_ids=ids, label=label, truncated=index in too_long)
        for index, (ids, label) in enumerate(zip(encoded, label_ids, strict=True))
    ]


def tokenize_classification(text: str, label_id: int, tokenizer, max_length: int) -> TokenizedExample:
    """Tokenise one text for classification: see `tokenize_classifications`."""
    return tokenize_classifications([text], [label_id], tokenizer, max_length)[0]
