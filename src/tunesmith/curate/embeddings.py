"""Sentence embeddings for the semantic steps (`semantic_dedup`, `diversity`'s k-means coverage).

The built-in `minilm-l6` is sentence-transformers' all-MiniLM-L6-v2; its sentence embedding is the
mean of the last hidden states over real (non-pad) tokens, L2-normalised (the model's own pooling
config, 1_Pooling and Normalize), so a dot product is the cosine similarity.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=2)
def load_embedder(model: str = "minilm-l6") -> Embedder:
    """One loaded encoder per model name and process, shared by the steps that embed."""
    return Embedder(model)


class Embedder:
    def __init__(self, model: str = "minilm-l6"):
        import torch
        from transformers import AutoModel

        from tunesmith.config import ModelConfig
        from tunesmith.models import default_device, load_tokenizer_from, resolve_model

        config = ModelConfig(name=model, dtype="float32")
        folder = resolve_model(config)
        self.tokenizer = load_tokenizer_from(folder, config)
        self.device = default_device()
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).to(self.device).eval()
        self._torch = torch

    def encode(self, texts: list[str], batch_size: int = 64, max_length: int = 128) -> np.ndarray:
        """(N, D) float32, unit length; texts longer than `max_length` tokens are truncated."""
        torch = self._torch
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                       max_length=max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state  # (B, T, D)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
