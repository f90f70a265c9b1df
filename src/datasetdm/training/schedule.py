"""The one learning-rate schedule of every trainer here (decoder, embedded backbone, its VAE):
linear warm-up, then a half cosine down to ``min_ratio`` of the base rate — transformers'
``get_cosine_with_min_lr_schedule_with_warmup_lr_rate``.

Trainers ask for the factor at a step (``lr = base · factor(step)``) instead of stepping a
scheduler object: the step is then all a resume needs, so training states written before this
schedule was shared (they hold no scheduler state) resume at the right rate, and a step that fp16
loss scaling skips does not move the schedule out of line with the step count.

What it gives: ``(s + 1) / warmup`` during the warm-up (the first step already learns), the base
rate at the last warm-up step, and the cosine's end (``min_ratio``) at the last step ``total − 1``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Step → learning-rate factor in (0, 1]; ``warmup`` steps of linear warm-up out of ``total``."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup_lr_rate

    # the factory wants an optimizer only to wrap its LambdaLR around; the factor itself is the lambda
    holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup_lr_rate(
        holder, num_warmup_steps=warmup, num_training_steps=total, min_lr_rate=min_ratio)
    (factor,) = scheduler.lr_lambdas
    return factor


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
