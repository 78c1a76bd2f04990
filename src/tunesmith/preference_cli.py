"""`tunesmith score` and `tunesmith feedback`: commands of the learning-from-feedback stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tunesmith.errors import DataError, ModelError


def _read_prompts(path: Path) -> list[str]:
    """One prompt per line of a .txt file, or the `prompt`/`question` field of each JSONL record."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            prompt = record.get("prompt") or record.get("question") if isinstance(record, dict) else None
            if not isinstance(prompt, str):
                raise DataError(f"{path}:{number}: needs a string field 'prompt' or 'question'")
            prompts.append(prompt)
        else:
            prompts.append(line)
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def _read_scored_conversations(path: Path) -> tuple[list[dict], list[list[dict]]]:
    """(records, conversations) of a `score` input: `prompt` + `response` strings, or `messages` ending in the reply."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    records, conversations = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: needs a JSON object")
        if isinstance(record.get("messages"), list):
            conversation = record["messages"]
        elif isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
            conversation = [{"role": "user", "content": record["prompt"]},
                            {"role": "assistant", "content": record["response"]}]
        else:
            raise DataError(f"{path}:{number}: needs `prompt` and `response` strings, or `messages`")
        records.append(record)
        conversations.append(conversation)
    if not records:
        raise DataError(f"{path}: no records to score")
    return records, conversations


def register(app: typer.Typer) -> None:
    @app.command()
    def score(
        run: Annotated[Path, typer.Argument(help="A `reward` run directory.")],
        data: Annotated[Path, typer.Argument(help="JSONL: `prompt` + `response`, or `messages` ending in the reply.")],
        output: Annotated[Path | None, typer.Option("--output", "-o", help="Write records with a `score`.")] = None,
    ) -> None:
        """Score responses with a trained reward model (higher is better)."""
        from tunesmith.models import load_run, read_run
        from tunesmith.objectives.reward import score_conversations

        task = read_run(run).task
        if task != "reward":
            raise ModelError(f"{run}: is a {task!r} run; `score` needs a run with task: reward")
        records, conversations = _read_scored_conversations(data)
        model, tokenizer = load_run(run)
        scores = score_conversations(model, tokenizer, conversations)
        if output is not None:
            lines = [json.dumps({**record, "score": value}, ensure_ascii=False)
                     for record, value in zip(records, scores, strict=True)]
            output.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        else:
            for value in scores:
                typer.echo(f"{value:.4f}")

    @app.command()
    def feedback(
        run: Annotated[Path, typer.Argument(help="The run whose model answers the prompts.")],
        prompts: Annotated[Path, typer.Option("--prompts", help="Prompts: a .txt (one per line) or .jsonl file.")],
        out: Annotated[Path | None, typer.Option("--out", help="Preference JSONL; default RUN/feedback.jsonl.")] = None,
        port: Annotated[int, typer.Option(min=0, max=65535, help="Port on 127.0.0.1; 0 picks a free one.")] = 0,
        max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest response.")] = 256,
        temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature of the two responses.")] = 0.8,
    ) -> None:
        """Show two responses per prompt in a local web page and record which one you prefer."""
        from tunesmith.feedback.server import load_or_generate_items, make_server, serve
        from tunesmith.models import read_run
        from tunesmith.objectives import OBJECTIVES

        # Every start-up check comes before the model is loaded and the responses are sampled (minutes).
        task = read_run(run).task
        if task not in OBJECTIVES or OBJECTIVES.get(task).model_kind != "causal_lm":
            raise ModelError(f"{run}: is a {task!r} run, which does not generate text; give a run of a "
                             "generating task (sft, dpo, ...)")
        prompt_list = _read_prompts(prompts)
        out = out or run / "feedback.jsonl"
        if out.is_dir():
            raise DataError(f"--out: {out} is a folder; give a .jsonl file path")
        server, url = make_server([], out, port)
        try:
            items = load_or_generate_items(run, prompt_list, out.with_name(f"{out.stem}-pairs.json"),
                                           max_new_tokens, temperature)
        except BaseException:
            server.server_close()
            raise
        server.app.show(items)
        serve(server, url, out, announce=typer.echo)
