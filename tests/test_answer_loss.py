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
