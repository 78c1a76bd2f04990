"""The feedback page in headless Chromium: load it, click, the preference lands once; concurrent and repeated
votes on one item write one record; a restart keeps what was recorded."""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from browser import CHROMIUM_FLAGS, chromium

from tunesmith.feedback.server import FeedbackItem, FeedbackStore, make_server

ITEMS = [
    FeedbackItem("What is 2 plus 2?", "2 plus 2 is 4.", "It is 5."),
    FeedbackItem("Name a colour.", "Blue.", "A colour <b>bold</b> & more."),
]


@pytest.fixture
def running(tmp_path):
    server, url = make_server(ITEMS, tmp_path / "prefs.jsonl")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, url, tmp_path / "prefs.jsonl"
    server.shutdown()
    server.server_close()


def vote(url: str, item_id: str, choice: str) -> int:
    parts = urllib.parse.urlparse(url)
    target = f"{parts.scheme}://{parts.netloc}/vote?{parts.query}"
    body = urllib.parse.urlencode({"id": item_id, "choice": choice}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(target, data=body, method="POST")) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def click_in_chromium(url: str, button_id: str) -> str:
    """Open `url` in headless Chromium, click `button_id` through the DevTools protocol, return the new page text."""
    import websocket

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:  # chromium helpers may still be writing
        process = subprocess.Popen(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.time() + 30
            while not (port_file.exists() and port_file.read_text().strip()) and time.time() < deadline:
                time.sleep(0.1)
            port = port_file.read_text().split()[0]
            pages = []
            while not pages and time.time() < deadline:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
                    pages = [page for page in json.load(response) if page["type"] == "page" and "token" in page["url"]]
                time.sleep(0.1)
            socket = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30)

            def evaluate(expression: str, message_id: int):
                socket.send(json.dumps({"id": message_id, "method": "Runtime.evaluate",
                                        "params": {"expression": expression, "returnByValue": True}}))
                while True:
                    reply = json.loads(socket.recv())
                    if reply.get("id") == message_id:
                        return reply["result"]["result"].get("value")

            shown = "document.getElementById('response-a') ? document.getElementById('response-a').textContent : null"
            while evaluate(shown, 1) is None and time.time() < deadline:
                time.sleep(0.1)
            assert evaluate(shown, 2) == ITEMS[0].response_a
            evaluate(f"document.getElementById('{button_id}').click()", 3)
            text = ""
            while "1 of 2 rated" not in text and time.time() < deadline:
                time.sleep(0.1)
                text = evaluate("document.readyState === 'complete' ? document.body.innerText : ''", 4) or ""
            socket.close()
            return text
        finally:
            process.terminate()
            process.wait(timeout=30)


def test_click_in_chromium_records_the_preference(running):
    _, url, out = running
    text = click_in_chromium(url, "choose-b")
    assert "1 of 2 rated" in text and ITEMS[1].prompt in text  # the next prompt is shown
    assert read_lines(out) == [
        {"id": ITEMS[0].id, "prompt": ITEMS[0].prompt, "chosen": ITEMS[0].response_b, "rejected": ITEMS[0].response_a}
    ]


def test_token_is_required_and_html_is_escaped(running):
    _, url, _ = running
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(url.split("?")[0] + "?token=wrong")
    assert error.value.code == 403
    assert urllib.parse.urlparse(url).hostname == "127.0.0.1"
    assert vote(url.replace("token=", "token=x"), ITEMS[0].id, "a") == 403
    vote(url, ITEMS[0].id, "a")
    page = urllib.request.urlopen(url).read().decode()
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; more" in page and "<b>bold</b>" not in page


def test_concurrent_clicks_write_one_record_and_both_bad_goes_aside(running, tmp_path):
    _, url, out = running
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda choice: vote(url, ITEMS[0].id, choice), ["a", "b"] * 8))
    assert all(status in (200, 303) for status in statuses)
    assert len(read_lines(out)) == 1
    vote(url, ITEMS[1].id, "both_bad")
    vote(url, ITEMS[1].id, "a")  # already judged: ignored
    assert len(read_lines(out)) == 1
    both_bad = read_lines(tmp_path / "prefs-both-bad.jsonl")
    assert both_bad == [{"id": ITEMS[1].id, "prompt": ITEMS[1].prompt,
                         "responses": [ITEMS[1].response_a, ITEMS[1].response_b]}]
    assert "All prompts are rated" in urllib.request.urlopen(url).read().decode()


def test_restart_keeps_records_and_refuses_duplicates(tmp_path):
    out = tmp_path / "prefs.jsonl"
    assert FeedbackStore(out).record(ITEMS[0], "a") is True
    with open(out, "a") as handle:
        handle.write('{"id": "cut mid-wri')  # a crash while writing must not break the next start
    restarted = FeedbackStore(out)
    assert ITEMS[0].id in restarted.recorded_ids()
    assert restarted.record(ITEMS[0], "b") is False
    assert restarted.record(ITEMS[1], "b") is True


def test_the_preference_file_trains_dpo(tiny_llama_dir, tmp_path):
    from helpers import run_config

    from tunesmith.data import prepare_data
    from tunesmith.models import load_tokenizer

    out = tmp_path / "prefs.jsonl"
    for item in ITEMS:
        FeedbackStore(out).record(item, "a")
    config = run_config(tiny_llama_dir, out, tmp_path / "run", task="dpo")
    data = prepare_data(config, load_tokenizer(config.model))
    assert data.stats["format"] == "preference" and len(data.train) == 2 and not data.rejects
