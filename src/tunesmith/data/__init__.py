"""The data layer: read files, detect formats, apply chat templates, tokenise with loss masks.

`prepare_data(config, tokenizer)` is the entry point for training; the parts are usable alone.
"""

from tunesmith.data.formats import TASK_FORMATS, check_task_format, detect_format, to_canonical
from tunesmith.data.inspect import inspect_data
from tunesmith.data.prepare import PreparedData, prepare_data, split_eval, write_rejects
from tunesmith.data.readers import RawRecord, read_records
from tunesmith.data.templates import ensure_chat_template, render_chat
from tunesmith.data.tokenize import (
    IGNORE_INDEX,
    Rejection,
    TokenizedExample,
    tokenize_chat,
    tokenize_chats,
    tokenize_classification,
    tokenize_classifications,
    tokenize_text,
    tokenize_texts,
)

__all__ = [
    "IGNORE_INDEX",
    "TASK_FORMATS",
    "PreparedData",
    "RawRecord",
    "Rejection",
    "TokenizedExample",
    "check_task_format",
    "detect_format",
    "ensure_chat_template",
    "inspect_data",
    "prepare_data",
    "read_records",
    "render_chat",
    "split_eval",
    "to_canonical",
    "tokenize_chat",
    "tokenize_chats",
    "tokenize_classification",
    "tokenize_classifications",
    "tokenize_text",
    "tokenize_texts",
    "write_rejects",
]
