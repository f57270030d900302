"""The one generation path (`llamatailor.generation`), each rule tested once per engine and per vocabulary:
prompt ids (system prompt, special tokens, one bos), greedy answers equal on transformers and llama.cpp,
batching, the cut at stop tokens, and UTF-8 never split in a stream. A source scan keeps every decoding
loop inside `generation/engines.py`."""

import ast
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llamatailor.config import ModelSection
from llamatailor.data.templating import IGNORE_INDEX, render_for_training, render_prompt
from llamatailor.export.gguf_file import write_gguf
from llamatailor.generation.answers import answer_all, stream_answer
from llamatailor.generation.engines import GREEDY, LlamaCppEngine, TransformersEngine
from llamatailor.generation.prompts import GGUFPrompter, TokenizerPrompter
from llamatailor.generation.text import Generation, finished, text_deltas
from llamatailor.models.loading import load_saved_tokenizer
from tiny_models import build_tiny_model

SOURCE = Path(__file__).parents[1] / "src" / "llamatailor"
CHATML_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
LLAMA2_PROMPT = "<s>[INST] Hello [/INST]"


@pytest.fixture(scope="module", params=["chatml", "llama3", "llama2"])
def both_engines(request, tmp_path_factory):
    """A tiny model with its training tokenizer, and the same model as an f32 GGUF file."""
    folder = build_tiny_model(request.param, tmp_path_factory.mktemp(request.param) / "model")
    chat = load_saved_tokenizer(folder, ModelSection())
    path = write_gguf(folder, folder.parent / "m.gguf", "f32", chat, request.param)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    llama = LlamaCppEngine("gguf", path, context=512)
    yield request.param, chat, TransformersEngine("hf", model, chat.tokenizer.pad_token_id, 4), llama
    llama.close()


def test_raw_prompts_get_the_same_ids_from_both_vocabularies(both_engines):
    kind, chat, _, llama = both_engines
    ours, files = TokenizerPrompter(chat), GGUFPrompter(llama.llm)
    text = {"chatml": CHATML_PROMPT, "llama2": LLAMA2_PROMPT}.get(kind)
    if text is None:  # Llama 3: the header tokens written as text
        text = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    assert ours.text_ids(text) == files.text_ids(text)
    expected = {"chatml": 16, "llama2": 9, "llama3": 7}[kind]  # special tokens read as one token each
    assert len(ours.text_ids(text)) == expected
    bos = chat.tokenizer.bos_token_id
    if chat.adds_bos:  # written with or without bos, the prompt starts with exactly one
        without = text.removeprefix(chat.tokenizer.bos_token)
        for ids in (ours.text_ids(text), ours.text_ids(without)):
            assert ids[:1] == [bos] and ids[1:2] != [bos]
        assert files.text_ids(without)[:1] == [bos] and files.text_ids(without)[1:2] != [bos]


def test_system_prompt_is_added_once_on_both_vocabularies(both_engines):
    _, chat, _, llama = both_engines
    user = [{"role": "user", "content": "Hi"}]
    own = [{"role": "system", "content": "Be terse."}, *user]
    run = [{"role": "system", "content": "You tag tickets."}, *user]
    for prompter in (
        TokenizerPrompter(chat, "You tag tickets."),
        GGUFPrompter(llama.llm, "You tag tickets."),
    ):
        assert prompter.chat_ids(user) == render_prompt(chat, run)  # as training rendered it
        assert prompter.chat_ids(own) == render_prompt(chat, own)  # a request's own system message wins
    assert TokenizerPrompter(chat).chat_ids(user) == render_prompt(chat, user)


def test_tool_offering_prompts_are_rendered_as_in_training(both_engines):
    """A test record that offered tools and called one is prompted with its tools on both vocabularies:
    the prompt is exactly the training rendering's tokens before the final answer."""
    kind, chat, _, llama = both_engines
    if kind != "llama3":
        pytest.skip("only Meta's Llama 3.1 template renders tools")
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
    }
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "4 C"},
        {"role": "assistant", "content": "4 C in Oslo."},
    ]
    sample = render_for_training(chat, messages, 512, [tool])
    answer = len(sample.labels) - sample.labels[::-1].index(IGNORE_INDEX)  # the final answer's first token
    for prompter in (TokenizerPrompter(chat), GGUFPrompter(llama.llm)):
        prompt = prompter.chat_ids(messages[:-1], [tool])
        assert prompt == sample.input_ids[:answer]
        assert prompt != prompter.chat_ids(messages[:-1])  # without the tools, another prompt
    assert '"name": "get_weather"' in chat.tokenizer.decode(sample.input_ids[:answer])


def test_greedy_answers_equal_on_both_engines(both_engines):
    _, chat, hf, llama = both_engines
    prompter = TokenizerPrompter(chat)
    prompts = [prompter.chat_ids([{"role": "user", "content": q}]) for q in ("hi", "n = 3, then?")]
    from_hf = answer_all(hf, prompter, prompts, 10)
    assert answer_all(llama, prompter, prompts, 10) == from_hf
    streamed = "".join(d.text for d in stream_answer(llama, prompter, prompts[0], GREEDY, 10))
    assert streamed.strip() == from_hf[0].text


def test_batched_answers_equal_one_by_one(tiny_models, chatml):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["chatml"]).eval()
    prompter = TokenizerPrompter(chatml)
    questions = ["hi", "what is the capital of France, in one word?", "n = 3", "a much longer question " * 5]
    prompts = [prompter.chat_ids([{"role": "user", "content": q}]) for q in questions]
    assert len({len(p) for p in prompts}) == 4, "prompts of different lengths exercise the padding"
    pad = chatml.tokenizer.pad_token_id
    batched = answer_all(TransformersEngine("b", model, pad, 4), prompter, prompts, 12)
    single = answer_all(TransformersEngine("s", model, pad, 1), prompter, prompts, 12)
    assert batched == single
    assert all(g.tokens == 12 and not g.stopped for g in single)  # random weights never stop
    streamed = stream_answer(TransformersEngine("s", model, pad), prompter, prompts[1], GREEDY, 12)
    assert "".join(d.text for d in streamed).strip() == single[1].text


def test_finished_cuts_at_the_first_stop_token(chatml):
    prompter = TokenizerPrompter(chatml)
    hello = chatml.tokenizer.encode("Hello there", add_special_tokens=False)
    end = chatml.tokenizer.convert_tokens_to_ids("<|im_end|>")
    cut = finished([*hello, end, *hello], prompter.decode, prompter.stop_ids)
    assert cut == Generation("Hello there", len(hello) + 1, True)
    assert finished(hello, prompter.decode, prompter.stop_ids) == Generation("Hello there", len(hello), False)


def test_generation_stops_at_a_stop_token(tiny_models, chatml):
    """Make <|im_end|> the certain next token, then the answer must end at once and say so."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["chatml"]).eval()
    end = chatml.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[end] = 1e4
    prompter = TokenizerPrompter(chatml)
    engine = TransformersEngine("t", model, chatml.tokenizer.pad_token_id, 1)
    prompt = prompter.chat_ids([{"role": "user", "content": "hi"}])
    assert answer_all(engine, prompter, [prompt], 12) == [Generation("", 1, True)]
    deltas = list(stream_answer(engine, prompter, prompt, GREEDY, 12))
    assert [(d.text, d.finish_reason, d.completion_tokens) for d in deltas] == [("", "stop", 1)]


def test_stream_never_splits_a_character(both_engines):
    """Byte-level tokens of '😀' decode to U+FFFD until the last byte: nothing is sent before it."""
    _, chat, _, llama = both_engines
    text = "ok 😀 déjà 日本"
    ids = chat.tokenizer.encode(text, add_special_tokens=False)
    for prompter in (TokenizerPrompter(chat), GGUFPrompter(llama.llm)):
        deltas = list(text_deltas(ids, prompter.decode, set(), [], 100))
        assert all("\ufffd" not in d.text for d in deltas)
        assert "".join(d.text for d in deltas).strip() == text
        assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == len(ids)
    cut = list(text_deltas(ids, TokenizerPrompter(chat).decode, set(), ["déjà"], 100))
    assert "".join(d.text for d in cut) == "ok 😀 " and cut[-1].finish_reason == "stop"


def test_no_decoding_loop_outside_the_generation_engines():
    """`generate`, llama.cpp's sampling and completion calls, and streamers appear in one module only."""
    forbidden = {"generate", "create_completion", "create_chat_completion", "sample", "TextIteratorStreamer"}
    found = []
    for path in SOURCE.rglob("*.py"):
        if path == SOURCE / "generation" / "engines.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
                if name in forbidden:
                    found.append(f"{path.relative_to(SOURCE)}:{node.lineno} {name}")
    assert found == []


def test_an_answer_stopped_inside_a_character_ends_at_the_last_whole_one(both_engines):
    """'🦙' is three or four byte tokens on every vocabulary here: an answer whose budget (or stop token)
    falls between them ends at the last whole character, streamed or not, with its tokens all counted."""
    _, chat, _, llama = both_engines
    ids = chat.tokenizer.encode("ok🦙", add_special_tokens=False)
    whole = len(chat.tokenizer.encode("ok", add_special_tokens=False))
    assert len(ids) - whole >= 2, "the emoji must span several tokens"
    stop = max(chat.stop_ids)
    for prompter in (TokenizerPrompter(chat), GGUFPrompter(llama.llm)):
        for budget in range(whole + 1, len(ids)):  # inside the emoji
            assert "\ufffd" in prompter.decode(ids[:budget])  # what the decoders give there
            deltas = list(text_deltas(ids, prompter.decode, set(), [], budget))
            assert "".join(d.text for d in deltas) == prompter.decode(ids[:whole])
            assert (deltas[-1].finish_reason, deltas[-1].completion_tokens) == ("length", budget)
            assert finished(ids[:budget], prompter.decode, set()) == Generation("ok", budget, False)
            stopped = list(text_deltas([*ids[:budget], stop], prompter.decode, {stop}, [], 100))
            assert "".join(d.text for d in stopped) == prompter.decode(ids[:whole])
            assert (stopped[-1].finish_reason, stopped[-1].completion_tokens) == ("stop", budget + 1)
