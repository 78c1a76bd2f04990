"""Prompt tuning through peft (Lester et al. 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning"): trained embeddings are prepended to the input; the model is frozen.

`init: text` starts the prompt from the embeddings of a text (repeated to the prompt length),
which the paper (sec. 3.2) finds better than random init, above all for smaller models.
"""

from __future__ import annotations

from typing import Literal

from peft import PromptTuningConfig, PromptTuningInit
from pydantic import Field, model_validator

from tunesmith.methods.base import MethodSettings, MethodSpec, peft_model, peft_task_type, register


class PromptSettings(MethodSettings):
    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(20, ge=1, description="Prompt length in tokens (paper: 20-100).")
    init: Literal["random", "text"] = Field("random", description="Random init, or the embeddings of `init_text`.")
    init_text: str | None = Field(None, description="Text whose token embeddings start the prompt (init: text).")

    @model_validator(mode="after")
    def _text_init_has_text(self):
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs init_text, e.g. 'Classify the sentiment of this review:'")
        return self


def apply_prompt(model, settings: PromptSettings, task: str):
    text_init = settings.init == "text"
    peft_config = PromptTuningConfig(
        task_type=peft_task_type(task),
        num_virtual_tokens=settings.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if text_init else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=settings.init_text if text_init else None,
        # The model's own (local, resolved) folder: tokenizing the init text never goes online.
        tokenizer_name_or_path=model.name_or_path if text_init else None,
    )
    return peft_model(model, peft_config)


# Lester et al. use 0.3 with Adafactor; with AdamW, peft's recipes use 3e-2.
register(
    MethodSpec(
        name="prompt", settings=PromptSettings, apply=apply_prompt, default_lr=3e-2,
        lr_range=(1e-2, 3e-1), saves="adapter",
        supports_packing=False,
    )
)
