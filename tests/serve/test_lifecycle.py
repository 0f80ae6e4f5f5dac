"""Starting, loading, the command line, chat templates, and shutting down."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from blackmamba import generate
from blackmamba.cli import main
from blackmamba.serve import ServeError, ServeOptions
from blackmamba.serve.server import ServerThread, create_app, load_into

from .conftest import INTERVAL, start_server

REPO = Path(__file__).resolve().parents[2]


def test_health_is_503_while_loading_then_200(model_dir):
    app, state = create_app(ServeOptions(model=str(model_dir)), load=False)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 503
        loading = client.post("/v1/completions", json={"prompt": "x"})
        assert loading.status_code == 503 and "loading" in loading.json()["error"]["message"]
        assert client.get("/metrics").status_code == 200  # scrapes work during loading
        load_into(state)
        assert client.get("/health").json() == {"status": "ok"}
        assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).json()["usage"]["total_tokens"]
    assert state.scheduler._thread is not None and not state.scheduler._thread.is_alive()  # stopped at shutdown


def test_a_model_that_fails_to_load_is_reported(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ServeError):
        ServerThread(ServeOptions(model=str(tmp_path), port=0, log_level="critical")).start(timeout=60)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--port", "70000"], "--port"),
        (["--max-batch", "0"], "--max-batch"),
        (["--request-timeout", "0"], "--request-timeout"),
        (["--chat-template", "/nonexistent/template.jinja"], "template"),
    ],
)
def test_cli_rejects_bad_options_with_one_line(capsys, model_dir, args, fragment):
    code, err = run_cli(capsys, "serve", "--model", model_dir, *args)
    assert code == 1 and err.startswith("error:") and err.count("\n") == 1 and fragment in err, err


def test_cli_rejects_a_missing_model_before_listening(capsys, tmp_path):
    code, err = run_cli(capsys, "serve", "--model", tmp_path / "missing", "--port", "0")
    assert code == 1 and err.startswith("error:") and "missing" in err


def test_jinja_chat_template_and_its_errors(tmp_path, model_dir, model, tokenizer):
    template = tmp_path / "chat.jinja"
    template.write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be the user') }}"
        "{% endif %}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    srv = start_server(model_dir, chat_template=str(template))
    try:
        messages = [{"role": "user", "content": "the old river"}, {"role": "assistant", "content": "runs"}]
        rendered = "[user] the old river\n[assistant] runs\n[assistant]"
        ids = httpx.post(srv.url + "/tokenize", json={"messages": messages}).json()["tokens"]
        assert ids == tokenizer.encode(rendered).ids
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        want = generate(model, [ids], 8, eos_token_id=0, prefill_chunk_size=INTERVAL)[0]
        assert r.choices[0].message.content == tokenizer.decode(want)  # no implied stop strings
        bad = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]})
        assert bad.status_code == 400 and "first message must be the user" in bad.json()["error"]["message"]
    finally:
        srv.stop()


def test_shutdown_lets_an_in_flight_stream_finish(model_dir):
    srv = start_server(model_dir, shutdown_timeout=30)
    lines: list[str] = []
    started = threading.Event()

    def read():
        body = {"prompt": "the old", "max_tokens": 150, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    lines.append(line)
                    started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(30)
    url = srv.url
    srv.stop(timeout=60)  # returns once uvicorn has drained its connections
    reader.join(30)
    assert (
        not reader.is_alive()
        and lines[-1] == "data: [DONE]"
        and '"finish_reason":"length"' in lines[-2].replace(" ", "")
    )
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.hostile
def test_blackmamba_serve_command_serves_and_stops_on_sigterm(model_dir):
    port = free_port()
    env = {**os.environ, "BLACKMAMBA_API_KEY": "k"}
    cmd = [sys.executable, "-m", "blackmamba", "serve", "--model", str(model_dir), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("the server did not become healthy in 120 s")
        body = {"prompt": "the old river", "max_tokens": 3}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401  # the key came from the env
        ok = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
        assert "Traceback" not in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
