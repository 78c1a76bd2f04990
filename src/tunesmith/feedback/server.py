"""`tunesmith feedback`: a local page that shows two responses per prompt and records which one a person prefers.

Safety: the server binds to 127.0.0.1 only and every request must carry the random token printed in
the URL (403 otherwise). Durability: each vote is one JSON line appended under a lock (a thread lock
and an flock, so two servers on one file also serialise), flushed and fsynced before the reply; an
item already recorded (a double click, a resubmitted form, a restart that reloads the page) is not
written again, because the recorded ids are read back from the files at start.

Output: preferences go to `out` as {"id", "prompt", "chosen", "rejected"} lines, the `preference`
format `dpo` and `reward` train on directly; "both bad" verdicts go to `<out stem>-both-bad.jsonl`
as {"id", "prompt", "responses"} (they hold no preference, so they stay out of the training file).
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import os
import secrets
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from tunesmith.errors import UserError
from tunesmith.filelock import file_lock


@dataclass(frozen=True)
class FeedbackItem:
    prompt: str
    response_a: str
    response_b: str

    @property
    def id(self) -> str:
        """Stable across restarts: a hash of what was shown."""
        text = json.dumps([self.prompt, self.response_a, self.response_b], ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class FeedbackStore:
    """Append-only, at most one record per item id, across threads, processes and restarts."""

    CHOICES = ("a", "b", "both_bad")

    def __init__(self, out: Path):
        self.out = Path(out)
        self.both_bad = self.out.with_name(f"{self.out.stem}-both-bad.jsonl")
        self.lock_path = self.out.with_name(f".{self.out.name}.lock")
        self._lock = threading.Lock()
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def recorded_ids(self) -> set[str]:
        ids = set()
        for path in (self.out, self.both_bad):
            if path.exists():
                for line in path.read_text(encoding="utf-8").splitlines():
                    with contextlib.suppress(json.JSONDecodeError):  # a line cut by a crash mid-write
                        ids.add(json.loads(line).get("id"))
        return ids

    def record(self, item: FeedbackItem, choice: str) -> bool:
        """Write the verdict on `item`; False (and nothing written) when it was already recorded."""
        if choice not in self.CHOICES:
            raise ValueError(f"choice must be one of {', '.join(self.CHOICES)}")
        with self._lock, file_lock(self.lock_path):
            # Read under the lock: another process may have recorded it since we last looked.
            if item.id in self.recorded_ids():
                return False
            if choice == "both_bad":
                path, entry = self.both_bad, {"id": item.id, "prompt": item.prompt,
                                              "responses": [item.response_a, item.response_b]}
            else:
                chosen, rejected = (item.response_a, item.response_b) if choice == "a" else (
                    item.response_b, item.response_a)
                path, entry = self.out, {"id": item.id, "prompt": item.prompt, "chosen": chosen, "rejected": rejected}
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            return True


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tunesmith feedback</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; max-width: 1200px; }}
.pair {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }}
.response {{ border: 1px solid #bbb; border-radius: 6px; padding: 1rem; white-space: pre-wrap; }}
.prompt {{ background: #f4f4f4; padding: 1rem; border-radius: 6px; white-space: pre-wrap; }}
button {{ font-size: 1rem; padding: .5rem 1rem; margin-top: .5rem; }}
</style></head><body>
<h1>Which response is better?</h1>
<p id="progress">{done} of {total} rated</p>
{body}
</body></html>
"""

_ITEM = """<div class="prompt" id="prompt">{prompt}</div>
<form method="post" action="/vote?token={token}">
<input type="hidden" name="id" value="{id}">
<div class="pair">
  <div><div class="response" id="response-a">{a}</div>
    <button name="choice" value="a" id="choose-a">A is better</button></div>
  <div><div class="response" id="response-b">{b}</div>
    <button name="choice" value="b" id="choose-b">B is better</button></div>
</div>
<p><button name="choice" value="both_bad" id="both-bad">Both are bad</button></p>
</form>
"""


class FeedbackApp:
    def __init__(self, items: list[FeedbackItem], store: FeedbackStore, token: str):
        self.store = store
        self.token = token
        self.show(items)

    def show(self, items: list[FeedbackItem]) -> None:
        """The items to rate (set after binding, so a busy port fails before minutes of generation)."""
        self.items = items
        self.by_id = {item.id: item for item in items}

    def page(self) -> str:
        recorded = self.store.recorded_ids()
        pending = [item for item in self.items if item.id not in recorded]
        done = len(self.items) - len(pending)
        if not pending:
            body = '<p id="finished">All prompts are rated. Thank you!</p>'
        else:
            item = pending[0]
            body = _ITEM.format(prompt=html.escape(item.prompt), a=html.escape(item.response_a),
                                b=html.escape(item.response_b), id=item.id, token=html.escape(self.token))
        return _PAGE.format(done=done, total=len(self.items), body=body)


def _handler(app: FeedbackApp):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the terminal for our own messages
            pass

        def _authorised(self) -> bool:
            query = parse_qs(urlparse(self.path).query)
            if secrets.compare_digest(query.get("token", [""])[0], app.token):
                return True
            self.send_error(HTTPStatus.FORBIDDEN, "missing or wrong token")
            return False

        def _send(self, status: HTTPStatus, body: str, content_type: str = "text/html; charset=utf-8"):
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if urlparse(self.path).path != "/":
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            if self._authorised():
                self._send(HTTPStatus.OK, app.page())

        def do_POST(self):
            if urlparse(self.path).path != "/vote" or not self._authorised():
                if urlparse(self.path).path != "/vote":
                    self.send_error(HTTPStatus.NOT_FOUND)
                return
            length = min(int(self.headers.get("Content-Length") or 0), 65536)
            form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
            item = app.by_id.get(form.get("id", [""])[0])
            choice = form.get("choice", [""])[0]
            if item is None or choice not in FeedbackStore.CHOICES:
                self.send_error(HTTPStatus.BAD_REQUEST, "unknown item or choice")
                return
            app.store.record(item, choice)  # a duplicate is acknowledged, not written twice
            self.send_response(HTTPStatus.SEE_OTHER)  # back to the page: the next prompt
            self.send_header("Location", f"/?token={app.token}")
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


def make_server(items: list[FeedbackItem], out: Path, port: int = 0, token: str | None = None):
    """(server, url): a threading HTTP server on 127.0.0.1 (port 0 = any free port), not yet serving.

    `server.app.show(items)` replaces the items later. A port that cannot be bound is a UserError.
    """
    app = FeedbackApp(items, FeedbackStore(out), token or secrets.token_urlsafe(16))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), _handler(app))
    except OSError as error:
        raise UserError(f"--port: cannot listen on 127.0.0.1:{port} ({error.strerror or error}); "
                        "pick another port, or 0 for any free one") from None
    server.app = app
    return server, f"http://127.0.0.1:{server.server_address[1]}/?token={app.token}"


def load_or_generate_items(run_dir: Path, prompts: list[str], cache: Path, max_new_tokens: int = 256,
                           temperature: float = 0.8) -> list[FeedbackItem]:
    """Two sampled responses per prompt from the run's model; kept in `cache` so a restart shows the same pairs."""
    if cache.exists():
        stored = json.loads(cache.read_text(encoding="utf-8"))
        if [entry["prompt"] for entry in stored] == prompts:
            return [FeedbackItem(**entry) for entry in stored]
    from tunesmith.inference import generate
    from tunesmith.models import load_run

    model, tokenizer = load_run(run_dir)
    first = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature)
    second = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature)
    items = [FeedbackItem(prompt, a, b) for prompt, a, b in zip(prompts, first, second, strict=True)]
    temporary = cache.with_suffix(".tmp")
    temporary.write_text(json.dumps([item.__dict__ for item in items], ensure_ascii=False), encoding="utf-8")
    os.replace(temporary, cache)
    return items


def serve(server: ThreadingHTTPServer, url: str, out: Path, announce=print) -> None:
    """Serve a `make_server` server until Ctrl-C."""
    announce(f"feedback page: {url}  (Ctrl-C to stop; votes go to {out})")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
