"""Augmentation (opt-in): new records made by rewriting existing ones with a local causal LM.

Two methods. `paraphrase` asks the model to reword a text, keeping its meaning (prompt-based
paraphrasing as in Kumar et al. 2020, "Data Augmentation using Pre-trained Transformer Models").
`back_translate` asks it to translate the text into a pivot language and the result back into
English (back-translation, Sennrich et al. 2016; used for augmentation by Xie et al. 2020, UDA).

An augmented record is a copy of its source record with the texts of `part` rewritten, placed
right after its source in kept.jsonl and marked `augmented: {method, of: <source>}`; its own
`source` is the source's plus `#<method>-<copy>`. The source record is always kept: this step
removes nothing, and the funnel shows what it added apart from what came in. Later steps see
augmented records like any other, so an exact_dedup after augment drops a "paraphrase" that
only copied its source.
"""

from __future__ import annotations

import copy
import hashlib
import os
from typing import Literal

from pydantic import Field

from tunesmith.curate.base import StepContext, StepOutput, StepSettings, register_step
from tunesmith.curate.records import Part, Record
from tunesmith.errors import ModelError

PARAPHRASE_PROMPT = ("Paraphrase the following text: keep its meaning and every fact, change the wording. "
                     "Reply with the paraphrase only.\n\n{text}")
TRANSLATE_PROMPT = "Translate the following text into {language}. Reply with the translation only.\n\n{text}"


class AugmentSettings(StepSettings):
    """Augmentation (opt-in): paraphrase or back-translate records with a local causal LM you name."""

    name: Literal["augment"] = "augment"
    model: str = Field(description="Causal LM that rewrites: a built-in alias or a local folder (loaded offline).")
    method: Literal["paraphrase", "back_translate"] = Field(
        "paraphrase", description="paraphrase (reword in the same language) or back_translate (via `pivot_language`)."
    )
    pivot_language: str = Field("French", description="Language back_translate goes through.")
    source_language: str = Field("English", description="Language back_translate returns to.")
    part: Part = Field(
        "prompt", description="Which texts are rewritten: prompt (instructions, inputs; the answer stays valid), "
        "response or all."
    )
    copies: int = Field(1, ge=1, le=16, description="Augmented records made from each chosen record.")
    fraction: float = Field(
        1.0, gt=0, le=1, description="Share of records augmented, chosen by a hash of the seed and the record's source."
    )
    max_new_tokens: int = Field(256, ge=1, description="Longest rewrite, in tokens.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature; 0 is greedy (then copies > 1 repeat).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")
    batch_size: int = Field(8, ge=1, description="Prompts generated at once.")
    seed: int = Field(0, description="Seed for choosing records (`fraction`) and for sampling.")


class Augment:
    def __init__(self, settings: AugmentSettings, context: StepContext):
        import torch

        from tunesmith.config import ModelConfig
        from tunesmith.models import load_model, load_tokenizer

        self.name, self.settings = settings.name, settings
        model_config = ModelConfig(name=settings.model)
        try:
            self.tokenizer = load_tokenizer(model_config)
            self.model = load_model(model_config, task="sft").eval()
        except ModelError as error:
            raise ModelError(f"steps.augment.model: {str(error).removeprefix('model.name: ')}") from None
        self.generator = torch.Generator().manual_seed(settings.seed)

    def chosen(self, record: Record) -> bool:
        """Whether `record` is augmented: a hash of the seed and the record's file name and line, so the
        choice depends neither on chunking or order nor on the folder the data sits in."""
        if self.settings.fraction >= 1:
            return True
        where = os.path.basename(record.source)  # "data/train.jsonl:12" -> "train.jsonl:12"
        digest = hashlib.blake2b(f"{self.settings.seed}:{where}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 < self.settings.fraction

    def rewrite(self, texts: list[str]) -> list[str]:
        """Each text rewritten by the method, in order."""
        import torch

        from tunesmith.inference import generate

        s = self.settings
        options = {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                   "batch_size": s.batch_size}
        # Sampling draws from torch's global generator: seeding it from our own generator makes a
        # run repeatable without resetting it to the same state for every chunk.
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
        if s.method == "paraphrase":
            return generate(self.model, self.tokenizer, [PARAPHRASE_PROMPT.format(text=text) for text in texts],
                            **options)
        pivot = generate(self.model, self.tokenizer,
                         [TRANSLATE_PROMPT.format(language=s.pivot_language, text=text) for text in texts], **options)
        return generate(self.model, self.tokenizer,
                        [TRANSLATE_PROMPT.format(language=s.source_language, text=text) for text in pivot], **options)

    def process(self, records: list[Record]) -> StepOutput:
        s = self.settings
        jobs = [(record, number) for record in records if self.chosen(record) and record.texts(s.part)
                for number in range(s.copies)]
        texts = [text for record, _ in jobs for text in record.texts(s.part)]
        rewritten = iter(self.rewrite(texts)) if texts else iter(())
        made: dict[int, list[Record]] = {}
        counts: dict[str, int] = {}
        for record, number in jobs:
            new_texts = [next(rewritten) for _ in record.texts(s.part)]
            if not all(text.strip() for text in new_texts):
                counts["empty rewrites skipped"] = counts.get("empty rewrites skipped", 0) + 1
                continue
            made.setdefault(id(record), []).append(self._augmented(record, number, new_texts))
        output = StepOutput(kept=[])
        for record in records:
            output.kept.append(record)
            output.kept += made.get(id(record), [])
        output.added = sum(len(new) for new in made.values())
        output.counts.update(counts)
        if output.added:
            output.counts[f"records added ({s.method})"] += output.added
        return output

    def _augmented(self, record: Record, number: int, texts: list[str]) -> Record:
        fields = copy.deepcopy(record.fields)
        new = Record(fields, f"{record.source}#{self.settings.method}-{number + 1}", record.index, record.file)
        for (container, key), text in zip(new.slots(self.settings.part), texts, strict=True):
            container[key] = text
        fields["augmented"] = {"method": self.settings.method, "of": record.source}
        return new


register_step(AugmentSettings, Augment, parallel=False)
