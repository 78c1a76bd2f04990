"""tunesmith: fine-tune a pretrained language model on your data, evaluate it, ship it."""

__version__ = "0.1.0"
