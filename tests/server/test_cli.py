"""`pagedserve serve` options (the server itself is exercised in test_openai_api.py)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from pagedserve.server.cli import build_parser, read_chat_template
from tests.server.conftest import MODEL_NAME


def test_serve_parses_its_options(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_API_KEY", "from-env")
    args = build_parser().parse_args(
        ["serve", "some/dir", "--port", "9001", "--served-model-name", "a", "b",
         "--max-waiting-requests", "4", "--max-model-len", "512"])
    assert (args.model, args.host, args.port) == ("some/dir", "127.0.0.1", 9001)
    assert args.served_model_name == ["a", "b"] and args.max_waiting_requests == 4
    assert args.api_key == "from-env" and args.log_level == "info"
    assert build_parser().parse_args(["serve", "--api-key", "k"]).api_key == "k"
    assert args.tool_call_parser == "auto" and args.reasoning_parser is None
    chosen = build_parser().parse_args(["serve", "--tool-call-parser", "mistral"])
    assert chosen.tool_call_parser == "mistral"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--tool-call-parser", "no-such-format"])


def test_async_scheduling_flag_reaches_the_engine_config():
    from pagedserve.engine.config import EngineConfig
    from pagedserve.server.cli import engine_kwargs

    for flags, expected in (([], None), (["--async-scheduling"], True),
                            (["--no-async-scheduling"], False)):
        args = build_parser().parse_args(["serve", *flags])
        assert EngineConfig(**engine_kwargs(args)).async_scheduling is expected


def test_chat_template_override(server, tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(template)
    assert read_chat_template(str(path)) == template == read_chat_template(template)
    with pytest.raises(SystemExit):
        read_chat_template("no/such/file.jinja")
    from pagedserve.server.app import build_app

    client = TestClient(build_app(server.async_engine, [MODEL_NAME], chat_template=template))
    ids = client.post("/tokenize", json={"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}).json()
    text = client.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"]
    assert text == "Hi|Yo|"
