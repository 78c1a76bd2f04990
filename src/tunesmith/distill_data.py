"""`tunesmith distill-data`: sequence-level knowledge distillation data (Kim & Rush 2016, "Sequence-Level
Knowledge Distillation", sec. 3.2).

Word-level distillation (objectives/distill.py) matches the teacher's next-token distribution at each
token of the data's responses; sequence-level distillation instead trains the student, with the plain
sft loss, on the sequences the teacher itself produces. Kim & Rush approximate the teacher's sequence
distribution by its mode, found with beam search; here greedy decoding (the default, temperature 0) is
that approximation with beam width 1, and sampling (temperature > 0) is available for diverse data.

The teacher (a run directory, model folder, .gguf or built-in alias) answers every prompt, in batches
with a KV cache, through `tunesmith.inference.generate`, so prompts see the same chat template as in
`tunesmith generate`. Each answer becomes an sft record that `tunesmith train` reads as it is:

    {"prompt": ..., "response": ..., "source": "prompts.jsonl:12", "teacher": ...}

Prompts come from any data file tunesmith reads (JSONL, JSON, CSV, TSV, Parquet, or a folder of them),
one prompt per record, in the field `prompt`, `question` or `instruction` (or the one `--prompt-field`
names). A prompt the teacher answers with nothing goes to OUTPUT's rejects file with its reason, so
prompts read = records written + rejected. The output is written under a temporary name and renamed
when complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tunesmith.data.readers import read_records
from tunesmith.errors import DataError
from tunesmith.files import write_file_atomically

PROMPT_FIELDS = ("prompt", "question", "instruction")


@dataclass(frozen=True)
class Prompt:
    text: str
    source: str
    """`file:line` of the record the prompt came from."""


@dataclass(frozen=True)
class DistillDataResult:
    output: Path
    written: int
    rejects: Path | None
    """The rejects file (JSONL of {source, reason, prompt}), or None when every prompt was answered."""
    rejected: int


def read_prompts(path: Path, prompt_field: str | None = None, limit: int | None = None) -> list[Prompt]:
    """The prompts of a data file or folder, each with its `file:line`; a DataError naming the file and
    line for an unreadable record or one without a non-empty string prompt."""
    prompts = []
    for record in read_records(path):
        if limit is not None and len(prompts) >= limit:
            break
        if record.fields is None:
            raise DataError(f"{record.source}: {record.error}")
        names = (prompt_field,) if prompt_field else PROMPT_FIELDS
        name = next((name for name in names if name in record.fields), None)
        if name is None:
            wanted = repr(prompt_field) if prompt_field else " or ".join(PROMPT_FIELDS)
            raise DataError(f"{record.source}: no prompt field ({wanted}); name it with --prompt-field")
        text = record.fields[name]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{record.source}: field {name!r} must be a non-empty string")
        prompts.append(Prompt(text, record.source))
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def _progress(console: Console, total: int) -> tuple[Progress, int]:
    progress = Progress(
        TextColumn("[bold]teacher answers"), BarColumn(), TextColumn("{task.completed}/{task.total} prompts"),
        TextColumn("{task.fields[rate]} prompts/s"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )
    return progress, progress.add_task("generate", total=total, rate="-")


def _write_jsonl(records: list[dict], path: Path) -> None:
    """Write under a temporary name, then rename: an interrupted run leaves no partial file behind."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    write_file_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def rejects_path(output: Path) -> Path:
    """OUTPUT's rejects file: answers.jsonl -> answers.rejects.jsonl."""
    return output.with_name(f"{output.stem}.rejects.jsonl")


def distill_data(
    teacher: str,
    prompts_path: Path,
    output: Path,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    system_prompt: str | None = None,
    prompt_field: str | None = None,
    limit: int | None = None,
    console: Console | None = None,
) -> DistillDataResult:
    """Generate the teacher's answer to every prompt and write them as sft records (see the module doc)."""
    from tunesmith.inference import generate
    from tunesmith.models import default_device
    from tunesmith.objectives.distill import load_teacher

    console = console or Console(stderr=True)
    prompts = read_prompts(prompts_path, prompt_field, limit)  # bad input fails before the teacher loads
    model, tokenizer = load_teacher(teacher, default_device(), key="TEACHER")
    records, rejects = [], []
    progress, task = _progress(console, len(prompts))
    started = time.perf_counter()
    with progress:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            answers = generate(model, tokenizer, [prompt.text for prompt in chunk], max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, system_prompt=system_prompt,
                               batch_size=batch_size)
            for prompt, answer in zip(chunk, answers, strict=True):
                if answer:
                    records.append({"prompt": prompt.text, "response": answer, "source": prompt.source,
                                    "teacher": teacher})
                else:  # an empty reply is no sft target (the data layer rejects it)
                    rejects.append({"source": prompt.source, "reason": "the teacher's answer is empty",
                                    "prompt": prompt.text})
            progress.update(task, advance=len(chunk),
                            rate=f"{(start + len(chunk)) / (time.perf_counter() - started):.2f}")
    _write_jsonl(records, output)
    rejected_to = None
    if rejects:
        rejected_to = rejects_path(output)
        _write_jsonl(rejects, rejected_to)
    return DistillDataResult(output, len(records), rejected_to, len(rejects))


def register(app: typer.Typer) -> None:
    @app.command("distill-data")
    def distill_data_command(
        teacher: Annotated[str, typer.Argument(help="The teacher: a run directory, model folder, .gguf or alias.")],
        prompts: Annotated[Path, typer.Option(
            "--prompts", help="Data file or folder with one prompt per record (prompt, question or instruction).")],
        output: Annotated[Path, typer.Option("--output", "-o", help="JSONL of sft records to write.")],
        max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer, in tokens.")] = 256,
        batch_size: Annotated[int, typer.Option(min=1, help="Prompts generated together.")] = 8,
        temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy (Kim & Rush's mode); > 0: sample.")]
        = 0.0,
        top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling, with temperature > 0.")]
        = 1.0,
        system_prompt: Annotated[str | None, typer.Option(help="System message before every prompt.")] = None,
        prompt_field: Annotated[str | None, typer.Option(help="The field holding the prompt (default: auto).")]
        = None,
        limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N prompts.")] = None,
    ) -> None:
        """Sequence-level distillation data: the teacher's answers to PROMPTS as sft records for `tunesmith train`."""
        console = Console(stderr=True)
        result = distill_data(teacher, prompts, output, max_new_tokens, batch_size, temperature, top_p,
                              system_prompt, prompt_field, limit, console)
        rejected = f"; {result.rejected} empty answers in {result.rejects}" if result.rejects else ""
        Console(soft_wrap=True).print(f"wrote {result.written} records to {result.output}{rejected}", highlight=False)
