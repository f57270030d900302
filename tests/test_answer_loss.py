"""The chunked answer-only loss: the same value and gradients as plain cross-entropy over full logits."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from llamatailor.train import answer_loss
from llamatailor.train.answer_loss import add_answer_loss, chunked_cross_entropy


@pytest.mark.parametrize("rows", [7, 16, 64])
def test_chunked_cross_entropy_equals_plain_cross_entropy(monkeypatch, rows):
    monkeypatch.setattr(answer_loss, "chunk_rows", lambda vocab: rows)
    torch.manual_seed(0)
    hidden = torch.randn(37, 24, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(101, 24, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 101, (37,))
    ours = chunked_cross_entropy(hidden, weight, targets)
    (ours * 0.5).backward()
    ours_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (plain * 0.5).backward()
    torch.testing.assert_close(ours, plain)
    torch.testing.assert_close(ours_grads[0], hidden.grad)
    torch.testing.assert_close(ours_grads[1], weight.grad)
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, targets), plain)


def test_frozen_head_gets_no_gradient():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    chunked_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, 4, 5])).backward()
    assert hidden.grad is not None and weight.grad is None


def test_answer_loss_equals_the_models_own_loss_on_a_lora_model(tiny_models):
    """Through PEFT: loss and LoRA gradients equal the model's own (full-logits) loss on the same labels."""
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (3, 20))
    labels = ids.clone()
    labels[:, :8] = -100  # the prompt
    labels[2, 15:] = -100  # padding
    grads = []
    for patched in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_models["chatml"])
        if patched:
            add_answer_loss(model)
        torch.manual_seed(1)  # the same random LoRA weights for both
        peft_model = get_peft_model(
            model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        extra = {"answer_loss": True} if patched else {}
        loss = peft_model(input_ids=ids, labels=labels, **extra).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]))
    (plain, plain_grads), (ours, our_grads) = grads
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(our_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_length_buckets_keep_similar_lengths_together_and_repeat_per_epoch():
    from llamatailor.train.batching import LengthBuckets

    lengths = [(i * 37) % 500 + 1 for i in range(200)]
    sampler = LengthBuckets(lengths, batch_size=8, seed=3, pool_batches=64)
    order = list(sampler)
    assert sorted(order) == list(range(200))
    batches = [order[i : i + 8] for i in range(0, 200, 8)]
    padded = sum(8 * max(lengths[i] for i in b) for b in batches[:-1])
    real = sum(lengths[i] for b in batches[:-1] for i in b)
    assert real / padded > 0.95  # random batches of 8 would be near 0.5
    assert list(sampler) == order
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_micro_batches_give_the_batch_gradient(tiny_models):
    """Splitting a batch under a token budget: the same summed loss and the same LoRA gradients."""
    from llamatailor.train.batching import micro_batches

    ids, mask = _right_padded([20, 17, 9, 5])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    count = (labels[:, 1:] != -100).sum()
    parts = micro_batches(batch, budget=40)
    assert [p["input_ids"].shape for p in parts] == [(2, 20), (2, 9)]
    results = []
    for pieces in ([batch], parts):
        model = AutoModelForCausalLM.from_pretrained(tiny_models["chatml"])
        add_answer_loss(model)
        torch.manual_seed(1)
        peft_model = get_peft_model(
            model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
        )
        total = sum(float(_backward(peft_model, p, count)) for p in pieces)
        results.append((total, [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def _right_padded(lengths):
    """Random token ids in rows of these lengths, right-padded, and their attention mask."""
    torch.manual_seed(0)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, 1000, (n,))
        mask[row, :n] = 1
    return ids, mask


def _backward(model, inputs, count):
    loss = model(**inputs, answer_loss=True, num_items_in_batch=count).loss
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_free_rows_give_the_padded_loss_and_gradient(tiny_models, attention):
    """Rows joined without padding (position ids restarting): the same loss and LoRA gradients as the
    padded batch, so attention never crosses from one sample into the next."""
    from llamatailor.train.batching import micro_batches, padding_free

    ids, mask = _right_padded([20, 13, 6])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    labels[1, 0] = ids[1, 0]  # a labelled first token is never predicted, padded or packed
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    packed = padding_free(batch)
    assert packed.keys() == {"input_ids", "labels", "position_ids"}
    assert packed["input_ids"].tolist() == [ids[0, :20].tolist() + ids[1, :13].tolist() + ids[2, :6].tolist()]
    assert packed["position_ids"].tolist() == [list(range(20)) + list(range(13)) + list(range(6))]
    assert packed["labels"][0, [0, 20, 33]].tolist() == [-100, -100, -100]
    count = (labels[:, 1:] != -100).sum()
    assert int((packed["labels"][:, 1:] != -100).sum()) == int(count)
    results = []
    for pieces in ([batch], [packed], [padding_free(p) for p in micro_batches(batch, budget=26)]):
        model = AutoModelForCausalLM.from_pretrained(tiny_models["chatml"], attn_implementation=attention)
        add_answer_loss(model)
        torch.manual_seed(1)
        peft_model = get_peft_model(
            model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        total = sum(float(_backward(peft_model, p, count)) for p in pieces)
        results.append((total, [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]))
    (padded, padded_grads), *others = results
    for total, grads in others:
        assert total == pytest.approx(padded, rel=1e-5)
        for a, b in zip(grads, padded_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
