"""Publishing an edited checkpoint to the Hugging Face hub: `abliterate push` and `edit --push-to`.

`plan_upload` decides what would go up (every file of the folder but hidden ones, with a re-rendered model
card) without any network access; it is all that `--dry-run` needs. `push` checks the token (from HF_TOKEN
or the local login, never printed, logged or written), creates the repo (private unless asked otherwise),
refuses to upload into an existing public repo unless `--public` was given, and uploads with
`HfApi.upload_folder` (with hf_xet installed: a streamed upload in several commits that resumes when re-run;
each hub call is retried with exponential backoff on 429/5xx and connection errors). Auth and permission
problems become one-line PublishErrors saying to run `hf auth login` or set HF_TOKEN to a write token.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from abliterate import __version__
from abliterate.errors import PublishError, UsageError
from abliterate.publish.card import CARD_FILE, is_generated, render_card
from abliterate.publish.provenance import provenance_path, read_provenance, redact

log = logging.getLogger(__name__)

T = TypeVar("T")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# Never uploaded: hidden files and folders (temporary folders, caches, .git) anywhere in the tree.
IGNORE_PATTERNS = [".*", "*/.*"]
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
AUTH_STATUS = {401, 403}
ATTEMPTS = 5
BASE_WAIT = 2.0
MAX_WAIT = 60.0
AUTH_HINT = (
    "log in with a token that has write access: run `hf auth login`, or set HF_TOKEN to a write token "
    "from https://huggingface.co/settings/tokens"
)

OFFLINE_HINT = "unset HF_HUB_OFFLINE (or set it to 0) to push; `--dry-run` works offline"


@dataclass
class UploadPlan:
    """What a push would do: the repo, its visibility and branch, and every file with its size."""

    folder: Path
    repo_id: str
    private: bool
    revision: str | None
    files: list[tuple[str, int]] = field(default_factory=list)
    card: str | None = None  # the re-rendered README.md, written just before the upload

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> list[str]:
        """Lines for --dry-run: repo, visibility, branch, token source, then every file and its size."""
        visibility = "private" if self.private else "PUBLIC"
        lines = [
            f"repo: {self.repo_id} ({visibility}), branch {self.revision or 'main'}",
            f"token: {token_source()}",
            f"files: {len(self.files)}, {human_size(self.total_bytes)}",
        ]
        for name, size in self.files:
            note = "  (model card, regenerated)" if name == CARD_FILE and self.card is not None else ""
            lines.append(f"  {human_size(size):>10}  {name}{note}")
        return lines


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id) or ".." in repo_id or len(repo_id) > 96:
        raise UsageError(
            f"{repo_id!r} is not a hub repo id", hint="write it as ORG/NAME, e.g. my-org/model-abliterated"
        )
    return repo_id


def token_source() -> str:
    """Where the token comes from, in words (never the token itself)."""
    from huggingface_hub import get_token

    token = get_token()
    if token is None:
        return "none found (run `hf auth login` or set HF_TOKEN)"
    env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return "from HF_TOKEN" if env == token else "from the local login"


def require_token() -> str:
    """The token for hub calls; a PublishError (how to log in) if there is none."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token found", hint=AUTH_HINT)
    return token


def check_ready(repo_id: str) -> None:
    """Before a long edit with --push-to: a valid repo id, the hub not switched off, a token (no network)."""
    from huggingface_hub import constants

    check_repo_id(repo_id)
    if constants.HF_HUB_OFFLINE:
        raise PublishError("cannot push: HF_HUB_OFFLINE is set", hint=OFFLINE_HINT)
    require_token()


# --- the plan (no network) -------------------------------------------------------------------------------


def _local_files(folder: Path) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(names, ignore_patterns=IGNORE_PATTERNS))


def plan_upload(folder: Path, repo_id: str, *, public: bool = False, revision: str | None = None) -> UploadPlan:
    """Everything a push of `folder` would upload, and the model card it would write first."""
    folder = Path(folder).expanduser().resolve()
    check_repo_id(repo_id)
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file() \
            and not any(folder.glob("*.gguf")):
        raise UsageError(f"{folder} is not a model folder (no config.json, adapter_config.json or .gguf file)",
                         hint="push the --out folder of an edit")
    card = None
    if provenance_path(folder).is_file() and is_generated(folder / CARD_FILE):
        card = render_card(folder, read_provenance(folder), repo_id)
    elif not provenance_path(folder).is_file():
        log.warning("%s has no abliterate/provenance.json: no model card is generated", folder)
    names = _local_files(folder)
    if card is not None and CARD_FILE not in names:
        names = sorted([*names, CARD_FILE])
    files = [
        (n, len(card.encode("utf-8")) if n == CARD_FILE and card is not None else (folder / n).stat().st_size)
        for n in names
    ]
    return UploadPlan(folder, repo_id, not public, revision, files, card)


# --- retries and errors ----------------------------------------------------------------------------------


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _transient_types() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of the HTTP clients huggingface_hub may use."""
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            kind = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(kind, type) and issubclass(kind, BaseException):
            kinds.append(kind)
    return tuple(kinds)


def is_transient(err: BaseException) -> bool:
    """429/5xx answers and connection or timeout errors: worth another try (offline mode is not)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return False
    return _status(err) in TRANSIENT_STATUS or isinstance(err, _transient_types())


def _server_message(err: BaseException) -> str:
    message = getattr(err, "server_message", None) or ""
    message = redact(str(message).strip().splitlines()[0]) if message else ""
    return f": {message[:200]}" if message else ""


def publish_error(what: str, repo_id: str, err: BaseException) -> PublishError:
    """A one-line PublishError for a failed hub call (auth problems say how to log in)."""
    from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError

    status = _status(err)
    if isinstance(err, OfflineModeIsEnabled):
        return PublishError(f"{what} for {repo_id} failed: HF_HUB_OFFLINE is set", hint=OFFLINE_HINT)
    if isinstance(err, LocalTokenNotFoundError):
        return PublishError("no Hugging Face token found", hint=AUTH_HINT)
    if status in AUTH_STATUS or isinstance(err, RepositoryNotFoundError):
        org = repo_id.split("/")[0]
        return PublishError(
            f"the Hugging Face hub refused {what} for {repo_id} (HTTP {status}{_server_message(err)})",
            hint=f"{AUTH_HINT}; check that it may write to {org}",
        )
    if status is not None:
        return PublishError(
            f"{what} for {repo_id} failed (HTTP {status}{_server_message(err)})",
            hint="try again later; re-running `abliterate push` resumes the upload",
        )
    if is_transient(err):
        return PublishError(
            f"{what} for {repo_id} failed: the hub is unreachable ({type(err).__name__})",
            hint="check the connection (and HF_ENDPOINT); re-running `abliterate push` resumes the upload",
        )
    return PublishError(f"{what} for {repo_id} failed: {redact(str(err))[:200]}", hint="see the message; try again")


def with_retries(what: str, repo_id: str, call: Callable[[], T], *, sleep: Callable[[float], None] = time.sleep) -> T:
    """Run one hub call; retry transient failures with exponential backoff; turn errors into PublishError."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except PublishError:
            raise
        except Exception as err:  # huggingface_hub raises HTTP, network and value errors
            if not is_transient(err) or _status(err) in AUTH_STATUS or attempt == ATTEMPTS:
                raise publish_error(what, repo_id, err) from None
            wait = min(MAX_WAIT, BASE_WAIT * 2 ** (attempt - 1))
            log.warning(
                "%s failed (%s); retrying in %.0f s (attempt %d of %d)",
                what,
                _status(err) or type(err).__name__,
                wait,
                attempt + 1,
                ATTEMPTS,
            )
            sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


# --- the push --------------------------------------------------------------------------------------------


def _check_write_access(api: Any, token: str, repo_id: str, sleep: Callable[[float], None]) -> None:
    info = with_retries("checking the token", repo_id, lambda: api.whoami(token=token), sleep=sleep)
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PublishError("the Hugging Face token is read-only", hint=AUTH_HINT)


def _prepare_repo(api: Any, plan: UploadPlan, sleep: Callable[[float], None]) -> None:
    repo = plan.repo_id
    with_retries(
        "creating the repo",
        repo,
        lambda: api.create_repo(repo, private=plan.private, exist_ok=True, repo_type="model"),
        sleep=sleep,
    )
    info = with_retries("reading the repo", repo, lambda: api.repo_info(repo, repo_type="model"), sleep=sleep)
    if plan.private and getattr(info, "private", None) is False:
        raise PublishError(
            f"{repo} already exists and is public", hint="pass --public to upload to it anyway, or choose another name"
        )
    if plan.revision:
        with_retries(
            f"creating the branch {plan.revision!r}",
            repo,
            lambda: api.create_branch(repo, branch=plan.revision, exist_ok=True, repo_type="model"),
            sleep=sleep,
        )


def push(
    plan: UploadPlan,
    *,
    message: str | None = None,
    endpoint: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Upload `plan.folder` to `plan.repo_id`; returns the repo's URL. `endpoint` overrides HF_ENDPOINT."""
    from huggingface_hub import HfApi

    check_ready(plan.repo_id)
    token = require_token()
    api = HfApi(endpoint=endpoint, token=token, library_name="abliterate", library_version=__version__)
    _check_write_access(api, token, plan.repo_id, sleep)
    _prepare_repo(api, plan, sleep)
    if plan.card is not None:
        (plan.folder / CARD_FILE).write_text(plan.card, encoding="utf-8")
    log.info("uploading %d files (%s) to %s", len(plan.files), human_size(plan.total_bytes), plan.repo_id)
    with_retries(
        "uploading",
        plan.repo_id,
        lambda: api.upload_folder(
            repo_id=plan.repo_id,
            folder_path=plan.folder,
            repo_type="model",
            revision=plan.revision,
            commit_message=message or f"Upload abliterated checkpoint (abliterate {__version__})",
            ignore_patterns=list(IGNORE_PATTERNS),
        ),
        sleep=sleep,
    )
    url = f"{api.endpoint.rstrip('/')}/{plan.repo_id}"
    return f"{url}/tree/{plan.revision}" if plan.revision else url
