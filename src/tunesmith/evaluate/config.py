"""The eval suite schema: a suite is a list of tasks, each `target` (what the fine-tune is for) or
`retain` (general ability it must keep). One typed config per task type, documented field by field;
the same schema is the `eval:` section of a run config (`EvalSuiteConfig`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from tunesmith.errors import ConfigError
from tunesmith.settings import parse_yaml

SUITES_DIR = Path(__file__).parent / "suites"
DEFAULT_MMLU_DIR = Path("../shared/data/benchmark/mmlu")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskBase(_Section):
    name: str = Field(description="Task name, unique in the suite (results and report key).")
    role: Literal["target", "retain"] = Field(
        "target", description="target: what the fine-tune is for (learning); retain: what it must keep (forgetting)."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N items (per subject for mmlu).")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")


class PerplexityTask(TaskBase):
    type: Literal["perplexity"]
    data: Path = Field(description="A .txt file (documents separated by blank lines) or a data file with `text_field`.")
    text_field: str = Field("text", description="Column holding the text, for data files.")
    window: int = Field(1024, ge=8, description="Tokens per forward pass (sliding window for longer documents).")
    stride: int | None = Field(
        None, ge=1, description="Window step; each token is scored once with up to window - stride tokens of "
        "earlier context. Default: window (non-overlapping)."
    )


class ClassificationTask(TaskBase):
    type: Literal["classification"]
    data: Path = Field(description="Records with a text and a label column.")
    text_field: str = Field("text", description="Column holding the input text.")
    label_field: str = Field("label", description="Column holding the gold label (a name or an index).")
    labels: list[str] | None = Field(
        None, description="Label names in id order; default: the classify run's labels, else sorted gold labels."
    )
    label_words: dict[str, str] | None = Field(
        None, description="Causal LM only: the continuation scored for each label (default ' <label name>')."
    )
    prompt: str = Field(
        "{text}\nLabel:", description="Causal LM only: context template over the record's fields; the label "
        "word with the highest log-likelihood after it is the prediction."
    )
    group_field: str | None = Field(None, description="Sensitive-attribute column: adds fairness group metrics.")
    positive_label: str | None = Field(
        None, description="Fairness: the favourable label (selection rate, TPR, FPR); default the last label."
    )
    header: Literal["auto", "yes", "no"] = Field("auto", description="CSV/TSV header row.")


class GenerationTask(TaskBase):
    type: Literal["generation"]
    data: Path = Field(description="Records with a prompt and one or more references.")
    prompt_field: str = Field("question", description="Column holding the prompt (sent with the chat template).")
    reference_field: str = Field("answer", description="Column holding the reference (a string or a list).")
    metrics: list[str] = Field(
        default_factory=lambda: ["exact_match"],
        description="Registered metrics: exact_match, bleu, chrf, rouge, or your own (register_text_metric).",
    )
    answer_regex: str | None = Field(
        None, description="exact_match: compare only the first group of this regex, e.g. '#### (.+)' for GSM8K."
    )
    ignore_case: bool = Field(False, description="exact_match: compare case-insensitively.")
    ignore_punctuation: bool = Field(False, description="exact_match: drop punctuation before comparing.")
    rouge_stemmer: bool = Field(False, description="rouge: Porter stemming (rouge-score's use_stemmer).")
    rouge_lsum_split: Literal["newline", "sentences"] = Field(
        "newline", description="rouge: the sentences of rougeLsum. newline: the lines of each text as it is, which "
        "is what rouge-score does; sentences: first one sentence per line (an offline splitter on . ! ? followed "
        "by a capital), as Hugging Face's summarization examples and most papers do with nltk."
    )
    max_new_tokens: int = Field(256, ge=1, description="Most tokens generated per prompt.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy; otherwise sampled with this temperature.")
    stop: list[str] = Field(default_factory=list, description="Cut each output at the first of these strings.")
    system_prompt: str | None = Field(None, description="System message for the chat template.")


class MultipleChoiceTask(TaskBase):
    type: Literal["multiple_choice"]
    data: Path = Field(description="Records with a question, the choices and the gold answer.")
    template: str = Field(
        "{question}\nAnswer:", description="Context template over the record's fields (Python format syntax)."
    )
    choices_field: str | None = Field("choices", description="Column holding the list of choices.")
    choice_fields: list[str] | None = Field(None, description="Or: one column per choice, e.g. [choice0, choice1].")
    answer_field: str = Field("answer", description="Column holding the gold choice (index or the choice text).")
    choice_template: str = Field(
        "{choice}", description="The continuation scored for each choice; a space separates it from the context."
    )
    fewshot_data: Path | None = Field(None, description="Solved examples prepended to each context.")
    shots: int = Field(0, ge=0, description="How many few-shot examples (the first N of fewshot_data).")
    description: str = Field("", description="Text before the few-shot examples.")

    @model_validator(mode="after")
    def _one_choice_source(self):
        if self.choice_fields is None and self.choices_field is None:
            raise ValueError("give choices_field (a list column) or choice_fields (one column per choice)")
        if self.shots and self.fewshot_data is None:
            raise ValueError("shots > 0 needs fewshot_data")
        return self


class MmluTask(TaskBase):
    type: Literal["mmlu"]
    data_dir: Path = Field(DEFAULT_MMLU_DIR, description="Folder with dev/ and test/ CSVs, one per subject.")
    subjects: list[str] | Literal["all"] = Field("all", description="Subjects (file stems without _test), or all.")
    shots: int = Field(5, ge=0, le=5, description="Few-shot examples from the dev split (first N, as lm-eval).")
    split: Literal["test", "dev"] = Field("test", description="Which split is scored.")


class CounterfactualTask(TaskBase):
    type: Literal["counterfactual"]
    pairs: str | list[tuple[str, str]] = Field(
        "gender", description="A shipped list of demographic term pairs (gender, race, religion, age) or your own "
        "[[a, b], ...]."
    )
    templates: list[str] | None = Field(
        None, description="loglik: sentences with a {term} slot; default the shipped templates."
    )
    measures: list[Literal["loglik", "sentiment", "refusal"]] = Field(
        default_factory=lambda: ["loglik"], min_length=1,
        description="Gaps between the two sides of each pair: loglik (of the template sentences), sentiment and "
        "refusal (of the model's answers to the prompts; these generate, greedily).",
    )
    prompts: list[str] | None = Field(
        None, description="sentiment/refusal: prompts with a {term} slot, sent with the chat template; default the "
        "shipped prompts."
    )
    max_new_tokens: int = Field(48, ge=1, description="sentiment/refusal: most tokens generated per answer.")
    system_prompt: str | None = Field(None, description="sentiment/refusal: system message for the chat template.")
    sentiment_model: str | None = Field(
        None, description="sentiment: a classify run dir, model folder or alias scoring 2 P(positive) - 1; default "
        "the shipped lexicon (mean word valence, -1..1)."
    )
    sentiment_positive_label: str | None = Field(
        None, description="sentiment_model: the label that means positive; default its last label."
    )
    refusal_patterns: list[str] | None = Field(
        None, description="refusal: regular expressions (case-insensitive) any of which marks an answer as a "
        "refusal; default the shipped list (probes/terms.yaml)."
    )

    @field_validator("refusal_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str] | None) -> list[str] | None:
        for pattern in patterns or []:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({error})") from None
        return patterns


class EvalSuiteConfig(_Section):
    """A suite: tasks plus how uncertainty is estimated. Also the `eval:` section of a run config."""

    name: str = Field("suite", description="Suite name shown in the report.")
    tasks: list[SerializeAsAny[TaskBase]] = Field(
        min_length=1, description="The tasks, each with a `type` (perplexity, classification, generation, "
        "multiple_choice, mmlu, counterfactual) and a `role`."
    )
    bootstrap_samples: int = Field(1000, ge=0, description="Bootstrap replicates for every CI and paired test.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence level of the intervals.")
    seed: int = Field(0, description="Seed for bootstrap resampling and sampled decoding.")
    samples_shown: int = Field(5, ge=0, description="Items shown side by side per task in the report.")

    @field_validator("tasks", mode="before")
    @classmethod
    def _typed_tasks(cls, tasks: Any) -> Any:
        """Each task is validated by the settings class its `type` registered (tasks.TASKS), so a new
        task type is one registry entry, not an edit to a union here."""
        from tunesmith.evaluate.tasks import TASKS

        if not isinstance(tasks, list):
            return tasks
        typed = []
        for index, task in enumerate(tasks):
            if isinstance(task, TaskBase) or not isinstance(task, dict):
                typed.append(task)
                continue
            kind = task.get("type")
            if kind is None:
                raise ConfigError(f"tasks[{index}]: missing `type` (one of {', '.join(TASKS.names())})")
            settings = TASKS.get(str(kind), key=f"tasks[{index}].type").settings
            try:
                typed.append(settings.model_validate(task))
            except ValidationError as error:
                first = error.errors()[0]
                location = ".".join(str(part) for part in first["loc"])
                raise ConfigError(f"tasks[{index}] ({task.get('name', kind)}).{location}: {first['msg']}") from None
        return typed

    @model_validator(mode="after")
    def _unique_names(self):
        seen: set[str] = set()
        for task in self.tasks:
            if task.name in seen:
                raise ValueError(f"task name {task.name!r} is used twice; names must be unique")
            seen.add(task.name)
        return self


def builtin_suites() -> list[str]:
    return sorted(path.stem for path in SUITES_DIR.glob("*.yaml"))


def load_suite(path_or_name: str | Path, overrides: dict | None = None) -> EvalSuiteConfig:
    """A suite from a YAML file, or a built-in suite by name (`mmlu`, ...)."""
    path = Path(path_or_name)
    if not path.exists():
        builtin = SUITES_DIR / f"{path_or_name}.yaml"
        if not builtin.exists():
            raise ConfigError(f"--suite {path_or_name}: no such file, and not a built-in suite "
                              f"(built-in: {', '.join(builtin_suites())})")
        path = builtin
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if isinstance(raw, list):  # a bare list of tasks is a suite too
        raw = {"tasks": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a suite is a mapping with `tasks:` (or a list of tasks)")
    raw.setdefault("name", path.stem)
    return validate_suite(raw | (overrides or {}), str(path))


def validate_suite(raw: dict, where: str = "suite") -> EvalSuiteConfig:
    try:
        return EvalSuiteConfig.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{where}: {location}: {first['msg']}") from None
