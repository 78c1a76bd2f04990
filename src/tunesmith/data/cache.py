"""Prepared data cached on disk: read, checked and tokenised once, reused by every later run.

A sweep (hyperparameter search, `compare-methods`, a resumed run, the next epoch budget) trains
on the same records many times; only the first run reads and tokenises them. The cache entry is a
JSON file under `$TUNESMITH_CACHE/prepared/`, named by a SHA-256 over everything the prepared
examples depend on: the bytes of every data file the config names, the `data:` section, the task,
the seed (it draws the eval split and the mixture), the tokenizer (its full serialisation, chat
template and special tokens) and the source of tunesmith's data package (so a change in how data is
prepared never serves stale examples). JSON, not pickle: a cache file is data, never code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tunesmith.data.prepare import PreparedData, prepare_data
from tunesmith.files import hash_files, write_file_atomically
from tunesmith.models import cache_dir

DATA_PACKAGE = Path(__file__).parent


def data_files(config) -> list[Path]:
    """Every file or folder the `data:` section reads."""
    data = config.data
    paths = [data.train, data.eval, data.sample_weights]
    for component in data.mixture or []:
        paths += [component.train, component.eval]
    return [path for path in paths if path is not None]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    serialised = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return serialised + json.dumps(special) + (tokenizer.chat_template or "")


def prepared_data_key(config, tokenizer) -> str:
    digest = hashlib.sha256()
    settings = {"task": config.task, "seed": config.train.seed, "data": config.data.model_dump(mode="json")}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    hash_files(sorted(DATA_PACKAGE.glob("*.py")), digest)
    hash_files(data_files(config), digest)
    return digest.hexdigest()[:32]


def prepare_data_cached(config, tokenizer) -> PreparedData:
    """`prepare_data`, served from the cache when the same data was prepared before (`data.cache`).

    Preparing may install a fallback chat template on the tokenizer; the entry stores the template
    so that a cache hit leaves the tokenizer exactly as preparing would have.
    """
    if not config.data.cache:
        return prepare_data(config, tokenizer)
    path = cache_dir() / "prepared" / f"{prepared_data_key(config, tokenizer)}.json"
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        tokenizer.chat_template = stored["chat_template"]
        return PreparedData(stored["train"], stored["eval"], stored["rejects"], stored["stats"],
                            stored["label_names"])
    prepared = prepare_data(config, tokenizer)
    entry = {
        "train": prepared.train, "eval": prepared.eval, "rejects": prepared.rejects, "stats": prepared.stats,
        "label_names": prepared.label_names, "chat_template": tokenizer.chat_template,
    }
    serialised = json.dumps(entry, default=str)  # rejects keep raw fields, written as rejects.jsonl writes them
    write_file_atomically(path, lambda temporary: temporary.write_text(serialised, encoding="utf-8"))
    return prepared
