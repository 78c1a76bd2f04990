"""Schema and missing values: each record must have the fields its format needs, with policies per
field for what to do when one is missing or empty."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tunesmith.curate.base import RecordFilter, StepContext, StepSettings, register_step, reject
from tunesmith.curate.records import Record, Reject
from tunesmith.data.formats import FORMATS, detect_format, to_canonical
from tunesmith.settings import Section


class FieldPolicy(Section):
    policy: Literal["drop", "default", "copy"] = Field(
        "drop", description="When the field is missing or blank: drop the record, fill `value`, or copy `from`."
    )
    value: Any = Field(None, description="The default for policy `default`.")
    from_field: str | None = Field(None, alias="from", description="The field copied for policy `copy`.")

    @model_validator(mode="after")
    def _complete(self):
        if self.policy == "copy" and not self.from_field:
            raise ValueError("policy 'copy' needs `from: other_field`")
        if self.policy == "default" and self.value is None:
            raise ValueError("policy 'default' needs `value`")
        return self


class SchemaSettings(StepSettings):
    """Required fields per format, missing-value policies, empty responses removed."""

    name: Literal["schema"] = "schema"
    format: Literal["auto", "text", "instruction", "chat", "classification"] = Field(
        "auto", description="Record format; auto detects it per record from the field names."
    )
    columns: dict[str, str] = Field(default_factory=dict, description="tunesmith field -> your column name.")
    fields: dict[str, FieldPolicy] = Field(
        default_factory=dict, description="Per-field policy for missing or blank values, applied before the check."
    )


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


class Schema(RecordFilter):
    def __init__(self, settings: SchemaSettings, context: StepContext):
        self.name, self.settings = settings.name, settings

    def check(self, record: Record) -> Reject | None:
        fields = record.fields
        for field_name, rule in self.settings.fields.items():
            if not _blank(fields.get(field_name)):
                continue
            if rule.policy == "drop":
                return reject(record, self.name, f"field {field_name!r} is missing or empty", field=field_name)
            fill = rule.value if rule.policy == "default" else fields.get(rule.from_field)
            if _blank(fill):
                return reject(record, self.name, f"field {field_name!r} is empty and so is {rule.from_field!r}",
                              field=field_name)
            fields[field_name] = fill
            self.counts[f"filled {field_name}"] += 1
        try:
            fmt = self.settings.format
            if fmt == "auto":
                fmt = detect_format(fields, self.settings.columns)
            # to_canonical is the trainer's own check (required fields, empty replies, roles).
            to_canonical(fields, fmt, self.settings.columns)
        except ValueError as error:
            return reject(record, self.name, str(error), formats=list(FORMATS))
        self.counts[f"format {fmt}"] += 1
        return None


register_step(SchemaSettings, Schema, parallel=True)
