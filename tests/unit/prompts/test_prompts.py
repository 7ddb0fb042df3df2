"""Prompt sources: local files and folders, hf: datasets, the polyrefuse download, and describe()."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import needs
import pytest

from abliterate.errors import DataError
from abliterate.prompts import hf, polyrefuse, sources
from abliterate.prompts.records import KINDS, SPLITS, Prompt, PromptSet
from abliterate.prompts.sources import describe, from_path, load


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(*records: dict[str, object]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _data_error(source: str, default_lang: str = "en") -> DataError:
    with pytest.raises(DataError) as info:
        load(source, default_lang)
    err = info.value
    assert "\n" not in err.one_line(), err.one_line()
    assert err.hint, "every DataError says how to fix it"
    return err


# --- local files -----------------------------------------------------------------------------------------


def test_jsonl_records_get_their_fields_and_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path / "set.jsonl", _jsonl(
        {"id": "a1", "kind": "harmful", "split": "val", "lang": "de", "category": "fraud",
         "instruction": "  Schreibe eine Beispielanfrage  "},
        {"kind": "Harmless ", "instruction": "Write an example request", "category": None},
    ) + "\n")
    got = load(str(path), default_lang="fr").prompts
    assert got[0] == Prompt("a1", "harmful", "val", "de", "Schreibe eine Beispielanfrage", "fraud")
    # No split -> train, no lang -> the default language, no id -> file:line, null category -> "".
    assert got[1] == Prompt("set.jsonl:2", "harmless", "train", "fr", "Write an example request", "")


def test_json_list(tmp_path: Path) -> None:
    path = _write(tmp_path / "set.json", json.dumps([
        {"instruction": "example harmful request", "kind": "harmful", "split": "test"},
        {"instruction": "example harmless request", "kind": "harmless"},
    ]))
    got = from_path(path)
    assert [(p.kind, p.split, p.id) for p in got.prompts] == [
        ("harmful", "test", "set.json[0]"), ("harmless", "train", "set.json[1]")]


def test_csv_with_bom_quoted_newline_and_empty_cells(tmp_path: Path) -> None:
    text = ('instruction,kind,split,lang,id\r\n'
            '"example, with comma",harmful,,,\r\n'
            '"line one\nline two",harmless,val,es,x7\r\n')
    path = tmp_path / "set.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    got = from_path(path).prompts
    assert got[0] == Prompt("set.csv:2", "harmful", "train", "en", "example, with comma")
    assert got[1] == Prompt("x7", "harmless", "val", "es", "line one\nline two")


def test_txt_kind_and_split_from_file_name(tmp_path: Path) -> None:
    _write(tmp_path / "harmful-val.txt", "example harmful request 1\n\nexample harmful request 2\n")
    _write(tmp_path / "my_harmless_prompts.txt", "example harmless request\n")
    _write(tmp_path / "notes.md", "not a prompt file")
    got = load(str(tmp_path), default_lang="nl")
    assert [(p.kind, p.split, p.lang, p.instruction) for p in got.prompts] == [
        ("harmful", "val", "nl", "example harmful request 1"),
        ("harmful", "val", "nl", "example harmful request 2"),
        ("harmless", "train", "nl", "example harmless request"),
    ]
    assert got.instructions("nl", "harmful", "val", limit=1) == ["example harmful request 1"]


def test_instructions_fail_for_a_missing_language(tmp_path: Path) -> None:
    got = from_path(_write(tmp_path / "harmful.txt", "example\n"))
    with pytest.raises(DataError, match="no harmless prompts"):
        got.instructions("en", "harmless", "train")


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.jsonl", "", "is empty"),
    ("blank.jsonl", "\n \n", "is empty"),
    ("empty.json", "[]", "is empty"),
    ("header.csv", "instruction,kind\n", "is empty"),
    ("bad.jsonl", '{"instruction": "x", "kind": "harmful"}\n{"instruction": \n', "bad.jsonl:2: invalid JSON"),
    ("bad.json", '[{"instruction": "x",\n "kind": }]', r"bad.json: invalid JSON \(.* at line 2"),
    ("object.json", '{"instruction": "x", "kind": "harmful"}', "expected a JSON list"),
    ("list.jsonl", '["x"]\n', "expected a JSON object"),
    ("kind.jsonl", _jsonl({"instruction": "x", "kind": "dangerous"}), "'kind' must be harmful or harmless"),
    ("nokind.jsonl", _jsonl({"instruction": "x"}), "'kind' must be harmful or harmless"),
    ("split.jsonl", _jsonl({"instruction": "x", "kind": "harmful", "split": "dev"}), "'split' must be"),
    ("lang.jsonl", _jsonl({"instruction": "x", "kind": "harmful", "lang": "xx"}), "unknown language code"),
    ("noinst.jsonl", _jsonl({"text": "x", "kind": "harmful"}), "missing or empty 'instruction'"),
    ("blankinst.jsonl", _jsonl({"instruction": "  ", "kind": "harmful"}), "missing or empty 'instruction'"),
    ("cols.csv", "prompt,kind\nx,harmful\n", "no 'instruction' column"),
    ("prompts.txt", "x\n", "cannot tell whether its prompts are harmful or harmless"),
    ("prompts.yaml", "x", "unsupported prompt file type"),
])
def test_bad_files_fail_with_one_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = _write(tmp_path / name, content)
    assert re.search(message, str(_data_error(str(path))))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(_jsonl({"instruction": "Écris une requête", "kind": "harmful"}).encode("latin-1"))
    assert "is not UTF-8" in str(_data_error(str(path)))


def test_missing_sources_and_folders(tmp_path: Path) -> None:
    assert "not found" in str(_data_error(str(tmp_path / "nope.jsonl")))
    assert "not found" in str(_data_error("no-such-source"))
    (tmp_path / "empty").mkdir()
    assert "no prompt files in folder" in str(_data_error(str(tmp_path / "empty")))
    with pytest.raises(DataError, match="not found"):
        from_path(tmp_path / "nope.jsonl")


def test_unknown_default_language_is_a_data_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "harmful.txt", "example\n")
    assert "unknown language code 'xx'" in str(_data_error(str(path), default_lang="xx"))


def test_builtin_source() -> None:  # its content is checked in test_data.py
    got = load(" builtin ")
    assert got is sources.builtin()
    assert got.instructions("en", "harmful", "train", limit=2) == [
        p.instruction for p in got.select("en", "harmful", "train")[:2]]


# --- describe --------------------------------------------------------------------------------------------


def _toy_set() -> PromptSet:
    rows = [Prompt(f"{k}-{s}-{i}", k, s, "de", f"{k} {s} {i}", "cat") for k in KINDS
            for s, n in (("train", 4), ("val", 2), ("test", 3)) for i in range(n)]
    return PromptSet("toy", (*rows, Prompt("x", "harmful", "train", "en", "english line")))


def test_describe_counts_and_samples() -> None:
    text = describe(_toy_set(), "de", n_samples=2)
    lines = text.splitlines()
    assert lines[0] == "toy: 18 prompts in German (de)"
    assert lines[3].split() == ["harmful", "4", "2", "3", "9"]
    assert lines[4].split() == ["harmless", "4", "2", "3", "9"]
    assert "english line" not in text
    harmful = lines[lines.index("harmful examples:") + 1:][:2]
    assert [line.split()[0] for line in harmful] == ["harmful-train-0", "harmful-val-0"]
    assert "harmless examples:" in lines


def test_describe_without_samples_and_unknown_language() -> None:
    assert "examples" not in describe(_toy_set(), "de", n_samples=0)
    with pytest.raises(DataError, match="no prompts in language 'ja'") as info:
        describe(_toy_set(), "ja")
    assert "de, en" in info.value.hint


def test_describe_shortens_long_lines() -> None:
    long = PromptSet("s", (Prompt("a", "harmful", "test", "en", "word " * 100),))
    sample = describe(long, "en").splitlines()[-1]
    assert len(sample) < 160 and sample.endswith("…")


# --- hf: -------------------------------------------------------------------------------------------------


@pytest.fixture()
def hf_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    datasets = needs.module("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = tmp_path / "dataset"
    folder.mkdir()
    _write(folder / "train.jsonl", _jsonl(
        {"prompt": "example harmful request 1", "label": 1, "topic": "t1"},
        {"prompt": "example harmless request 1", "label": 0, "topic": "t2"},
    ))
    _write(folder / "test.jsonl", _jsonl({"prompt": "example harmful request 2", "label": 1, "topic": "t1"}))
    return folder


def test_hf_local_folder_maps_splits_kinds_and_columns(hf_folder: Path) -> None:
    got = load(f"hf:{hf_folder}?column=prompt&kind_column=label&lang=de&category_column=topic", "en")
    rows = sorted((p.split, p.kind, p.lang, p.instruction, p.category, p.id) for p in got.prompts)
    assert rows == [
        ("test", "harmful", "de", "example harmful request 2", "t1", "test-0"),
        ("train", "harmful", "de", "example harmful request 1", "t1", "train-0"),
        ("train", "harmless", "de", "example harmless request 1", "t2", "train-1"),
    ]


def test_hf_fixed_kind_one_split_relabelled(hf_folder: Path) -> None:
    got = load(f"hf:{hf_folder}?split=train&as_split=val&kind=harmful", "ja")
    assert {(p.kind, p.split, p.lang) for p in got.prompts} == {("harmful", "val", "ja")}
    assert [p.instruction for p in got.prompts] == ["example harmful request 1", "example harmless request 1"]


@pytest.mark.parametrize(("query", "message"), [
    ("?column=nope&kind=harmful", "no column 'nope' for column= (columns: prompt, label, topic)"),
    ("?kind_column=nope", "no column 'nope' for kind_column="),
    ("?column=prompt", "kind is not given"),
    ("?kind=dangerous", "kind must be harmful or harmless"),
    ("?kind=harmful&kind_column=label", "not both"),
    ("?kind=harmful&lang=xx", "unknown language code 'xx'"),
    ("?kind=harmful&colour=red", "unknown option 'colour'"),
    ("?kind=harmful&kind=harmless", "given twice"),
    ("?kind=harmful&split=validation", "cannot load dataset"),
    ("?kind_column=topic", "cannot read a kind from topic='t1'"),
    ("?kind=harmful&as_split=dev", "as_split must be"),
])
def test_hf_bad_options(hf_folder: Path, query: str, message: str) -> None:
    assert message in str(_data_error(f"hf:{hf_folder}{query}"))


def test_hf_class_label_uses_its_names(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = needs.module("datasets")
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["harmful", "harmless"])})
    table = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}, features=features)
    monkeypatch.setattr(hf, "_load_hf_dataset", lambda *args: {"validation": table})
    got = load("hf:org/name?kind_column=label")
    assert [(p.kind, p.split, p.instruction) for p in got.prompts] == [
        ("harmful", "val", "a"), ("harmless", "val", "b")]


def test_hf_unmapped_split_name_needs_as_split(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = needs.module("datasets")
    table = datasets.Dataset.from_dict({"instruction": ["a"]})
    monkeypatch.setattr(hf, "_load_hf_dataset", lambda *args: {"harmful": table})
    assert "add as_split=" in _data_error("hf:org/name?kind=harmful").hint


@pytest.mark.parametrize(("raised", "message"), [
    ("not_found", "dataset 'org/name' not found"),
    (ConnectionError("Couldn't reach 'org/name' on the Hub (OfflineModeIsEnabled)"), "cannot reach"),
    (ValueError("BuilderConfig 'xx' not found.\nAvailable: ['default']"), "BuilderConfig 'xx' not found."),
])
def test_hf_loader_errors_become_data_errors(
    monkeypatch: pytest.MonkeyPatch, raised: object, message: str
) -> None:
    datasets = needs.module("datasets")
    if raised == "not_found":
        raised = datasets.exceptions.DatasetNotFoundError("Dataset 'org/name' doesn't exist on the Hub")

    def fail(*args: object, **kwargs: object) -> None:
        assert isinstance(raised, BaseException)
        raise raised

    monkeypatch.setattr(datasets, "load_dataset", fail)
    assert message in str(_data_error("hf:org/name?kind=harmful&config=xx"))


def test_hf_bad_names_and_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "names no dataset" in str(_data_error("hf:?kind=harmful"))
    assert "neither a local folder" in str(_data_error("hf:not a/valid name?kind=harmful"))
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    assert "needs the 'datasets' package" in str(_data_error("hf:org/name?kind=harmful"))


# --- polyrefuse ------------------------------------------------------------------------------------------

EXAMPLE_CATEGORIES = ("Harassment/Discrimination", "Malware/Hacking")


def _poly_records(path: str, n: int) -> list[dict[str, object]]:
    """Synthetic records with the fields of the real file at `path` (benign made-up text)."""
    stem = path.rsplit("/", 1)[-1].removesuffix(".json")
    lang = stem.rsplit("_", 1)[-1] if "translated" in stem else "en"
    english = [f"example {stem} request {i}" for i in range(1, n + 1)]
    if stem.startswith(("jailbreakbench_test", "harmful_test")) and lang != "en":
        return [{"instruction": e, "instruction_translated": f"[{lang}] {e}",
                 "category": EXAMPLE_CATEGORIES[i % 2]} for i, e in enumerate(english)]
    if stem.startswith(("jailbreakbench_test", "harmful_test")):  # English: the two fields are equal or
        return [{"instruction": e, "category": EXAMPLE_CATEGORIES[i % 2]}  # the second is missing
                for i, e in enumerate(english)]
    prefix = "" if lang == "en" else f"[{lang}] "
    return [{"instruction": f"{prefix}{e}", "category": None} for e in english]


def _poly_files(langs: tuple[str, ...] = ("de", "en", "zh")) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for lang in langs:
        for test in polyrefuse.TEST_SETS:
            for f in polyrefuse.files_for(lang, test):
                if f.path not in polyrefuse.MISSING:
                    records = _poly_records(f.path, 3 if f.split == "test" else 2)
                    files[f.path] = json.dumps(records, indent=4).encode("utf-8")
    return files


@dataclass
class FileServer:
    """A loopback HTTP server of `files` ({path: bytes}) under /base/, recording the requested paths."""

    files: dict[str, bytes]
    requests: list[str] = field(default_factory=list)
    url: str = ""


@pytest.fixture()
def poly_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    state = FileServer(_poly_files())

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.removeprefix("/base/")
            state.requests.append(path)
            body = state.files.get(path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/base"
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv(polyrefuse.URL_ENV, state.url)
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(polyrefuse, "TIMEOUT_S", 5.0)
    # Pin the sums of the synthetic files, as MANIFEST pins those of the real ones.
    pinned = {path: hashlib.sha256(body).hexdigest() for path, body in state.files.items()}
    monkeypatch.setattr(polyrefuse, "MANIFEST", pinned)
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_polyrefuse_records_and_quirks(poly_server: FileServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="abliterate.prompts.polyrefuse")
    got = load("polyrefuse?lang=de,en,zh", "fr")
    counts = {(lang, kind, split): len(got.select(lang, kind, split))
              for lang in ("de", "en", "zh") for kind in KINDS for split in SPLITS}
    assert counts == {
        (lang, kind, split): (0 if (lang, kind, split) == ("zh", "harmless", "test") else n)
        for lang in ("de", "en", "zh") for kind in KINDS
        for split, n in (("train", 2), ("val", 2), ("test", 3))
    }
    # Translated test files: the translation, never the English `instruction` beside it.
    de_test = got.select("de", "harmful", "test")
    assert de_test[0].instruction == "[de] example harmful_test_translated_de request 1"
    assert [p.category for p in de_test][:2] == list(EXAMPLE_CATEGORIES)
    # English test file without `instruction_translated`: its `instruction`.
    en_test = got.select("en", "harmful", "test")
    assert en_test[0].instruction == "example harmful_test_translated_en request 1"
    # English train/val come from dataset/splits/.
    en_train = got.select("en", "harmless", "train")
    assert en_train[0].instruction == "example harmless_train_200_sampled request 1"
    assert "dataset/splits/harmful_val.json" in poly_server.requests
    # Ids align across languages; null categories become "".
    assert [p.id for p in got.select("de", "harmful", "train")] == ["harmful-train-001", "harmful-train-002"]
    assert [p.id for p in got.select("zh", "harmful", "train")] == ["harmful-train-001", "harmful-train-002"]
    assert {p.category for p in got.select("de", "harmless", "train")} == {""}
    # The missing zh harmless test file is skipped with a warning, and never requested.
    assert "dataset/splits_multi/harmless_test_translated_zh.json" not in poly_server.requests
    assert any("harmless_test_translated_zh" in r.getMessage() for r in caplog.records)
    # Only the default test set: no JailbreakBench files.
    assert not any("jailbreakbench" in r for r in poly_server.requests)


def test_polyrefuse_default_language_and_jailbreakbench(poly_server: FileServer) -> None:
    got = load("polyrefuse?test=jailbreakbench", "de")
    assert got.languages() == ["de"]
    assert all(r.endswith("_de.json") for r in poly_server.requests)
    test = got.select("de", "harmful", "test")
    assert test[0].id == "jailbreakbench-test-001"
    assert test[0].instruction == "[de] example jailbreakbench_test_translated_de request 1"


def test_polyrefuse_second_load_uses_the_cache(poly_server: FileServer, tmp_path: Path) -> None:
    first = load("polyrefuse?lang=de")
    assert len(poly_server.requests) == 6
    assert (tmp_path / "cache" / "polyrefuse" / polyrefuse.COMMIT / "dataset/splits_multi"
            / "harmful_train_translated_de.json").is_file()
    assert load("polyrefuse?lang=de") == first
    assert len(poly_server.requests) == 6


def test_polyrefuse_sha_mismatch_fails_and_caches_nothing(
    poly_server: FileServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bad = "dataset/splits_multi/harmful_val_translated_de.json"
    monkeypatch.setitem(polyrefuse.MANIFEST, bad, "0" * 64)
    err = _data_error("polyrefuse?lang=de")
    assert f"sha256 mismatch for PolyRefuse file {bad}" in str(err)
    assert not (tmp_path / "cache" / "polyrefuse" / polyrefuse.COMMIT / bad).exists()


def test_polyrefuse_unpinned_files_are_trusted_on_first_use(
    poly_server: FileServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="abliterate.prompts.polyrefuse")
    monkeypatch.setattr(polyrefuse, "MANIFEST", dict.fromkeys(polyrefuse.MANIFEST))
    path = "dataset/splits_multi/harmful_train_translated_de.json"
    load("polyrefuse?lang=de")
    assert sum("is not verified" in r.getMessage() for r in caplog.records) == 6
    root = tmp_path / "cache" / "polyrefuse" / polyrefuse.COMMIT
    lock = json.loads((root / polyrefuse.LOCKFILE).read_text(encoding="utf-8"))
    assert lock["files"][path] == hashlib.sha256(poly_server.files[path]).hexdigest()

    # A damaged cache copy is downloaded again and checked against the lockfile.
    (root / path).write_bytes(b"[]")
    assert len(load("polyrefuse?lang=de").select("de", "harmful", "train")) == 2
    assert poly_server.requests.count(path) == 2

    # The server now serves other content: the lockfile catches it.
    poly_server.files[path] = json.dumps([{"instruction": "changed", "category": None}]).encode()
    (root / path).unlink()
    err = _data_error("polyrefuse?lang=de")
    assert "sha256 mismatch" in str(err) and "on first download" in str(err)


def test_polyrefuse_server_down(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a loopback port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv(polyrefuse.URL_ENV, f"http://127.0.0.1:{port}/")
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path))
    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    err = _data_error("polyrefuse?lang=de")
    assert str(err).startswith(f"cannot download http://127.0.0.1:{port}/dataset/")
    assert polyrefuse.URL_ENV in err.hint


def test_polyrefuse_missing_file_on_server(poly_server: FileServer) -> None:
    del poly_server.files["dataset/splits_multi/harmless_val_translated_de.json"]
    assert "HTTP 404" in str(_data_error("polyrefuse?lang=de"))


@pytest.mark.parametrize(("body", "message"), [
    (b'{"instruction": "not a list"}', "expected a JSON list"),
    (b"<html>captive portal</html>", "is not UTF-8 JSON"),
])
def test_polyrefuse_bad_file_content_is_neither_trusted_nor_cached(
    poly_server: FileServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, body: bytes, message: str
) -> None:
    path = "dataset/splits_multi/harmful_train_translated_de.json"
    poly_server.files[path] = body
    monkeypatch.setitem(polyrefuse.MANIFEST, path, None)
    assert message in str(_data_error("polyrefuse?lang=de"))
    root = tmp_path / "cache" / "polyrefuse" / polyrefuse.COMMIT
    assert not (root / path).exists()
    assert not (root / polyrefuse.LOCKFILE).exists()


@pytest.mark.parametrize(("source", "message"), [
    ("polyrefuse?lang=xx", "unknown language code 'xx'"),
    ("polyrefuse?test=advbench", "test must be harmful or jailbreakbench"),
    ("polyrefuse?langs=de", "unknown option 'langs'"),
])
def test_polyrefuse_bad_options(source: str, message: str) -> None:
    assert message in str(_data_error(source))


def test_polyrefuse_bad_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(polyrefuse.URL_ENV, "ftp://mirror.example/")
    assert "is not an http(s):// or file:// URL" in str(_data_error("polyrefuse?lang=de"))


def test_polyrefuse_manifest_covers_every_file() -> None:
    manifest = polyrefuse.MANIFEST
    assert len(manifest) == 14 * 7 - 1  # 14 languages x 7 files, less the missing zh harmless test
    assert "dataset/splits_multi/harmless_test_translated_zh.json" not in manifest
    assert "dataset/splits/harmful_train.json" in manifest
    assert "dataset/splits_multi/harmful_train_translated_en.json" not in manifest
    pinned = [v for v in manifest.values() if v is not None]
    assert len(pinned) == 27 and all(len(v) == 64 and int(v, 16) >= 0 for v in pinned)
