"""The training loss on the answer tokens only, without ever building [tokens x vocabulary] logits whole.

The backbone's hidden states are kept only at positions whose next token is labelled (the answers and their
end-of-turn tokens; prompts and padding are skipped, not scored and masked). The LM head and the cross-
entropy then run over those positions in chunks: each chunk's logits exist only while its loss and its
gradients are computed, during the forward pass, so the backward pass only scales stored gradients. With a
128K vocabulary the largest temporary is one chunk of logits (64 MiB in fp32) instead of all of them.
Computing the head's gradients chunk by chunk in the forward pass is the scheme of Liger Kernel's fused
linear cross-entropy (Hsu et al. 2024); the values are those of `torch.nn.functional.cross_entropy`.

This is the SFT loss path (see train/sft.py, "One optimizer step"); plan/memory.py's `loss_bytes` was
measured on it. Changing it needs the parity tests, the DDP test and a planner re-measure listed there.
"""

import types
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from llamatailor.data.templating import IGNORE_INDEX
from llamatailor.hardware import chunk_rows  # the planner counts the same chunks


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T, targets), gradients computed chunk by chunk.

    forward(hidden, weight, targets, rows): `hidden` (n, hidden_size) float, `weight` (vocab,
    hidden_size) in any float dtype, `targets` (n,) int64 token ids (no -100: the caller drops unscored
    positions), `rows` per chunk. Returns a 0-dim tensor of summed nats, in `hidden`'s dtype promoted to
    at least fp32 (the softmax runs in it). The gradients, stored for backward, are (n, hidden_size) in
    `hidden`'s dtype and, when the head trains, (vocab, hidden_size) in fp32 (cast to `weight`'s dtype in
    backward); backward multiplies them by the incoming gradient.
    """

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int
    ) -> torch.Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        exact = torch.promote_types(hidden.dtype, torch.float32)  # softmax in fp32 at least
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=exact) if need_weight else None
        total = torch.zeros((), dtype=exact, device=hidden.device)
        for start in range(0, hidden.size(0), rows):
            part, wanted = hidden[start : start + rows], targets[start : start + rows]
            logits = (part @ weight.T).to(exact)
            log_norm = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, wanted[:, None])[:, 0]
            total += (log_norm - picked).sum()
            if need_hidden or need_weight:
                grad_logits = torch.softmax(logits, dim=-1)  # d loss / d logits = softmax - one_hot
                grad_logits[torch.arange(part.size(0), device=part.device), wanted] -= 1
                grad_logits = grad_logits.to(hidden.dtype)
                if grad_hidden is not None:
                    grad_hidden[start : start + rows] = grad_logits @ weight
                if grad_weight is not None:
                    grad_weight += (grad_logits.T @ part).to(exact)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = list(ctx.saved_tensors)
        grad_hidden = saved.pop(0) * grad_total if ctx.has[0] else None
        grad_weight = (saved.pop(0) * grad_total).to(ctx.weight_dtype) if ctx.has[1] else None
        return grad_hidden, grad_weight, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `targets`; the same value and gradients as
    `F.cross_entropy(hidden @ weight.T, targets, reduction="sum")`, in a fraction of the memory.

    Args:
        hidden: (n, hidden_size) float: the final-norm hidden states at the n scored positions.
        weight: (vocab, hidden_size): the LM head's weight (no bias).
        targets: (n,) int64: the next token at each position, all in [0, vocab).

    Returns:
        0-dim tensor in `hidden`'s dtype promoted to at least fp32: the loss summed over the n rows, in
        nats. Under `torch.no_grad` (evaluation) no gradients are computed or kept.
    """
    if not torch.is_grad_enabled():
        with torch.no_grad():
            return ChunkedLinearCrossEntropy.forward(
                _NoGrad(), hidden, weight, targets, chunk_rows(weight.size(0))
            )
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows(weight.size(0)))


class _NoGrad:
    """Stands in for autograd's context when only the loss is wanted (evaluation)."""

    needs_input_grad = (False, False, False, False)

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass


def add_answer_loss(model: PreTrainedModel) -> None:
    """Let `model(..., labels=..., answer_loss=True)` return the mean loss over labelled tokens, computed as
    above. The forward is patched on the instance (before PEFT or DDP wrap it, which pass the flag through);
    without the flag it is the original forward, so generation and evaluation code are unchanged.

    Args:
        model: A transformers causal LM (the base under a PeftModel), patched in place.

    The patched `forward(*args, answer_loss=True, num_items_in_batch=None, labels=..., **kwargs)` takes
    the model's own inputs (`input_ids` (batch, seq) int64, `attention_mask` or `position_ids`) and
    `labels` (batch, seq) int64 with -100 where unscored; position i is scored when `labels[:, i + 1]`
    is not -100, as in transformers' `ForCausalLMLoss`. It returns a CausalLMOutput whose `loss` (0-dim)
    is the summed nats over `num_items_in_batch` (int or 0-dim tensor; None: this call's scored-token
    count, at least 1), and no logits. A head that is not a plain bias-free `nn.Linear` (lm_head among
    the LoRA targets) gets the model's own loss instead, with its logits.

    Changing it needs the parity tests, the DDP test and a planner re-measure (train/sft.py's docstring).
    """
    original = model.forward

    def forward(
        self: PreTrainedModel,
        *args: Any,
        answer_loss: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> Any:
        if not answer_loss:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original(*args, **kwargs)
        head = self.get_output_embeddings()
        if type(head) is not torch.nn.Linear or head.bias is not None:
            # An adapted or biased head (lm_head among the LoRA targets): the model's own loss is exact.
            return original(*args, num_items_in_batch=num_items_in_batch, **kwargs)
        labels = kwargs.pop("labels")
        kwargs["use_cache"] = False
        hidden = getattr(self, self.base_model_prefix)(*args, **kwargs).last_hidden_state
        following = labels[:, 1:]
        scored = following != IGNORE_INDEX
        total = chunked_cross_entropy(hidden[:, :-1][scored], head.weight, following[scored])
        count = num_items_in_batch if num_items_in_batch is not None else scored.sum().clamp(min=1)
        return CausalLMOutput(loss=total / count)

    model.forward = types.MethodType(forward, model)
