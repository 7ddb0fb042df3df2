"""Publishing: push (against a local stand-in of the hub API that records every request), the model card,
provenance.json, `abliterate verify`, and token hygiene. Fast and offline: nothing here reaches the hub."""

from __future__ import annotations

import base64
import json
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FAST, one_line_error
from helpers import run_online as run
from huggingface_hub import ModelCard
from tiny_models import build, save_tokenizer

from abliterate.direction.vector import Direction
from abliterate.edit.formats import OutputOptions
from abliterate.errors import PublishError, VerifyError
from abliterate.model.checkpoint import Checkpoint
from abliterate.model.loading import resolve
from abliterate.publish.hub import plan_upload, push
from abliterate.publish.provenance import read_provenance, redacted_argv
from abliterate.publish.verify import verify
from abliterate.publish.write_edited import write_edited
from abliterate.storage.hashing import sha256_file

TOKEN = "hf_fakeTOKEN123abcdefghijklmnopqrstuv"
BASE_CARD = "---\nlicense: llama3.1\nlanguage:\n- en\n- de\ntags:\n- facebook\n---\n# Tiny base model\n"


# --- a stand-in for the hub API ------------------------------------------------------------------------


@dataclass
class Call:
    method: str
    path: str
    authorization: str
    body: Any


@dataclass
class FakeHub:
    """The hub endpoints huggingface_hub's create_repo/upload_folder use, on 127.0.0.1, recording each call.

    `fail` maps "METHOD /path" to status codes answered (in order) before the real answer; `role` is what
    whoami says about the token; `repos` maps existing repo ids to "private"/"public".
    """

    role: str = "write"
    fail: dict[str, list[int]] = field(default_factory=dict)
    repos: dict[str, str] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    committed: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def find(self, method: str, pattern: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and re.fullmatch(pattern, c.path)]

    def answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        for key, codes in self.fail.items():
            if f"{method} {path}".startswith(key) and codes:
                status = codes.pop(0)
                return status, {"error": f"simulated {status}"}
        if method == "GET" and path == "/api/whoami-v2":
            return 200, {"name": "tester", "type": "user", "auth": {"accessToken": {"role": self.role}}}
        if method == "POST" and path == "/api/repos/create":
            repo = f"{body['organization']}/{body['name']}"
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo}"}
            self.repos[repo] = body.get("visibility", "public")
            return 200, {"url": f"{self.endpoint}/{repo}"}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|branch|preupload|commit)/(.+))?", path)
        if match is None or match.group(1) not in self.repos:
            return 404, {"error": "Repository not found"}
        repo, action = match.group(1), match.group(2)
        if method == "GET" and action in (None, "revision"):
            return 200, {"id": repo, "private": self.repos[repo] == "private", "sha": "a" * 40, "siblings": []}
        if method == "POST" and action == "branch":
            return 200, {}
        if method == "POST" and action == "preupload":
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in body["files"]]
            return 200, {"files": files}
        if method == "POST" and action == "commit":
            return 200, self._commit(repo, match.group(3), body)
        return 404, {"error": "not found"}

    def _commit(self, repo: str, revision: str, lines: list[dict[str, Any]]) -> dict[str, str]:
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = [line["value"] for line in lines if line["key"] == "file"]
        for f in files:
            self.committed[f["path"]] = base64.b64decode(f["content"])
        self.commits.append({"revision": revision, "summary": header["summary"], "files": [f["path"] for f in files]})
        return {"commitUrl": f"{self.endpoint}/{repo}/commit/{'b' * 40}", "commitOid": "b" * 40}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            path = self.path.split("?")[0]
            body: Any = None
            if raw and "ndjson" in (self.headers.get("Content-Type") or ""):
                body = [json.loads(line) for line in raw.splitlines() if line.strip()]
            elif raw:
                body = json.loads(raw)
            hub.calls.append(Call(self.command, path, self.headers.get("Authorization") or "", body))
            status, answer = hub.answer(self.command, path, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status >= 400:
                self.send_header("X-Error-Message", answer.get("error", ""))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


# --- helpers -----------------------------------------------------------------------------------------------


def random_direction(path: Path, hidden: int = 32) -> Path:
    Direction(torch.randn(hidden, generator=torch.Generator().manual_seed(3)), layer=1, pos=-1, lang="de").save(path)
    return path


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "llama-chat"
    build("llama", folder, tied=True)
    save_tokenizer(folder)
    (folder / "README.md").write_text(BASE_CARD, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def edited(tiny_chat: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An `apply` output of the tiny model (read-only: tests copy it before changing anything)."""
    tmp = tmp_path_factory.mktemp("edited")
    out = tmp / "tiny-abliterated"
    write_edited(out, tiny_chat, Direction.load(random_direction(tmp / "r.safetensors")),
                 OutputOptions(max_shard_size=40_000))
    return out


@pytest.fixture
def folder(edited: Path, tmp_path: Path) -> Path:
    copy = tmp_path / edited.name
    shutil.copytree(edited, copy)
    return copy


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


# --- push ------------------------------------------------------------------------------------------------


def test_push_creates_a_private_repo_and_uploads_the_folder(hub: FakeHub, folder: Path, token_env: None) -> None:
    (folder / ".notes").write_text("local only")  # hidden files stay home
    plan = plan_upload(folder, "org/tiny-abl")
    url = push(plan, endpoint=hub.endpoint, sleep=Sleeps())
    assert url == f"{hub.endpoint}/org/tiny-abl"
    [create] = hub.find("POST", "/api/repos/create")
    assert create.body["visibility"] == "private" and create.body["organization"] == "org"
    expected = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {".notes"}
    assert set(hub.committed) == expected == {name for name, _ in plan.files}
    assert {"README.md", "abliterate/provenance.json", "abliterate/direction.safetensors"} <= expected
    for name, data in hub.committed.items():
        assert data == (folder / name).read_bytes(), name
    assert all(c.authorization == f"Bearer {TOKEN}" for c in hub.calls)


def test_public_flag_branch_and_message_through_the_cli(hub: FakeHub, folder: Path, tmp_path: Path) -> None:
    env = {"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf-home")}
    done = run("push", folder, "org/tiny-abl", "--public", "--revision", "dev", "--message", "first try", env=env)
    assert done.returncode == 0, done.stderr
    assert "public" in done.stdout and "org/tiny-abl/tree/dev" in done.stdout
    assert hub.repos == {"org/tiny-abl": "public"}
    assert hub.find("POST", "/api/models/org/tiny-abl/branch/dev")
    assert hub.commits[-1]["revision"] == "dev" and hub.commits[-1]["summary"] == "first try"


def test_existing_public_repo_is_not_used_without_public(hub: FakeHub, folder: Path, token_env: None) -> None:
    hub.repos["org/tiny-abl"] = "public"
    with pytest.raises(PublishError, match="already exists and is public") as err:
        push(plan_upload(folder, "org/tiny-abl"), endpoint=hub.endpoint, sleep=Sleeps())
    assert "--public" in err.value.hint
    assert not hub.commits


def test_existing_private_repo_is_reused(hub: FakeHub, folder: Path, token_env: None) -> None:
    hub.repos["org/tiny-abl"] = "private"
    push(plan_upload(folder, "org/tiny-abl"), endpoint=hub.endpoint, sleep=Sleeps())
    assert len(hub.commits) == 1 and hub.repos == {"org/tiny-abl": "private"}


def test_offline_mode_fails_before_any_request(hub: FakeHub, folder: Path, tmp_path: Path) -> None:
    env = {"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    line = one_line_error(run("push", folder, "org/tiny-abl", env=env))
    assert "HF_HUB_OFFLINE" in line and "--dry-run" in line
    assert hub.calls == []


def test_transient_error_is_retried_with_backoff(hub: FakeHub, folder: Path, token_env: None) -> None:
    hub.fail["POST /api/repos/create"] = [503]
    # A failure inside upload_folder that huggingface_hub does not retry itself: the whole call is re-run.
    hub.fail["POST /api/validate-yaml"] = [503]
    sleeps = Sleeps()
    push(plan_upload(folder, "org/tiny-abl"), endpoint=hub.endpoint, sleep=sleeps)
    assert len(hub.find("POST", "/api/repos/create")) == 2
    assert len(hub.find("POST", "/api/validate-yaml")) == 2
    assert len(hub.commits) == 1 and "README.md" in hub.committed
    assert sleeps == [2.0, 2.0]


def test_unreachable_hub_gives_up_after_backoff(folder: Path, token_env: None) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps = Sleeps()
    with pytest.raises(PublishError, match="unreachable") as err:
        push(plan_upload(folder, "org/tiny-abl"), endpoint=f"http://127.0.0.1:{port}", sleep=sleeps)
    assert sleeps == [2.0, 4.0, 8.0, 16.0]
    assert "resumes" in err.value.hint


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ({"fail": {"POST /api/repos/create": [401]}}, "HTTP 401"),
        ({"fail": {"POST /api/repos/create": [403]}}, "HTTP 403"),
        ({"role": "read"}, "read-only"),
        ({"token": None}, "no Hugging Face token"),
    ],
    ids=["401", "403", "read-token", "no-token"],
)
def test_auth_problems_are_one_line_with_the_fix(
    hub: FakeHub, folder: Path, tmp_path: Path, setup: dict[str, Any], needle: str
) -> None:
    hub.fail.update(setup.get("fail", {}))
    hub.role = setup.get("role", "write")
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf-home")}
    if setup.get("token", TOKEN):
        env["HF_TOKEN"] = TOKEN
    line = one_line_error(run("push", folder, "org/tiny-abl", env=env))
    assert needle in line and "hf auth login" in line and "HF_TOKEN" in line and "write" in line
    assert TOKEN not in line
    assert not hub.commits
    assert len(hub.find("POST", "/api/repos/create")) <= 1  # auth errors are not retried


def test_dry_run_lists_files_and_contacts_nothing(hub: FakeHub, folder: Path, tmp_path: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    env = {"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf-home")}
    done = run("push", folder, "org/tiny-abl", "--dry-run", env=env)
    assert done.returncode == 0, done.stderr
    assert hub.calls == []
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before
    assert "org/tiny-abl (private)" in done.stdout and "token: from HF_TOKEN" in done.stdout
    for shard in folder.glob("model-*.safetensors"):
        assert re.search(rf"\d kB\s+{shard.name}", done.stdout), done.stdout
    assert "abliterate/provenance.json" in done.stdout and "README.md  (model card, regenerated)" in done.stdout
    assert "PUBLIC" in run("push", folder, "org/tiny-abl", "--dry-run", "--public", env=env).stdout


def test_bad_repo_id_and_public_without_push_to(tiny_chat: Path, tmp_path: Path) -> None:
    line = one_line_error(run("edit", tiny_chat, "--out", tmp_path / "out", "--push-to", "not a repo", *FAST))
    assert "ORG/NAME" in line
    done = run("edit", tiny_chat, "--out", tmp_path / "out", "--public", *FAST)
    assert done.returncode != 0 and "--push-to" in done.stderr
    assert not (tmp_path / "out").exists()


# --- model card ------------------------------------------------------------------------------------------


def test_card_inherits_base_metadata_and_says_what_was_done(edited: Path) -> None:
    card = ModelCard.load(edited / "README.md")
    assert card.data.license == "llama3.1" and card.data.language == ["en", "de"]
    assert {"facebook", "abliterated", "refusal-direction"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder is no hub id
    text = card.text
    assert "language `de`, layer 1, position -1" in text
    assert "Evaluation was not run" in text and "## Responsible use" in text and "`llama3.1`" in text


def test_card_of_a_hub_source_names_the_base_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--org--tiny-chat" / "snapshots" / sha
    build("qwen2", snapshot)
    (tmp_path / "hub" / "models--org--tiny-chat" / "refs").mkdir(parents=True)
    (tmp_path / "hub" / "models--org--tiny-chat" / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the card fetch fails, softly
    source = resolve("org/tiny-chat")
    out = tmp_path / "out"
    direction = Direction.load(random_direction(tmp_path / "r.safetensors"))
    write_edited(out, source, direction, OutputOptions(max_shard_size=40_000))
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/tiny-chat" and card.data.base_model_relation == "finetune"
    assert "[org/tiny-chat](https://huggingface.co/org/tiny-chat) at revision" in card.text
    record = read_provenance(out)
    assert record.source.kind == "hub" and record.source.revision == sha


def test_push_rerenders_the_card_with_report_and_plots(folder: Path) -> None:
    (folder / "abliterate" / "report.md").write_text(
        "# Evaluation report\n\n| model | refusal |\n| --- | --- |\n| base | 0.95 |\n| edited | 0.03 |\n\n"
        "![refusal](refusal.png)\n",
        encoding="utf-8",
    )
    (folder / "abliterate" / "refusal.png").write_bytes(b"\x89PNG fake")
    (folder / "abliterate" / "kl.png").write_bytes(b"\x89PNG fake")
    card = plan_upload(folder, "org/tiny-abl").card
    assert card is not None and "### Evaluation report" in card and "| edited | 0.03 |" in card
    assert "![refusal](abliterate/refusal.png)" in card and "![kl](abliterate/kl.png)" in card
    assert "Evaluation was not run" not in card and "# tiny-abl" in card
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# my own card\n", encoding="utf-8")
    assert plan_upload(folder, "org/tiny-abl").card is None  # a card without the marker is the user's


# --- provenance and verify ---------------------------------------------------------------------------------


def test_provenance_of_apply(edited: Path, tiny_chat: Path) -> None:
    record = read_provenance(edited).to_data()
    assert record["tool"]["name"] == "abliterate" and record["prompts"] is None
    assert set(record["libraries"]) >= {"torch", "transformers", "safetensors", "huggingface_hub"}
    for name, entry in record["source"]["files"].items():
        assert entry["sha256"] == sha256_file(tiny_chat / name)
    shards = {p.name for p in edited.glob("model-*.safetensors")}
    assert shards <= set(record["output"]["files"]) and "abliterate/direction.safetensors" in record["output"]["files"]
    assert record["edit"]["components"] == {"embedding": 1, "attention": 3, "mlp": 3}


def test_provenance_takes_hub_cache_hashes_from_blob_names(tmp_path: Path, tiny_chat: Path) -> None:
    """A hub snapshot links each file to blobs/SHA256: those weights are identified without being read."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for path in tiny_chat.iterdir():
        if path.is_file():
            digest = sha256_file(path)
            shutil.copy(path, blobs / digest)
            (snapshot / path.name).symlink_to(blobs / digest)
    out = tmp_path / "out"
    write_edited(out, snapshot, Direction.load(random_direction(tmp_path / "r.safetensors")),
                 OutputOptions(max_shard_size=10**9))
    files = read_provenance(out).to_data()["source"]["files"]
    weights = [name for name in files if name.endswith(".safetensors")]
    assert weights and all(files[name]["from"] == "hub cache blob name" for name in weights)
    assert all(files[name]["sha256"] == sha256_file(snapshot / name) for name in files)


def test_redacted_argv() -> None:
    argv = ["edit", "m", "--token", "abc", "--hf-token=xyz", "--out", f"x{TOKEN}", "--message", "hf_" + "x" * 34]
    assert redacted_argv(argv) == [
        "edit",
        "m",
        "--token",
        "<redacted>",
        "--hf-token=<redacted>",
        "--out",
        "x<redacted>",
        "--message",
        "<redacted>",
    ]


@pytest.mark.parametrize(
    ("family", "dtype"),
    [("llama", torch.float32), ("llama", torch.bfloat16), ("gemma2", torch.bfloat16), ("qwen2_moe", torch.float32)],
    ids=["llama-f32", "llama-bf16", "gemma2-bf16", "qwen2_moe-f32"],
)
def test_verify_passes_on_a_fresh_edit_and_catches_an_unedited_tensor(
    tmp_path: Path, family: str, dtype: torch.dtype
) -> None:
    source, out = tmp_path / "source", tmp_path / "out"
    build(family, source, dtype=dtype)
    write_edited(out, source, Direction.load(random_direction(tmp_path / "r.safetensors")),
                 OutputOptions(max_shard_size=40_000))
    report = verify(out)
    assert report.tensors == len(read_provenance(out).edit.tensors) and report.worst < 1.0
    # Put one edited matrix back to its original (same bytes, same size) and re-record the file's hash, so that
    # only the orthogonality check can notice.
    name = "model.layers.1.mlp.down_proj.weight" if family != "qwen2_moe" else "model.layers.1.self_attn.o_proj.weight"
    _restore_tensor(source, out, name)
    with pytest.raises(VerifyError, match=rf"{re.escape(name)}.* not orthogonal"):
        verify(out)


def _restore_tensor(source: Path, out: Path, name: str) -> None:
    original = b"".join(Checkpoint.open(source).iter_raw(name))
    info = Checkpoint.open(out).tensors[name]
    with info.file.open("r+b") as fh:
        fh.seek(info.start)
        fh.write(original)
    path = out / "abliterate" / "provenance.json"
    record = json.loads(path.read_text())
    record["output"]["files"][info.file.name] = {"sha256": sha256_file(info.file), "bytes": info.file.stat().st_size}
    path.write_text(json.dumps(record))


def test_verify_cli_ok_then_fails_after_one_flipped_byte(folder: Path) -> None:
    done = run("verify", folder)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK:") and len(done.stdout.strip().splitlines()) == 1
    info = Checkpoint.open(folder).tensors["model.norm.weight"]  # an unedited tensor: only the hash can tell
    with info.file.open("r+b") as fh:
        fh.seek(info.start + 2)
        byte = fh.read(1)
        fh.seek(info.start + 2)
        fh.write(bytes([byte[0] ^ 0x01]))
    line = one_line_error(run("verify", folder))
    assert info.file.name in line and "xxh3_128 changed since the edit" in line


def test_verify_cli_names_a_replaced_tensor(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    name = "model.layers.0.self_attn.o_proj.weight"
    shard = Checkpoint.open(folder).tensors[name].file
    tensors = load_file(shard)
    tensors[name] = torch.randn_like(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})
    line = one_line_error(run("verify", folder))
    assert name in line and shard.name in line and "not orthogonal" in line


def test_verify_without_provenance(tiny_chat: Path) -> None:
    line = one_line_error(run("verify", tiny_chat))
    assert "provenance.json not found" in line and "abliterate edit" in line


# --- the whole flow with a token in the environment --------------------------------------------------------


@pytest.fixture(scope="module")
def token_runs(tiny_chat: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """edit --push-to, apply, push --dry-run and push -vv, all with HF_TOKEN set, against one fake hub."""
    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tmp = tmp_path_factory.mktemp("token")
    env = {"HF_TOKEN": TOKEN, "HF_ENDPOINT": fake.endpoint, "HF_HOME": str(tmp / "hf-home")}
    edit_out, apply_out = tmp / "edit-out", tmp / "apply-out"
    runs = [
        run("edit", tiny_chat, "--out", edit_out, *FAST, "--push-to", "org/from-edit", env=env),
        run("apply", tiny_chat, "--direction", edit_out, "--out", apply_out, env=env),
        run("push", apply_out, "org/from-apply", "--dry-run", env=env),
        run("-vv", "push", apply_out, "org/from-apply", env=env),
    ]
    yield {"hub": fake, "runs": runs, "tmp": tmp, "edit": edit_out, "apply": apply_out}
    server.shutdown()
    server.server_close()


def test_token_is_never_printed_logged_or_written(token_runs: dict[str, Any]) -> None:
    for done in token_runs["runs"]:
        assert done.returncode == 0, done.stderr
        assert TOKEN not in done.stdout and TOKEN not in done.stderr
    assert "DEBUG" in token_runs["runs"][-1].stderr  # -vv: the libraries' logs were on
    files = [p for p in token_runs["tmp"].rglob("*") if p.is_file()]
    assert any(p.name == "provenance.json" for p in files)
    for path in files:
        assert TOKEN.encode() not in path.read_bytes(), path
    hub: FakeHub = token_runs["hub"]
    assert hub.calls and all(c.authorization == f"Bearer {TOKEN}" for c in hub.calls)  # it was used
    for data in hub.committed.values():
        assert TOKEN.encode() not in data


def test_edit_push_to_uploads_a_verified_checkpoint(token_runs: dict[str, Any]) -> None:
    hub: FakeHub = token_runs["hub"]
    assert hub.repos == {"org/from-edit": "private", "org/from-apply": "private"}
    edit_out: Path = token_runs["edit"]
    assert "pushed" in token_runs["runs"][0].stdout
    files = sorted(p.relative_to(edit_out).as_posix() for p in edit_out.rglob("*") if p.is_file())
    assert hub.commits[0]["files"] == files
    assert run("verify", edit_out).returncode == 0


def test_edit_provenance_records_prompts_selection_and_settings(token_runs: dict[str, Any]) -> None:
    edit_out: Path = token_runs["edit"]
    record = read_provenance(edit_out).to_data()
    candidates = json.loads((edit_out / "abliterate" / "candidates.json").read_text())
    assert record["prompts"]["counts"] == candidates["prompts_after_filter"]
    assert re.fullmatch(r"[0-9a-f]{64}", record["prompts"]["sha256"])
    assert record["prompts"]["source"] == "builtin" and record["prompts"]["lang"] == "en"
    assert record["selection"]["chosen"] == candidates["chosen"]
    assert record["settings"]["n_train"] == 8 and record["command"][:2] == ["abliterate", "edit"]
    assert "abliterate/candidates.json" in record["output"]["files"]
    card = (edit_out / "README.md").read_text()
    assert "refusal score" in card and record["prompts"]["sha256"] in card
