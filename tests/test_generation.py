"""Batched greedy generation: left padding changes nothing, stop tokens end answers and are reported."""

import torch
from transformers import AutoModelForCausalLM

from llamatailor.data.templating import render_prompt
from llamatailor.evaluate.generation import Generation, decode_generation, generate_all


def test_batched_answers_equal_one_by_one(tiny_models, chatml):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["chatml"]).eval()
    questions = ["hi", "what is the capital of France, in one word?", "n = 3", "a much longer question " * 5]
    prompts = [render_prompt(chatml, [{"role": "user", "content": q}]) for q in questions]
    assert len({len(p) for p in prompts}) == 4, "prompts of different lengths exercise the padding"
    batched = generate_all(model, chatml, prompts, max_new_tokens=12, batch_size=4)
    single = generate_all(model, chatml, prompts, max_new_tokens=12, batch_size=1)
    assert batched == single
    assert all(g.tokens == 12 and not g.stopped for g in single)  # random weights never stop


def testdecode_generation_cuts_at_the_first_stop_token(chatml):
    hello = chatml.tokenizer.encode("Hello there", add_special_tokens=False)
    end = chatml.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert decode_generation([*hello, end, *hello], chatml) == Generation("Hello there", len(hello) + 1, True)
    assert decode_generation(hello, chatml) == Generation("Hello there", len(hello), False)


def test_generation_stops_at_a_stop_token(tiny_models, chatml):
    """Make <|im_end|> the certain next token, then the answer must end at once and say so."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["chatml"]).eval()
    end = chatml.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[end] = 1e4
    prompt = render_prompt(chatml, [{"role": "user", "content": "hi"}])
    assert generate_all(model, chatml, [prompt], max_new_tokens=12, batch_size=1) == [Generation("", 1, True)]
