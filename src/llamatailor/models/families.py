"""Llama-family chat formats: how each marks turns, which tokens end an answer, what LoRA targets.

A family is recognised from the tokenizer's chat template (or, for base models without one, from its
special tokens). The template shipped with the tokenizer is always preferred; the templates below are used
only when a tokenizer has none, so that a base model can be tuned into a chat model.
"""

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from llamatailor.errors import ModelLoadError
from llamatailor.vocabulary import AUTO, LLAMA_LINEARS, FamilyName

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

LLAMA4_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{ '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' + message['content'] | trim + '<|eot|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif %}"
)

LLAMA2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = '<<SYS>>\\n' + messages[0]['content'] | trim + '\\n<</SYS>>\\n\\n' %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)


@dataclass(frozen=True)
class Family:
    name: FamilyName
    template_markers: tuple[str, ...]
    stop_tokens: tuple[str, ...]
    default_template: str
    lora_targets: tuple[str, ...] = LLAMA_LINEARS  # what the all-linear preset adapts

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Ids of the family's stop tokens that exist in this vocabulary, plus the tokenizer's eos."""
        vocab = tokenizer.get_vocab()
        ids = [vocab[token] for token in self.stop_tokens if token in vocab]
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
            ids.append(tokenizer.eos_token_id)
        return ids


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("llama4", ("<|header_start|>",), ("<|eot|>", "<|eom|>", "<|end_of_text|>"), LLAMA4_TEMPLATE),
        Family(
            "llama3",
            ("<|start_header_id|>",),
            ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
            LLAMA3_TEMPLATE,
        ),
        Family("chatml", ("<|im_start|>",), ("<|im_end|>",), CHATML_TEMPLATE),
        Family("llama2", ("[INST]",), ("</s>",), LLAMA2_TEMPLATE),
    )
}


def detect_family(tokenizer: PreTrainedTokenizerBase, requested: str = AUTO) -> Family:
    """The family named in the config, else the one whose markers the chat template or vocabulary has."""
    if requested != AUTO:
        return FAMILIES[requested]
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    for family in FAMILIES.values():
        if any(marker in template for marker in family.template_markers):
            return family
    vocab = tokenizer.get_vocab()
    for family in FAMILIES.values():
        if any(marker in vocab for marker in family.template_markers):
            return family
    if "<s>" in vocab and "</s>" in vocab:
        return FAMILIES["llama2"]
    raise ModelLoadError(
        "cannot tell this model's chat format from its tokenizer (no known chat template or special tokens). "
        f"Set model.family to one of {', '.join(FAMILIES)} and, if needed, model.chat_template to a Jinja file."
    )
