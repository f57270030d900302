"""Rendering with the model's own template: ids equal apply_chat_template, labels cover exactly the answers."""

import pytest

from helpers import labelled_runs
from llamatailor.data.templating import IGNORE_INDEX, RenderError, render_for_training, render_prompt

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And in words, with a flourish?"},
    {"role": "assistant", "content": 'Four, naturally. {"n": 4}'},
]


@pytest.mark.parametrize(
    ("fixture", "end_of_turn"),
    [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("llama2", "</s>")],
)
def test_ids_equal_apply_chat_template_and_labels_are_the_answers(request, fixture, end_of_turn):
    chat = request.getfixturevalue(fixture)
    sample = render_for_training(chat, CONVERSATION, max_len=4096)
    expected = chat.tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert sample.input_ids == list(expected)
    assert len(sample.labels) == len(sample.input_ids)
    # Where labelled, the label is the input token itself (the model shifts internally).
    assert all(
        label in (IGNORE_INDEX, token) for label, token in zip(sample.labels, sample.input_ids, strict=True)
    )
    runs = labelled_runs(sample.labels)
    assert len(runs) == 2
    end_id = chat.tokenizer.convert_tokens_to_ids(end_of_turn)
    for run, answer in zip(runs, ("4", 'Four, naturally. {"n": 4}'), strict=True):
        assert run[-1] == end_id, "the end-of-turn token must be trained on"
        assert chat.tokenizer.decode(run[:-1]).strip() == answer
    # Nothing outside the answers is labelled: the labelled tokens are exactly the answers' tokens.
    assert sum(len(run) for run in runs) == sample.answer_tokens
    prompt_text = chat.tokenizer.decode(
        [t for t, lab in zip(sample.input_ids, sample.labels, strict=True) if lab < 0]
    )
    assert "What is 2 + 2?" in prompt_text and "Four" not in prompt_text


def test_chatml_mask_positions_by_hand(chatml):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    sample = render_for_training(chatml, messages, max_len=4096)
    tokens = chatml.tokenizer.convert_ids_to_tokens(sample.input_ids)
    # ... <|im_start|> assistant \n yo <|im_end|> \n : labels on "yo" and <|im_end|> only.
    assert tokens[-7:-3] == ["<|im_start|>", "ass", "istant", "Ċ"]
    assert sample.labels[-3:] == [sample.input_ids[-3], 2, IGNORE_INDEX]
    assert chatml.tokenizer.decode(sample.input_ids[-3]) == "yo"
    assert all(label == IGNORE_INDEX for label in sample.labels[:-3])
    assert tokens[-1] == "Ċ"


def test_prompt_is_the_prefix_the_answer_follows(llama3):
    prompt = render_prompt(llama3, CONVERSATION[:-1])
    sample = render_for_training(llama3, CONVERSATION, max_len=4096)
    assert sample.input_ids[: len(prompt)] == prompt
    assert sample.labels[len(prompt)] != IGNORE_INDEX
    assert sample.labels[len(prompt) - 1] == IGNORE_INDEX


def test_truncation_keeps_the_start_and_is_reported(chatml):
    full = render_for_training(chatml, CONVERSATION, max_len=4096)
    cut = len(full.input_ids) - 3
    sample = render_for_training(chatml, CONVERSATION, max_len=cut)
    assert sample.truncated and sample.full_length == len(full.input_ids)
    assert sample.input_ids == full.input_ids[:cut]
    assert sample.labels == full.labels[:cut]


def test_answer_truncated_away_is_an_error(chatml):
    prompt_length = len(render_prompt(chatml, CONVERSATION[:2]))
    with pytest.raises(RenderError, match="assistant part is truncated away"):
        render_for_training(chatml, CONVERSATION, max_len=prompt_length)


def test_special_token_text_in_content_is_refused(chatml):
    messages = [{"role": "user", "content": "say <|im_end|> now"}, {"role": "assistant", "content": "no"}]
    with pytest.raises(
        RenderError, match=r"messages\[0\].content contains the special token text '<\|im_end\|>'"
    ):
        render_for_training(chatml, messages, max_len=4096)
