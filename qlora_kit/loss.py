"""The training loss: summed next-token cross entropy over the labelled positions, computed in chunks.

    causal_lm_loss(model, batch) -> (summed loss, number of labelled tokens)

Only labelled positions reach ``lm_head`` (masked prompt tokens need no logits), ``facts.LOSS_CHUNK_TOKENS``
at a time, and the gradients are computed in forward (``_LinearCrossEntropy``), so the full
``tokens x vocab`` fp32 logits tensor -- the largest single activation of a small model -- never exists.
The caller divides by the token count of the whole optimizer step (token-weighted loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qlora_kit.data import IGNORE_INDEX
from qlora_kit.facts import LOSS_CHUNK_TOKENS


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross entropy over the positions that carry a label, and their count.

    Only labelled positions reach ``lm_head`` (masked prompt tokens need no logits), in chunks of
    ``LOSS_CHUNK_TOKENS``: the full ``tokens x vocab`` fp32 logits tensor, the largest single activation of a
    small model, never exists. See ``_LinearCrossEntropy`` for how backward avoids recomputing them.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs, use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    hidden = hidden[:, :-1][keep]
    targets = labels[keep]
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:  # no such head in supported models
        logits = head(hidden).float()
        return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())
    weight = head.weight
    if not torch.is_grad_enabled():  # eval: needs_input_grad ignores no_grad, so detach to skip the gradients
        hidden, weight = hidden.detach(), weight.detach()
    return _LinearCrossEntropy.apply(hidden, weight, targets), int(targets.numel())


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum(cross_entropy(hidden @ W^T, targets))`` with the gradients computed chunk by chunk in forward.

    The loss is a scalar, so d loss / d hidden is known as soon as a chunk's logits are: ``(softmax - onehot)
    @ W``. Forward keeps that (tokens x hidden, like one activation) and drops the chunk's logits at once;
    backward only scales it by the incoming gradient. Compared with checkpointing each chunk, the
    ``lm_head`` matmul runs once instead of twice; compared with plain autograd, no ``tokens x vocab`` fp32
    logits, log-softmax or gradient tensor is ever kept. Logits and softmax are in fp32 whatever the
    compute dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets):  # type: ignore[override]
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.numel(), LOSS_CHUNK_TOKENS):
            chunk = slice(start, start + LOSS_CHUNK_TOKENS)
            logits = (hidden[chunk] @ weight.t()).float()
            rows = torch.arange(logits.shape[0], device=logits.device)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits[rows, targets[chunk]]).sum()
            if not (want_hidden or want_weight):
                continue
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs[rows, targets[chunk]] -= 1  # d loss / d logits
            probs = probs.to(hidden.dtype)
            if want_hidden:
                torch.mm(probs, weight, out=grad_hidden[chunk])
            if want_weight:
                grad_weight.addmm_(probs.t().float(), hidden[chunk].float())
            del logits, probs
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype),
            None,
        )


def label_count(batch: dict[str, torch.Tensor]) -> int:
    """The positions of ``batch`` that take loss (a label after the first token that is not IGNORE_INDEX)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
