"""The training loss: label-smoothed cross-entropy, on logits or fused with the output layer."""

from __future__ import annotations

import torch


def _smoothed_ce(z: torch.Tensor, target: torch.Tensor, eps: float, grad: bool):
    """Summed label-smoothed cross-entropy of logits z (rows, V) and, when `grad`, its gradient with
    respect to z: softmax(z) minus the smoothed one-hot, (1 - eps) on the target and eps / V on every
    token. The log-probabilities are overwritten by the gradient, so no (rows x V) tensor is made twice."""
    lp = torch.log_softmax(z.float(), dim=-1)
    V = lp.shape[1]
    loss = -((1 - eps) * lp.gather(1, target[:, None]).sum() + eps / V * lp.sum())
    if not grad:
        return loss, None
    g = lp.exp_().sub_(eps / V)
    g[torch.arange(len(target), device=g.device), target] -= 1 - eps
    return loss, g


class _SmoothedCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits, target, label_smoothing=eps, reduction="sum") in fewer passes over the
    (tokens x vocab) logits; the gradient is computed with the loss, so backward is one multiply.

    Memory: the logits are the largest tensor of a step (25k tokens x 32k vocabulary in bf16 is
    1.6 GB), so the fp32 work goes in row chunks of CHUNK_BYTES, and the gradient is kept in the
    logits' dtype and multiplied in place: the loss adds the gradient's 1x the logits' bytes and a
    chunk. Whole, in fp32, it added 5x (an fp32 copy, the fp32 log-probabilities, the fp32 gradient,
    and backward's product and cast)."""

    @staticmethod
    def forward(ctx, logits, target, eps):
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if need_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=logits.device)
        rows = chunk_rows(logits.shape[1])
        for start in range(0, logits.shape[0], rows):
            part, g = _smoothed_ce(logits[start:start + rows], target[start:start + rows], eps, need_grad)
            loss += part
            if need_grad:
                grad[start:start + rows] = g
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, = ctx.saved_tensors
        return grad.mul_(grad_loss), None, None  # in place: backward runs once (no retain_graph)


def label_smoothed_loss(logits: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """Summed cross-entropy against (1 - eps) one-hot + eps uniform (Szegedy et al. 2016; the paper §5.4).
    Callers pass real tokens only, so padding never reaches the output layer."""
    return _SmoothedCrossEntropy.apply(logits, target, eps)


# Rows of logits per chunk in `output_loss`: a chunk of about 3 MB of fp32 logits stays in a core's
# L2 cache (2 MB per core on the Xeons we measured, 96-192 rows of 6k alike) through the half-dozen
# passes over it, where the whole (tokens x V) tensor goes to memory and back on each.
CHUNK_BYTES = 3 << 20


def chunk_rows(vocab: int) -> int:
    """Rows of fp32 logits over `vocab` in one CHUNK_BYTES chunk of `output_loss`."""
    return max(1, CHUNK_BYTES // (4 * vocab))


class _OutputLoss(torch.autograd.Function):
    """The output layer (hidden @ weight^T) and `label_smoothed_loss` over chunks of rows, the gradients
    of hidden and weight accumulated chunk by chunk in the same pass (as Liger-Kernel's fused linear
    cross-entropy): the (tokens x V) logits never exist whole. Under autocast the matmuls run in its
    dtype, like the nn.Linear they replace; the weight's gradient is summed in fp32. Meant for CPUs
    (fp32 or bf16): the gradients are made here, before fp16 training's loss scale is applied to
    them in backward, so under fp16 their small values could underflow."""

    @staticmethod
    def forward(ctx, hidden, weight, target, eps):
        rows = chunk_rows(weight.shape[0])
        need_grad = any(ctx.needs_input_grad[:2])
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], target[start:start + rows]
            part, g = _smoothed_ce(h @ weight.t(), t, eps, need_grad)
            loss += part
            if need_grad:
                grad_hidden[start:start + rows] = g @ weight
                grad_weight += (g.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, (grad_weight * grad_loss).to(ctx.weight_dtype), None, None


def output_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """label_smoothed_loss(hidden @ weight.T, target, eps), the output layer included, without making
    the whole (tokens x V) logits: 0.55x the time of the two on a 2-core CPU (1,900 tokens, d_model 128,
    6k vocabulary, forward + backward). `hidden` holds the real target positions only."""
    return _OutputLoss.apply(hidden, weight, target, eps)
