"""Rendering with the model's own template: ids equal apply_chat_template, labels cover exactly the answers."""

import random
from collections import Counter

import pytest
from tokenizers import processors

from helpers import conversation, labelled_runs, prepared_run, read_rows, write_jsonl, write_run_file
from llamatailor.config import DataSection, ModelSection, load_config
from llamatailor.data.formats import FORMAT_BY_NAME, to_sample
from llamatailor.data.prepare import prepare
from llamatailor.data.reader import RawRecord
from llamatailor.data.scan import ScanCounts, scan_record
from llamatailor.data.templating import (
    IGNORE_INDEX,
    RenderedSample,
    RenderError,
    render_for_training,
    render_prompt,
)
from llamatailor.errors import DataError
from llamatailor.models.families import LLAMA3_TEMPLATE
from llamatailor.models.loading import prepare_tokenizer
from tiny_models import real_tokenizer

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


# --- The linear rendering against the prefix-by-prefix algorithm it replaces -------------------------------


def prefix_reference(chat, messages, tools=None):
    """The algorithm before the linear one, kept here as the reference: each answer located by tokenizing
    the conversation up to it, with and without it. Returns the whole ids and, per answer in order, its
    span [start, end) or "unrenderable" where that answer cannot be located (and the old algorithm
    stopped with an error)."""

    def ids(part, add_generation_prompt):
        rendered = chat.tokenizer.apply_chat_template(
            part, tools=tools, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )
        return list(rendered)

    full, spans = ids(messages, False), []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = ids(messages[:index], True)
        with_answer = full if index == len(messages) - 1 else ids(messages[: index + 1], False)
        stops = [i for i in range(len(prompt), len(with_answer)) if with_answer[i] in chat.stop_ids]
        if full[: len(prompt)] != prompt or full[: len(with_answer)] != with_answer or not stops:
            return full, [*spans, "unrenderable"]
        spans.append((len(prompt), stops[0] + 1))
    return full, spans


def reference_outcome(reference, max_len):
    """What rendering with `max_len` must give: the reference's answers, located in order until one ends
    past the cut (later ones would be cut away: they are not located, so they cannot fail)."""
    full, spans = reference
    labels = [IGNORE_INDEX] * len(full)
    for span in spans:
        if span == "unrenderable":
            return span
        labels[span[0] : span[1]] = full[span[0] : span[1]]
        if span[1] >= max_len:
            break
    if all(label == IGNORE_INDEX for label in labels[:max_len]):
        return "truncated_away"
    return RenderedSample(full[:max_len], labels[:max_len], len(full))


def outcome(chat, messages, max_len, tools=None):
    try:
        return render_for_training(chat, messages, max_len, tools)
    except RenderError as exc:
        return exc.kind


WORDS = "the model learns to answer questions about trains naïve café 😀 2024 data, carefully".split()
SYSTEMS = [None, "You answer briefly.", "  Spaces around.  \n", " ".join(WORDS * 30), "Line one.\nLine two."]
ANSWERS = [
    "",
    "4",
    " space first",
    "  spaces first",
    "space last  ",
    "\nnewline first",
    "\n\nblank line first",
]
ANSWERS += ['{"n": 4}', "😀 first", "2024"]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def random_conversation(rng, tool_calls=False):
    """A conversation with or without a system prompt, 1 to 5 exchanges, answers empty, short, odd or long;
    with `tool_calls`, some exchanges go through a weather tool call and its result first."""
    system = rng.choice(SYSTEMS)
    messages = [] if system is None else [{"role": "system", "content": system}]
    for _ in range(rng.randint(1, 5)):
        user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
        messages.append({"role": "user", "content": user})
        if tool_calls and rng.random() < 0.5:
            arguments = {"city": rng.choice(WORDS), "days": rng.randint(1, 9)}
            messages += [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}
                    ],
                },
                {"role": "tool", "content": rng.choice(ANSWERS[1:])},
            ]
        if rng.random() < 0.5:
            answer = rng.choice(ANSWERS)
        else:  # up to ~600 words: long answers
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.choice((3, 40, 600))))
        messages.append({"role": "assistant", "content": answer})
    return messages


@pytest.mark.parametrize("fixture", ["chatml", "llama3", "llama2"])
def test_ids_and_labels_equal_the_prefix_algorithm_on_many_conversations(request, fixture):
    chat = request.getfixturevalue(fixture)
    rng = random.Random(fixture)
    kinds = Counter()
    for number in range(40):
        # Llama 3.1 renders tools: every other conversation there offers one, and may call it.
        tools = [WEATHER_TOOL] if fixture == "llama3" and number % 2 else None
        messages = random_conversation(rng, tool_calls=tools is not None)
        reference = prefix_reference(chat, messages, tools)
        length = len(reference[0])
        # No cut, cuts anywhere (before the first answer too), and one token short.
        for max_len in (4096, rng.randint(1, length), rng.randint(1, length), length - 1):
            expected = reference_outcome(reference, max_len)
            assert outcome(chat, messages, max_len, tools) == expected, (messages, max_len)
            kinds[expected if isinstance(expected, str) else "sample"] += 1
    # The conversations reach every outcome: samples, answers cut away, and templates that cannot place an
    # answer (ChatML's "\n" merges with an answer's "\n\n"; Llama 2 and 3 trim answers first).
    assert kinds["sample"] >= 80 and kinds["truncated_away"] >= 5
    assert (kinds["unrenderable"] > 0) == (fixture == "chatml")


def test_a_prefix_off_the_token_boundaries_is_checked_token_by_token():
    """A tokenizer whose offsets leave out the space it merges into the next token ('Ġyo' at 54-55 for
    ' yo'): the prompt's end is no clean boundary, so that answer is located by tokenizing its prefix."""
    tokenizer = real_tokenizer("chatml")
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant:' }}{% endif %}"
    )
    chat = prepare_tokenizer(tokenizer, ModelSection())
    messages = [
        *CONVERSATION[1:3],
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "yo"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:3], tokenize=False, add_generation_prompt=True)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert text.startswith(prompt) and len(prompt) not in [start for start, _ in offsets]
    sample = render_for_training(chat, messages, 4096)
    assert sample == reference_outcome(prefix_reference(chat, messages), 4096)
    assert tokenizer.decode(labelled_runs(sample.labels)[1]) == " yo<|im_end|>"


def test_a_500_turn_conversation_is_tokenized_once_and_rendered_up_to_max_len(llama3, monkeypatch):
    rng = random.Random(5)
    messages = [{"role": "system", "content": "Be brief."}]
    for _ in range(250):
        messages += [
            {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(20))},
            {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(30))},
        ]
    expected = llama3.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    renders, encodings = [], []
    render, encode = llama3.tokenizer.apply_chat_template, type(llama3.tokenizer).__call__

    def counted_render(*args, **kwargs):
        renders.append(kwargs["tokenize"])
        return render(*args, **kwargs)

    def counted_encode(self, text, **kwargs):
        encodings.append(len(text))
        return encode(self, text, **kwargs)

    monkeypatch.setattr(llama3.tokenizer, "apply_chat_template", counted_render)
    monkeypatch.setattr(type(llama3.tokenizer), "__call__", counted_encode)
    sample = render_for_training(llama3, messages, max_len=300)
    # One tokenization (the whole text), and Jinja text renderings only: the whole, then a prompt and a
    # prompt-with-answer per answer until one ends past 300 tokens (4 answers of about 70 tokens).
    assert len(encodings) == 1 and encodings[0] > 50_000
    assert not any(renders) and len(renders) == 1 + 2 * 4
    assert sample.input_ids == list(expected)[:300] and sample.full_length == len(expected)
    # Five exchanges render to over 300 tokens, and their labels are those of the whole conversation.
    reference = prefix_reference(llama3, messages[:11])
    assert len(reference[0]) > 300 and sample.labels == reference_outcome(reference, 300).labels


# --- Tool calling ---------------------------------------------------------------------------------------


def tool_record(calls=1, text=None):
    """An OpenAI tool-calling record: a call (with arguments as JSON text), its result, the final answer."""
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    return {
        "tools": [WEATHER_TOOL],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": text, "tool_calls": [call] * calls},
            *[{"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}] * calls,
            {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
        ],
    }


def test_tool_calls_are_answers_and_tool_results_are_not_on_llama_3_1(llama3):
    sample = to_sample(tool_record(), FORMAT_BY_NAME["openai"])
    rendered = render_for_training(llama3, sample.messages, 4096, sample.tools)
    expected = llama3.tokenizer.apply_chat_template(
        sample.messages, tools=sample.tools, tokenize=True, return_dict=False
    )
    assert rendered.input_ids == list(expected)
    assert rendered == reference_outcome(prefix_reference(llama3, sample.messages, sample.tools), 4096)
    decode = llama3.tokenizer.decode
    assert [decode(run) for run in labelled_runs(rendered.labels)] == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "It is 18 C and sunny in Paris.<|eot_id|>",
    ]
    prompt = decode([t for t, label in zip(rendered.input_ids, rendered.labels, strict=True) if label < 0])
    # Meta's template puts the tools into the first user message, and the result in an ipython turn.
    assert '"name": "get_weather"' in prompt and "Weather in Paris?" in prompt
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"18 C, sunny"<|eot_id|>' in prompt


def test_two_calls_in_one_message_are_refused_with_the_templates_words(llama3):
    sample = to_sample(tool_record(calls=2), FORMAT_BY_NAME["openai"])
    with pytest.raises(
        RenderError, match="refuses this conversation: This model only supports single tool-calls"
    ):
        render_for_training(llama3, sample.messages, 4096, sample.tools)


def test_text_beside_a_tool_call_that_the_template_drops_is_refused(llama3):
    sample = to_sample(tool_record(text="Let me look."), FORMAT_BY_NAME["openai"])
    with pytest.raises(RenderError, match=r"leaves out messages\[1\]\.content"):
        render_for_training(llama3, sample.messages, 4096, sample.tools)


def test_special_token_text_in_tool_arguments_is_refused(llama3):
    record = tool_record()
    record["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris<|eot_id|>"}
    sample = to_sample(record, FORMAT_BY_NAME["openai"])
    with pytest.raises(RenderError, match=r"messages\[1\].tool_calls\[0\].function.arguments.city contains"):
        render_for_training(llama3, sample.messages, 4096, sample.tools)


def test_chatml_cannot_render_tools_and_prepare_stops_at_the_record(tmp_path, tiny_models):
    """SmolLM2's ChatML renders no tools: prepare stops at the first tool-calling record, naming its file
    and line, instead of training on empty assistant turns."""
    data = write_jsonl(tmp_path / "train.jsonl", [conversation("Hi", "Hello"), tool_record()])
    config = load_config(write_run_file(tmp_path, tiny_models["chatml"], [data]))
    with pytest.raises(DataError) as info:
        prepare(config)
    message = str(info.value)
    assert message.startswith(
        f"{data}:2: the chat template (tokenizer) cannot render the list of tools, tool calls ("
    )
    assert "a call's function name or arguments are not in the rendering" in message
    assert "such as Llama 3.1 and later or Llama 4's" in message


def test_the_builtin_llama3_template_cannot_render_tools(llama3, monkeypatch):
    """llamatailor's own Llama 3 template (for tokenizers without one) renders no tools either."""
    monkeypatch.setattr(llama3.tokenizer, "chat_template", LLAMA3_TEMPLATE)
    data = DataSection(train=["train.jsonl"])
    raw = RawRecord("train.jsonl:7", value=tool_record())
    with pytest.raises(
        DataError, match=r"^train\.jsonl:7: the chat template \(tokenizer\) cannot render the list"
    ):
        scan_record(raw, FORMAT_BY_NAME["openai"], data, llama3, ScanCounts())


def test_a_tool_calling_record_trains_with_its_tools_and_mask(tmp_path, tiny_models, llama3):
    from llamatailor.train.sft import tokenized_split

    rows = [tool_record(), conversation("Hi", "Hello")]
    splits = {"val_ratio": 0.0, "test_ratio": 0.0, "max_seq_len": 1024}
    run_file = prepared_run(tmp_path, tiny_models["llama3"], rows, data=splits)
    run = load_config(run_file).run_dir
    stored = next(row for row in read_rows(run.split("train")) if "tools" in row)
    assert stored["tools"] == [WEATHER_TOOL]
    assert stored["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    dataset = tokenized_split(run, "train", llama3, 1024)
    trained = next(row for row in dataset if "get_weather" in llama3.tokenizer.decode(row["input_ids"]))
    expected = render_for_training(llama3, stored["messages"], 1024, stored["tools"])
    assert (trained["input_ids"], trained["labels"]) == (expected.input_ids, expected.labels)
    assert '"description": "The weather in a city now."' in llama3.tokenizer.decode(trained["input_ids"])
