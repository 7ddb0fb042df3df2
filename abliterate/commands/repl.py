"""`abliterate chat MODEL [--compare BASE]`: the quick look after an edit, a chat REPL on the model's template.

Each turn goes through the model's own chat template (thinking switched off where the template has a switch,
as everywhere in abliterate) with the conversation so far, and the answer is generated greedily and yielded
piece by piece as it is decoded (transformers' TextIteratorStreamer, generation in a worker thread). With a
second model (`--compare`), both answer every turn, each keeping its own history, and `side_by_side` lays the
two answers out in two columns. Library code only yields text; the CLI prints it.
"""

from __future__ import annotations

import logging
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import TYPE_CHECKING, Any

from transformers import TextIteratorStreamer

from abliterate.model.chat import set_chat_template, template_switches
from abliterate.model.loading import load_model, resolve

if TYPE_CHECKING:
    from abliterate.settings import Settings

log = logging.getLogger(__name__)

RESET = "/reset"
QUIT = ("/quit", "/exit")


@dataclass
class ChatModel:
    """A loaded chat model and its conversation."""

    name: str
    model: Any
    tokenizer: Any
    history: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def from_settings(cls, spec: str, settings: Settings) -> ChatModel:
        """Resolve and load `spec` (hub id, folder or .gguf) for generation; it must have a chat template."""
        source = resolve(spec, revision=settings.revision, allow_pickle=settings.allow_pickle)
        model, tokenizer = load_model(source, dtype=settings.dtype, device=settings.device,
                                      trust_remote_code=settings.trust_remote_code, quantize=settings.quantize)
        set_chat_template(tokenizer, settings.chat_template, spec)
        return cls(spec, model, tokenizer)

    def reset(self) -> None:
        self.history.clear()

    def prompt_ids(self, text: str) -> Any:
        """The conversation plus the new user turn, rendered with the template, as model inputs."""
        messages = [*self.history, {"role": "user", "content": text}]
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True,
            **template_switches(self.tokenizer),
        ).to(self.model.device)

    def stream(self, text: str, max_new_tokens: int) -> Iterator[str]:
        """Answer `text` greedily, yielding decoded pieces as they come; the turn joins the history at the end."""
        inputs = self.prompt_ids(text)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

        def generate() -> None:
            try:
                self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                                    pad_token_id=pad)
            except BaseException as err:  # handed to the caller's thread below
                failure.append(err)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            yield piece
        worker.join()
        if failure:
            raise failure[0]
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]


def side_by_side(left: tuple[str, str], right: tuple[str, str], width: int = 100) -> list[str]:
    """Two (title, text) answers as lines of two columns, `width` characters wide in all."""
    column = max(20, (width - 3) // 2)

    def wrap(text: str) -> list[str]:
        lines: list[str] = []
        for paragraph in text.strip().splitlines() or [""]:
            lines += textwrap.wrap(paragraph, column) or [""]
        return lines

    rows = [(left[0], right[0]), ("-" * column, "-" * column)]
    rows += list(zip_longest(wrap(left[1]), wrap(right[1]), fillvalue=""))
    return [f"{a:<{column}} | {b}".rstrip() for a, b in rows]
