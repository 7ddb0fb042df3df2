"""Chat rendering: thinking switched off where the template has a switch, no extra arguments elsewhere.

And, on templates written from each family's documented format, the post-instruction positions are exactly the
template's tokens between the user's text and the answer, and no system turn reaches a template that has none.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from chat_templates import QWEN3 as QWEN3_TEMPLATE  # the generation-prompt part, with the thinking switch
from chat_templates import TEMPLATES, family_tokenizer
from jinja2.exceptions import TemplateError
from tiny_models import save_tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from abliterate.evaluation.capability import hflm_template_args
from abliterate.model.chat import encode, post_instruction_length, render, template_switches
from abliterate.model.forward import make_batches


@pytest.fixture(scope="module")
def qwen3_style(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    folder = tmp_path_factory.mktemp("qwen3-style-tokenizer")
    save_tokenizer(folder, byte_level=True)  # one token per byte: rendered text decodes back exactly
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = QWEN3_TEMPLATE
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    folder = tmp_path_factory.mktemp("plain-tokenizer")
    save_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


def test_thinking_is_switched_off(qwen3_style: PreTrainedTokenizerBase) -> None:
    assert template_switches(qwen3_style) == {"enable_thinking": False}
    text = render(qwen3_style, "how to make a list")
    assert text == "<|im_start|>user\nhow to make a list<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    default = qwen3_style.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    )
    assert "<think>" not in default  # the switch matters: the template thinks unless told not to
    # The empty think block is part of the post-instruction tokens, for the direction and the benchmark.
    assert post_instruction_length(qwen3_style) > post_instruction_length_without_think(qwen3_style)
    ((_indices, batch),) = make_batches(qwen3_style, ["how to make a list"], 4)
    assert qwen3_style.decode(batch["input_ids"][0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def post_instruction_length_without_think(tokenizer: PreTrainedTokenizerBase) -> int:
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = original.replace("enable_thinking is defined and enable_thinking is false", "false")
        return post_instruction_length(tokenizer)
    finally:
        tokenizer.chat_template = original


def test_templates_without_a_switch_get_no_extra_argument(
    plain: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert template_switches(plain) == {}
    original = type(plain).apply_chat_template

    def strict(self: PreTrainedTokenizerBase, conversation: Any, **kwargs: Any) -> Any:
        unknown = set(kwargs) - {"tokenize", "add_generation_prompt"}
        if unknown:  # as some tokenizers do (e.g. transformers' Mistral tokenizer)
            raise ValueError(f"unsupported arguments {unknown}")
        return original(self, conversation, **kwargs)

    monkeypatch.setattr(type(plain), "apply_chat_template", strict)
    assert render(plain, "how to make a list") == "<|user|> how to make a list <|end|> <|assistant|> "


def test_lm_eval_gets_the_switch_only_where_it_exists(
    qwen3_style: PreTrainedTokenizerBase, plain: PreTrainedTokenizerBase
) -> None:
    class NewHFLM:
        def __init__(self, pretrained: object = None, enable_thinking: bool | None = None) -> None: ...

    class OldHFLM:
        def __init__(self, pretrained: object = None) -> None: ...

    assert hflm_template_args(NewHFLM, qwen3_style) == {"enable_thinking": False}
    assert hflm_template_args(NewHFLM, plain) == {}
    assert hflm_template_args(OldHFLM, qwen3_style) == {}


def test_chat_template_dict_is_searched() -> None:
    fake = SimpleNamespace(chat_template={"default": "{{ messages }}", "thinking": QWEN3_TEMPLATE})
    assert template_switches(fake) == {"enable_thinking": False}  # type: ignore[arg-type]


# Templates written from each family's documented format (tests/chat_templates.py).


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_post_instruction_tokens_are_what_the_template_puts_after_the_user_text(
    family: str, tmp_path: Path
) -> None:
    spec, tokenizer = TEMPLATES[family], family_tokenizer(family, tmp_path)
    instruction = "Write a short poem about the sea"
    text = render(tokenizer, instruction)
    assert text == spec.prefix + instruction + spec.suffix  # the documented format, default headers and all
    n = post_instruction_length(tokenizer)
    assert n == spec.n_tokens
    ids = encode(tokenizer, [text])[0]
    assert tokenizer.decode(ids[-n:]) == spec.suffix
    assert tokenizer.decode(ids[:-n]) == spec.prefix + instruction
    # The positions the hooks read: the last n of every (left-padded) row of a batch.
    ((_indices, batch),) = make_batches(tokenizer, [instruction, "Hi", "Name three rivers in Europe please"], 4)
    for row in batch["input_ids"]:
        assert tokenizer.decode(row[-n:].tolist()) == spec.suffix


@pytest.mark.parametrize("family", sorted(f for f, spec in TEMPLATES.items() if spec.system != "allowed"))
def test_a_template_without_a_system_role_never_gets_one(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, tokenizer = TEMPLATES[family], family_tokenizer(family, tmp_path)
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    if spec.system == "forbidden":  # the fixture is faithful: its template refuses a system turn
        with pytest.raises(TemplateError):
            tokenizer.apply_chat_template(system, tokenize=False, add_generation_prompt=True)
    sent: list[list[str]] = []
    original = type(tokenizer).apply_chat_template

    def spy(self: PreTrainedTokenizerBase, conversation: Any, **kwargs: Any) -> Any:
        sent.append([message["role"] for message in conversation])
        return original(self, conversation, **kwargs)

    monkeypatch.setattr(type(tokenizer), "apply_chat_template", spy)
    render(tokenizer, "Hi")
    post_instruction_length(tokenizer)
    make_batches(tokenizer, ["Hi", "how to make a list"], 4)
    assert sent and all(roles == ["user"] for roles in sent)
