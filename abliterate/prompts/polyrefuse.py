"""The `polyrefuse` prompt source: the PolyRefuse prompts (Wang et al. 2025) at a pinned commit.

This module owns the file table of github.com/mainlp/Multilingual-Refusal at `COMMIT` (which file holds
which language, kind and split, with that repository's quirks), the plain-HTTP download with timeouts,
the sha256 check (against `MANIFEST`, or for files without a pinned sum against a trust-on-first-use
lockfile in the cache), the cache under `$ABLITERATE_CACHE/polyrefuse/` (default
`~/.cache/abliterate/polyrefuse/`), and the mapping of the files' records into `Prompt`s.

Source syntax: `polyrefuse` (the `--lang` language only), `polyrefuse?lang=de,fr` or `polyrefuse?lang=all`,
and `test=jailbreakbench` to take the harmful test split from the JailbreakBench translations. The base URL
can be replaced with `ABLITERATE_POLYREFUSE_URL` (a mirror, or a local server in tests). See docs/data.md.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from abliterate.errors import DataError
from abliterate.prompts.languages import LANGUAGES
from abliterate.prompts.records import Kind, Prompt, PromptSet, Split, language_list, parse_options
from abliterate.storage.atomic import write_atomic, write_json
from abliterate.storage.paths import cache_dir

log = logging.getLogger(__name__)

REPOSITORY = "mainlp/Multilingual-Refusal"
COMMIT = "985169df2a0b1ba56a95c65d5f60e228f12be4a1"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/{REPOSITORY}/{COMMIT}/"
URL_ENV = "ABLITERATE_POLYREFUSE_URL"
TIMEOUT_S = 30.0
MAX_BYTES = 64 * 1024 * 1024
LOCKFILE = "sha256.lock.json"
OPTIONS = ("lang", "test")
TEST_SETS = ("harmful", "jailbreakbench")

# The English train/val files are not in dataset/splits_multi/ but in dataset/splits/, under other names.
# The harmless ones are the 200-prompt samples that the translated harmless files were made from.
ENGLISH_TRAIN_VAL: dict[tuple[str, str], str] = {
    ("harmful", "train"): "dataset/splits/harmful_train.json",
    ("harmful", "val"): "dataset/splits/harmful_val.json",
    ("harmless", "train"): "dataset/splits/harmless_train_200_sampled.json",
    ("harmless", "val"): "dataset/splits/harmless_val_200_sampled.json",
}
# Files the repository lacks at COMMIT: skipped with a warning.
MISSING = frozenset({"dataset/splits_multi/harmless_test_translated_zh.json"})

# sha256 of the files we could read at COMMIT (copies kept by the project maintainers). The others are
# None in MANIFEST and are verified trust-on-first-use (see `_fetch`).
_PINNED_SHA256: dict[str, str] = {
    "dataset/splits_multi/harmful_val_translated_ar.json":
        "c85245ca4e765296b4d1260b522b1e5aae42365c50e068b5f19a2b885a0b066e",
    "dataset/splits_multi/harmful_val_translated_de.json":
        "16608797d56a2da548e39bf00d91c4531c08fba32db199559ce62ecd96d4de6f",
    "dataset/splits_multi/harmful_val_translated_es.json":
        "40daeb148910784786bb2b908448cccbe36a9e4ef25b5722d152ef3bac3ed392",
    "dataset/splits_multi/harmful_val_translated_fr.json":
        "5dbec03e8c1c0954387fb44fcc34705499722cc9f3426c97132b1e9878ce561c",
    "dataset/splits_multi/harmful_val_translated_it.json":
        "31f368c69f8498b7b5cdcb8d9ec34f85de854d4e3546ad4bbe4bbfbd7d330c04",
    "dataset/splits_multi/harmful_val_translated_ja.json":
        "866af95c72498af35aabc7e87eaf24bb0966e20003ee5436722bd9e2d1f8e4f5",
    "dataset/splits_multi/harmful_val_translated_ko.json":
        "87552ebc169e3fdec268c3f8cbc70dd1f44829c9381e36e9df3f6157e7214fb7",
    "dataset/splits_multi/harmful_val_translated_nl.json":
        "09d2ff30b27ef4870660c5ff37b493913b1cc2296defdb15f57c98917eeacc20",
    "dataset/splits_multi/harmful_val_translated_pl.json":
        "163e0a91d2e30074e850bf27148125c586b5dec937d99f362b42bedcd592adf6",
    "dataset/splits_multi/harmful_val_translated_ru.json":
        "03f3b4a16abb591045f12b5e5f6a2cd40e39b6046e380ee96ba601ebfb4d3346",
    "dataset/splits_multi/harmful_val_translated_th.json":
        "f0e9d5fa12db2a505214440479231b2a64c8d054c100656efbadfbbfd5dcc507",
    "dataset/splits_multi/harmful_val_translated_yo.json":
        "e1300f0241441c23232da97f9ec869a31e689accba3af9cea3a88f5bb3fba0b1",
    "dataset/splits_multi/harmful_val_translated_zh.json":
        "2e15349321763e23520000fb1026efd034e06318188dc77d3adf30eb4bb70ad4",
    "dataset/splits_multi/jailbreakbench_test_translated_ar.json":
        "f3d06c7b89ae25fd2a819b2f312043223c97603ba5ce1403b1398a8b3f74119e",
    "dataset/splits_multi/jailbreakbench_test_translated_de.json":
        "b6c1cfc75a7e1af3c6b2a72cb2595924ba76dd8760a778a904c72b48d3cdad60",
    "dataset/splits_multi/jailbreakbench_test_translated_en.json":
        "957816744e246d3399e037002bd1d68f4fbd258a31e4d9e3f48a68756be47510",
    "dataset/splits_multi/jailbreakbench_test_translated_es.json":
        "83010598bec81044195510b83f87c2b4095f41b799432b741f4983f90023541c",
    "dataset/splits_multi/jailbreakbench_test_translated_fr.json":
        "92824168ca53d2b55ed0f896b8fc383d63aaf27fa27f502ef1597472083c964d",
    "dataset/splits_multi/jailbreakbench_test_translated_it.json":
        "1c0e483b7432472030d8fc3395d4ff8cc783915cca90f3fd867935dcb1cb6c88",
    "dataset/splits_multi/jailbreakbench_test_translated_ja.json":
        "7bc22ccd59d7b5b23b0d6bbf274e9ef7ab86d20b6ac8546338921d4eee16aa7c",
    "dataset/splits_multi/jailbreakbench_test_translated_ko.json":
        "10864e86353c820644536f737fe6419c82a238de2a4f8b2dfebe712fafe9fc22",
    "dataset/splits_multi/jailbreakbench_test_translated_nl.json":
        "25e07b58f1853f5043730a10ed54aee6b00f8a0515ea3fcc67299c4232d74399",
    "dataset/splits_multi/jailbreakbench_test_translated_pl.json":
        "6dab10838ab48d9db4eff84734d5da84ff08959ba7dd144cb1a0498c2dde5f81",
    "dataset/splits_multi/jailbreakbench_test_translated_ru.json":
        "dab67f90e54d91c324ae17c156ef7d23ee8c02b615070c3b84ad535b9035e5f7",
    "dataset/splits_multi/jailbreakbench_test_translated_th.json":
        "0a1b971ba490b3e8754a42c92c8309262f4590a97dda662c12bb80b231b5354e",
    "dataset/splits_multi/jailbreakbench_test_translated_yo.json":
        "1f8c4007d1116fec63cd99ba39b14be02d9ce0104c305b01d55c7a8b7826046a",
    "dataset/splits_multi/jailbreakbench_test_translated_zh.json":
        "477c22d320be6272d1d4cfce9faf18b990466f08e5d35e304c0badff62855a23",
}


@dataclass(frozen=True)
class PolyFile:
    """One PolyRefuse file: where it is in the repository and what its records are."""

    path: str
    stem: str  # harmful, harmless or jailbreakbench
    kind: Kind
    split: Split
    lang: str


def file_for(stem: str, split: Split, lang: str) -> PolyFile:
    """The file of one (stem, split, lang), e.g. ("harmful", "val", "de")."""
    path = ENGLISH_TRAIN_VAL.get((stem, split)) if lang == "en" else None
    kind: Kind = "harmless" if stem == "harmless" else "harmful"
    path = path or f"dataset/splits_multi/{stem}_{split}_translated_{lang}.json"
    return PolyFile(path, stem, kind, split, lang)


def files_for(lang: str, test: str = "harmful") -> list[PolyFile]:
    """The six files that make one language's harmful/harmless train/val/test prompts."""
    harmful_test = "jailbreakbench" if test == "jailbreakbench" else "harmful"
    return [
        file_for("harmful", "train", lang), file_for("harmful", "val", lang),
        file_for(harmful_test, "test", lang),
        file_for("harmless", "train", lang), file_for("harmless", "val", lang),
        file_for("harmless", "test", lang),
    ]


def _all_paths() -> list[str]:
    paths = {f.path for lang in LANGUAGES for test in TEST_SETS for f in files_for(lang, test)}
    return sorted(paths - MISSING)


# Every file the source can download: {repository path: pinned sha256, or None (trust on first use)}.
MANIFEST: dict[str, str | None] = {path: _PINNED_SHA256.get(path) for path in _all_paths()}


def cache_root() -> Path:
    """Where the downloaded files and the lockfile live: one folder per pinned commit."""
    return cache_dir() / "polyrefuse" / COMMIT


def base_url() -> str:
    url = os.environ.get(URL_ENV, "").strip() or DEFAULT_BASE_URL
    if not url.startswith(("https://", "http://", "file://")):
        raise DataError(f"{URL_ENV}={url!r} is not an http(s):// or file:// URL",
                        hint=f"unset it to use {DEFAULT_BASE_URL}")
    return url.rstrip("/") + "/"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_LOCK_HINT = "delete it; the files are then trusted again on their next download"


class Lockfile:
    """The trust-on-first-use sums: {repository path: sha256} of files that MANIFEST does not pin."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sums: dict[str, str] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise DataError(f"cannot read the PolyRefuse lockfile {path} ({err})",
                                hint=_LOCK_HINT) from None
            files = data.get("files") if isinstance(data, dict) else None
            if not isinstance(files, dict):
                raise DataError(f"the PolyRefuse lockfile {path} has no 'files' table", hint=_LOCK_HINT)
            self.sums = {str(k): str(v) for k, v in files.items()}

    def record(self, repo_path: str, digest: str) -> None:
        self.sums[repo_path] = digest
        write_json(self.path, {"commit": COMMIT, "files": dict(sorted(self.sums.items()))})


def _download(url: str) -> bytes:
    log.info("downloading %s", url)
    request = urllib.request.Request(url, headers={"User-Agent": "abliterate"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            data: bytes = response.read(MAX_BYTES + 1)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 404:
            raise DataError(f"PolyRefuse file not found at {url} (HTTP 404)",
                            hint=f"check {URL_ENV}; the default base is {DEFAULT_BASE_URL}") from None
        raise DataError(f"cannot download {url}: HTTP {err.code} {err.reason}",
                        hint=f"retry later, or set {URL_ENV} to a mirror") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise DataError(f"cannot download {url} ({reason})",
                        hint=f"check the network or set {URL_ENV} to a mirror; "
                             f"files already cached in {cache_root()} work offline") from None
    if len(data) > MAX_BYTES:
        raise DataError(f"{url} is larger than {MAX_BYTES // 2**20} MiB", hint=f"check {URL_ENV}")
    return data


def _records(repo_path: str, data: bytes) -> list[object]:
    """A file's JSON list of records; checked before a file is trusted or cached."""
    try:
        records = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"PolyRefuse file {repo_path} is not UTF-8 JSON ({err})",
                        hint=f"check {URL_ENV}; the files of {REPOSITORY} are JSON lists") from None
    if not isinstance(records, list):
        raise DataError(f"PolyRefuse file {repo_path}: expected a JSON list of records",
                        hint=f"check {URL_ENV}; the files of {REPOSITORY} are JSON lists")
    return records


def _fetch(repo_path: str, url: str, root: Path, lock: Lockfile) -> list[object]:
    """The records of one file: from the cache if its sum checks out, else downloaded, verified, cached."""
    pinned = MANIFEST.get(repo_path)
    expected = pinned or lock.sums.get(repo_path)
    target = root / repo_path
    if target.is_file():
        data = target.read_bytes()
        digest = _sha256(data)
        if expected is None:  # cached, but the lockfile lost its entry: trust the cached copy again
            records = _records(repo_path, data)
            log.warning("PolyRefuse file %s is not verified: no pinned sha256; recording %s in %s",
                        repo_path, digest, lock.path)
            lock.record(repo_path, digest)
            return records
        if digest == expected:
            return _records(repo_path, data)
        log.warning("cached %s does not match its sha256; downloading it again", target)
    data = _download(url + repo_path)
    digest = _sha256(data)
    if expected is not None and digest != expected:
        where = "pinned in abliterate" if pinned else f"recorded in {lock.path} on first download"
        raise DataError(
            f"sha256 mismatch for PolyRefuse file {repo_path}: got {digest[:16]}…, "
            f"expected {expected[:16]}… as {where}",
            hint=f"the download or the mirror at {url} serves other content; retry, or check {URL_ENV}",
        )
    records = _records(repo_path, data)
    if expected is None:
        log.warning("PolyRefuse file %s is not verified: abliterate pins no sha256 for it; recorded %s in %s "
                    "and later runs check against it", repo_path, digest, lock.path)
        lock.record(repo_path, digest)
    write_atomic(target, data)
    return records


def _prompts(file: PolyFile, records: list[object]) -> list[Prompt]:
    """Map one file's records: `instruction_translated` where a record has that key, else `instruction`."""
    prompts: list[Prompt] = []
    empty = 0
    for n, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise DataError(f"PolyRefuse file {file.path}[{n - 1}]: expected an object",
                            hint=f"check {URL_ENV}; the files of {REPOSITORY} hold objects")
        # Files with an English `instruction` next to `instruction_translated` must not fall back to English.
        text = record.get("instruction_translated" if "instruction_translated" in record else "instruction")
        if not isinstance(text, str) or not text.strip():
            empty += 1
            continue
        category = record.get("category")
        prompts.append(Prompt(
            id=f"{file.stem}-{file.split}-{n:03d}", kind=file.kind, split=file.split, lang=file.lang,
            instruction=text.strip(), category="" if category is None else str(category),
        ))
    if empty:
        log.warning("PolyRefuse file %s: skipped %d records with an empty instruction", file.path, empty)
    return prompts


def load(source: str = "polyrefuse", default_lang: str = "en") -> PromptSet:
    """Read `polyrefuse[?lang=..&test=..]`: download what is missing from the cache, verify, map."""
    _, options = parse_options(source, OPTIONS)
    langs = language_list(options.get("lang") or default_lang, source)
    test = options.get("test", "harmful").lower() or "harmful"
    if test not in TEST_SETS:
        raise DataError(f"{source}: test must be harmful or jailbreakbench, got {test!r}",
                        hint="write test=harmful (default) or test=jailbreakbench")
    url = base_url()
    root = cache_root()
    lock = Lockfile(root / LOCKFILE)
    prompts: list[Prompt] = []
    for lang in langs:
        for file in files_for(lang, test):
            if file.path in MISSING:
                log.warning("PolyRefuse has no %s at commit %s: no %s %s prompts in %s",
                            file.path, COMMIT[:12], file.kind, file.split, lang)
                continue
            prompts.extend(_prompts(file, _fetch(file.path, url, root, lock)))
    return PromptSet(source, tuple(prompts))
