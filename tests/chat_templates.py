"""Chat templates written from each family's documented prompt format, and a tokenizer that keeps markers whole.

Each fixture has the full text its format gives one user turn (the independent reference) and the text the
template puts between the end of the user's words and the start of the answer: the post-instruction tokens
(Arditi et al. 2024 list 5 for Llama 3 and Gemma). Written by hand from the model cards and the formats'
documentation; `model`, `assistant` and a blank line are whole tokens, as in those families' vocabularies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tiny_models import save_tokenizer
from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from abliterate.model.loading import ModelSource, load_tokenizer

LLAMA31 = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

GEMMA = (  # Gemma 1 and 2: no system role
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

GEMMA3 = (  # Gemma 3: a system message is merged into the first user turn
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QWEN3 = (  # the generation prompt of Qwen3's template, with its thinking switch (default: thinking on)
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)

MISTRAL = (  # Mistral 7B Instruct v0.1/v0.2: [INST] ... [/INST], user and assistant roles only
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}"
)

PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

GPT_OSS = (  # harmony: a system header with the reasoning effort; the model opens its channel itself
    "{%- if not reasoning_effort is defined %}{%- set reasoning_effort = 'medium' %}{%- endif %}"
    "{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\\n'"
    " + 'Knowledge cutoff: 2024-06\\nCurrent date: 2025-08-05\\n\\nReasoning: ' + reasoning_effort"
    " + '\\n\\n# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' or message['role'] == 'developer' %}"
    "{{- '<|start|>developer<|message|># Instructions\\n\\n' + message['content'] + '<|end|>' }}"
    "{%- elif message['role'] == 'user' %}{{- '<|start|>user<|message|>' + message['content'] + '<|end|>' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message['content'] + '<|return|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)


@dataclass(frozen=True)
class Family:
    """A family's template, its special markers, and what its documented format gives for one user turn."""

    template: str
    bos: str
    specials: tuple[str, ...]
    prefix: str  # everything before the user's words
    suffix: str  # the post-instruction text: after the user's words, before the answer
    n_tokens: int  # the suffix's tokens with markers, `model`/`assistant` and a blank line whole
    system: str  # "forbidden" (raises), "merged" (into the user turn) or "allowed"


TEMPLATES: dict[str, Family] = {
    "llama3.1": Family(
        LLAMA31, "<|begin_of_text|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", 5, "allowed",
    ),
    "gemma": Family(
        GEMMA, "<bos>", ("<start_of_turn>", "<end_of_turn>"), "<bos><start_of_turn>user\n",
        "<end_of_turn>\n<start_of_turn>model\n", 5, "forbidden",
    ),
    "gemma3": Family(
        GEMMA3, "<bos>", ("<start_of_turn>", "<end_of_turn>"), "<bos><start_of_turn>user\n",
        "<end_of_turn>\n<start_of_turn>model\n", 5, "merged",
    ),
    "qwen2.5": Family(
        QWEN25, "<|endoftext|>", ("<|im_start|>", "<|im_end|>"),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n", 5, "allowed",
    ),
    "qwen3": Family(  # rendered with thinking off: the empty think block is part of the suffix
        QWEN3, "<|endoftext|>", ("<|im_start|>", "<|im_end|>", "<think>", "</think>"), "<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", 9, "allowed",
    ),
    "mistral": Family(
        MISTRAL, "<s>", ("[INST]", "[/INST]"), "<s>[INST] ", " [/INST]", 2, "forbidden",
    ),
    "phi3": Family(
        PHI3, "<s>", ("<|user|>", "<|assistant|>", "<|end|>", "<|system|>"), "<|user|>\n",
        "<|end|>\n<|assistant|>\n", 4, "allowed",
    ),
    "gpt_oss": Family(
        GPT_OSS, "<|startoftext|>", ("<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|return|>"),
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2025-08-05\n\nReasoning: medium\n\n# Valid channels: analysis, "
        "commentary, final. Channel must be included for every message.<|end|><|start|>user<|message|>",
        "<|end|><|start|>assistant", 3, "allowed",
    ),
}


def family_tokenizer(family: str, folder: Path) -> PreTrainedTokenizerBase:
    """A byte-level tokenizer with the family's markers as special tokens and its template, saved and reloaded."""
    spec = TEMPLATES[family]
    save_tokenizer(folder, byte_level=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens(
        {"bos_token": spec.bos, "additional_special_tokens": list(spec.specials)}
    )
    tokenizer.add_tokens([AddedToken(word, normalized=False) for word in ("assistant", "model", "\n\n")])
    tokenizer.chat_template = spec.template
    tokenizer.save_pretrained(folder)
    return load_tokenizer(ModelSource(str(folder), folder))  # as the tool loads it: left padding
