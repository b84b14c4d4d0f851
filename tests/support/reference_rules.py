"""Slow, plain backward rules written straight from the papers, for comparison with our kernels."""

from __future__ import annotations

import torch


def _rule_relu(name: str):
    class ExplicitRule(torch.autograd.Function):
        @staticmethod
        def forward(ctx, f):
            ctx.save_for_backward(f)
            return f.clamp(min=0)

        @staticmethod
        def backward(ctx, r):
            (f,) = ctx.saved_tensors
            forward_mask = (f > 0).to(r.dtype)
            signal_mask = (r > 0).to(r.dtype)
            if name == "saliency":
                return forward_mask * r          # 1[f>0]·R
            if name == "guided_backprop":
                return forward_mask * signal_mask * r  # 1[f>0]·1[R>0]·R
            if name == "deconvnet":
                return signal_mask * r           # 1[R>0]·R
            raise ValueError(name)

    return ExplicitRule.apply


def reference_attribution(model, inputs: torch.Tensor, targets: torch.Tensor, rule: str) -> torch.Tensor:
    """d logit[target] / d input through ``model.reference_forward`` with the explicit rule at each ReLU."""
    x = inputs.detach().clone().requires_grad_(True)
    logits = model.reference_forward(x, _rule_relu(rule))
    picked = logits[torch.arange(len(targets)), targets]
    (gradient,) = torch.autograd.grad(picked.sum(), x)
    return gradient
