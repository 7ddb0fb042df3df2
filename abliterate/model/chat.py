"""Chat formatting: prompts go through the model's own chat template, with no system prompt of ours.

Also finds the post-instruction positions: the tokens the template appends after the user's text (e.g.
`<|im_end|>\n<|im_start|>assistant\n`), where the refusal direction is read (Arditi et al. 2024).

Templates with a thinking switch (Qwen3's `enable_thinking`) are rendered with thinking off, for the
direction, the selection and the refusal benchmark alike; other templates get no extra argument.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from abliterate.errors import ModelError

_PROBES = ("Describe the weather on a sunny day", "List three colours of the rainbow please")


def set_chat_template(tokenizer: PreTrainedTokenizerBase, template_file: Path | None, model: str) -> None:
    """Install a user-supplied template, or check that the tokenizer has one."""
    if template_file is not None:
        try:
            tokenizer.chat_template = Path(template_file).read_text(encoding="utf-8")
        except OSError as err:
            raise ModelError(
                f"cannot read chat template {template_file}: {err.strerror}", hint="check the path"
            ) from None
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"{model} has no chat template (is it a base model rather than a chat model?)",
            hint="pass --chat-template FILE with a Jinja chat template for it",
        )


THINKING_SWITCH = "enable_thinking"


def template_switches(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Extra template arguments: thinking off where the chat template has the switch, else none.

    Only templates that mention the switch get it (some tokenizers reject arguments they do not know).
    """
    template = getattr(tokenizer, "chat_template", None)
    texts = template.values() if isinstance(template, dict) else [template]
    return {THINKING_SWITCH: False} if any(isinstance(t, str) and THINKING_SWITCH in t for t in texts) else {}


def render(tokenizer: PreTrainedTokenizerBase, instruction: str) -> str:
    """One user turn rendered for generation (thinking switched off where the template has a switch)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}],
        tokenize=False,
        add_generation_prompt=True,
        **template_switches(tokenizer),
    )
    assert isinstance(text, str)
    return text


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of rendered prompts (the template already holds any BOS token)."""
    ids: list[list[int]] = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return ids


def post_instruction_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """Number of tokens the template adds after the user's text.

    The common token suffix of two rendered prompts, capped by the token count of the text that follows the
    user's message (so that equal final words, or unknown-word tokens, are never counted).
    """
    texts = [render(tokenizer, p) for p in _PROBES]
    a, b = encode(tokenizer, texts)
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    head = texts[0][: texts[0].index(_PROBES[0]) + len(_PROBES[0])]
    n = min(n, len(a) - len(encode(tokenizer, [head])[0]))
    if n == 0:
        raise ModelError(
            "the chat template adds no tokens after the user's text",
            hint="use a chat template that ends with an assistant header",
        )
    return n
