import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from datasetdm.errors import DatasetdmError
from datasetdm.prompts import Prompt, PromptList, TemplatePrompts, read_prompts, write_prompts
from datasetdm.prompts.llm import ChatClient, build_prompt_file, parse_descriptions
from datasetdm.text import plural


def test_templates_are_deterministic_balanced_and_varied():
    classes = ["dog", "cat", "person", "bus"]
    a = TemplatePrompts(classes, seed=3)
    b = TemplatePrompts(classes, seed=3)
    prompts = [a.prompt(i) for i in range(200)]
    assert prompts == [b.prompt(i) for i in range(200)]
    # out of order queries give the same answers (resume, batching)
    assert [a.prompt(i) for i in reversed(range(200))] == prompts[::-1]
    assert [p.text for p in prompts] != [TemplatePrompts(classes, seed=4).prompt(i).text for i in range(200)]
    # every class exactly once per pass of len(classes) ids
    for start in range(0, 200, 4):
        assert sorted(p.classes[0] for p in prompts[start : start + 4]) == sorted(classes)
    texts = [p.text for p in prompts]
    assert all(t.startswith("a photo of ") for t in texts)
    assert any("people" in t for t in texts)  # count variation with irregular plural
    assert any(" and " in t for t in texts)  # pair variation, two classes
    assert any(len(p.classes) == 2 for p in prompts)
    assert len(set(texts)) > 50
    for p in prompts:  # every class the prompt claims is in its text
        for c in p.classes:
            assert c in p.text or plural(c) in p.text


def test_template_errors():
    with pytest.raises(ValueError, match="at least one class"):
        TemplatePrompts([" "])
    with pytest.raises(ValueError, match="unknown prompt variations"):
        TemplatePrompts(["dog"], weights={"sideways": 1})


def test_prompt_file_roundtrip_and_inferred_classes(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# comment\n\na dog and two cats on a sofa\nperson,dog\ta man walking his pet\n\na quiet street\n")
    prompts = read_prompts(path, classes=["dog", "cat", "person"])
    assert prompts == [
        Prompt("a dog and two cats on a sofa", ("dog", "cat")),
        Prompt("a man walking his pet", ("person", "dog")),
        Prompt("a quiet street", ()),
    ]
    out = tmp_path / "out.txt"
    write_prompts(out, prompts)
    assert read_prompts(out) == prompts


def test_prompt_folder_one_file_per_class(tmp_path):
    (tmp_path / "traffic_light.txt").write_text("a red signal at a crossing\n")
    (tmp_path / "dog.txt").write_text("a puppy in the grass\na dog near a traffic light\n")
    prompts = read_prompts(tmp_path, classes=["dog", "traffic light"])
    assert prompts == [
        Prompt("a puppy in the grass", ("dog",)),
        Prompt("a dog near a traffic light", ("dog", "traffic light")),
        Prompt("a red signal at a crossing", ("traffic light",)),
    ]


def test_prompt_file_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetdmError, match="missing.txt: prompt file not found"):
        read_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(DatasetdmError, match="empty.txt: no prompts"):
        read_prompts(empty)
    bad = tmp_path / "bad.txt"
    bad.write_text("a fine line\nunicorn\ta unicorn\n")
    with pytest.raises(DatasetdmError, match=r"bad.txt:2: unknown class 'unicorn'"):
        read_prompts(bad, classes=["dog"])
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetdmError, match="bin.txt: prompt file is not UTF-8"):
        read_prompts(binary)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DatasetdmError, match="no .txt files"):
        read_prompts(folder)


def test_prompt_list_uses_each_prompt_once_per_pass():
    prompts = [Prompt(f"p{i}") for i in range(7)]
    source = PromptList(prompts, seed=1)
    first = [source.prompt(i) for i in range(7)]
    assert sorted(p.text for p in first) == sorted(p.text for p in prompts)
    assert [PromptList(prompts, seed=1).prompt(i) for i in range(7, 14)] == [source.prompt(i) for i in range(7, 14)]


def test_parse_descriptions():
    reply = 'Here are some descriptions:\n1. "A brown dog sleeps on a porch in the sun."\n2) short one\n- A dog runs along a wet beach at dawn.\n\n'
    assert parse_descriptions(reply, min_words=5) == [
        "A brown dog sleeps on a porch in the sun.",
        "A dog runs along a wet beach at dawn.",
    ]


class _FakeChat(BaseHTTPRequestHandler):
    """Speaks the chat-completions protocol; each reply depends on the conversation so far."""

    requests: list = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if body["model"] == "broken":
            self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
            return
        if body["model"] == "garbage":
            self._send(200, {"unexpected": True})
            return
        first = body["messages"][1]["content"]
        cls = re.search(r"contain an? (\w+)", first).group(1)
        round_ = sum(m["role"] == "user" for m in body["messages"])
        # 3 new descriptions a round, one repeat of the previous round, one too short, a preamble
        lines = ["Sure, here they are:"]
        for k in range(3):
            lines.append(f"{k + 1}. A {cls} seen in scene number {round_ * 10 + k} under soft evening light.")
        if round_ > 1:
            lines.append(f"4. a {cls} seen in scene number {(round_ - 1) * 10} under soft evening light")
        lines.append(f"5. A {cls}.")
        self._send(200, {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "\n".join(lines)}, "finish_reason": "stop"}]})

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def chat_server():
    _FakeChat.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeChat)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_llm_prompt_builder_against_local_server(chat_server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", chat_server)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_MODEL", "tiny-llm")
    out = tmp_path / "prompts.txt"
    prompts = build_prompt_file(out, ["dog", "cat"], n=7, min_words=6)
    assert len(prompts) == 14
    assert [p.classes for p in prompts] == [("dog",)] * 7 + [("cat",)] * 7
    assert len({p.text.lower() for p in prompts}) == 14  # the repeated line was dropped
    assert all(len(p.text.split()) >= 6 for p in prompts)
    # 3 new a round -> 3 rounds per class, each a follow-up after the model's own answer
    reqs = _FakeChat.requests
    assert len(reqs) == 6
    assert {r["path"] for r in reqs} == {"/v1/chat/completions"}
    assert {r["auth"] for r in reqs} == {"Bearer sk-test"}
    assert reqs[0]["body"]["model"] == "tiny-llm"
    first = reqs[0]["body"]["messages"][1]["content"]
    assert "7 different descriptions" in first and "at least 6 words" in first
    follow = reqs[1]["body"]["messages"]
    assert [m["role"] for m in follow] == ["system", "user", "assistant", "user"]
    assert follow[3]["content"].startswith("More variation in number")
    assert "4 more" in follow[3]["content"]
    # cached: a second call reads the file and does not ask the model
    assert build_prompt_file(out, ["dog", "cat"], n=7) == prompts
    assert len(_FakeChat.requests) == 6
    assert read_prompts(out, ["dog", "cat"]) == prompts


def test_llm_error_responses(chat_server, tmp_path):
    client = ChatClient(base_url=chat_server, model="broken", api_key="bad", retries=0)
    with pytest.raises(DatasetdmError, match=r"chat/completions: HTTP 401: Incorrect API key provided"):
        build_prompt_file(tmp_path / "p.txt", ["dog"], n=3, client=client)
    assert not (tmp_path / "p.txt").exists()
    client = ChatClient(base_url=chat_server, model="garbage", retries=0)
    with pytest.raises(DatasetdmError, match="not a chat-completions response"):
        client.chat([{"role": "user", "content": "hi"}])
    # nothing listens on port 9 of loopback
    client = ChatClient(base_url="http://127.0.0.1:9/v1", model="m", retries=0, timeout=5)
    with pytest.raises(DatasetdmError, match="cannot reach the chat endpoint"):
        client.chat([{"role": "user", "content": "hi"}])


def test_llm_needs_a_model(monkeypatch):
    monkeypatch.delenv("OPENAI_MODEL", raising=False)
    with pytest.raises(DatasetdmError, match="no model given"):
        ChatClient(base_url="http://127.0.0.1:1")


def test_prompts_command(chat_server, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from datasetdm.generation import cli as generation_cli

    monkeypatch.delenv("OPENAI_MODEL", raising=False)
    app = typer.Typer()
    app.command()(generation_cli.prompts)
    app.command()(generation_cli.view)  # a second command, so typer keeps command names
    out = tmp_path / "p.txt"
    args = ["prompts", "--out", str(out), "--classes", "dog", "--n", "4", "--min-words", "5", "--llm-url", chat_server, "--llm-model", "tiny"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"{out}: 4 prompts" in result.output
    assert len(read_prompts(out)) == 4
    # cached: no model or URL needed any more
    result = CliRunner().invoke(app, ["prompts", "--out", str(out), "--classes", "dog"])
    assert result.exit_code == 0, result.output


def test_classes_in_text_knows_plurals_and_word_boundaries():
    from datasetdm.prompts import classes_in_text

    classes = ["person", "box", "car", "cat"]
    assert classes_in_text("two people in red shirts and three boxes", classes) == ("person", "box")
    assert classes_in_text("A Person next to the cars", classes) == ("person", "car")
    # a class name inside another word is not a mention
    assert classes_in_text("a scattering of boxcars and a category sign", classes) == ()
