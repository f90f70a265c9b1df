"""The trainers' shared training utilities (learning-rate schedule, EMA, Min-SNR weights) are the
libraries' and give the values the hand-written versions gave: the redesign changes no result."""

import copy
import math

import pytest
import torch

from datasetdm.embedded import model as embedded
from datasetdm.embedded import train as train_mod
from datasetdm.training.schedule import warmup_cosine


def old_schedule(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The factor both trainers computed by hand before (training.py, backbone/train.py)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup,total,min_ratio", [(50, 1500, 0.0), (500, 8000, 0.1), (100, 1000, 0.1)])
def test_schedule_gives_the_old_rates(warmup, total, min_ratio):
    """decoder (50 of 1500, to 0), backbone UNet (500 of 8000, to 0.1), VAE fine-tune (100 of 1000)."""
    new = warmup_cosine(warmup, total, min_ratio)
    for step in range(warmup):  # warm-up: the same rate at every step, the first one included
        assert new(step) == pytest.approx(old_schedule(step, warmup, total, min_ratio), abs=1e-12)
    assert new(0) == pytest.approx(1 / warmup) and new(warmup - 1) == pytest.approx(1.0)
    # the cosine: the library's counts one step further, so it ends exactly at min_ratio on the last
    # step; every rate is the old rate of the next step, at most π/2·(1 − min)/(total − warmup) apart
    bound = math.pi / 2 * (1 - min_ratio) / (total - warmup)
    for step in range(warmup, total):
        assert new(step) == pytest.approx(old_schedule(step + 1, warmup, total, min_ratio), abs=1e-12)
        assert abs(new(step) - old_schedule(step, warmup, total, min_ratio)) <= bound + 1e-12
    mid = warmup + (total - warmup) // 2
    assert new(mid) == pytest.approx(min_ratio + (1 - min_ratio) / 2, abs=bound)
    assert new(total - 1) == pytest.approx(min_ratio, abs=1e-12)


def test_ema_gives_the_old_averages_and_resumes_like_an_unbroken_run():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    old = copy.deepcopy(model).requires_grad_(False)
    holder = copy.deepcopy(model).requires_grad_(False)
    ema = train_mod._ema_tracker(holder, decay=0.9, step=0)  # a small cap, so the cap is reached too
    steps, decays = 60, []
    for step in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)  # one "optimizer step"
            decay = min(0.9, (1 + step) / (10 + step))  # the hand-written update
            torch._foreach_lerp_(list(old.parameters()), list(model.parameters()), 1 - decay)
        ema.step(list(model.parameters()))
        decays.append(ema.cur_decay_value)
        if step == 29:  # save and resume half-way, as train_unet does from a state file
            ema.copy_to(holder.parameters())
            saved = copy.deepcopy(holder)
            ema = train_mod._ema_tracker(saved, decay=0.9, step=step + 1)
    # diffusers' first update copies the weights (decay 0), the old one kept 10% of the start; from
    # the second step on the decays are the same, and the difference fades by their product
    assert decays[0] == 0.0
    assert decays[1:] == pytest.approx([min(0.9, (1 + s) / (10 + s)) for s in range(1, steps)], abs=1e-12)
    ema.copy_to(holder.parameters())
    for a, b in zip(holder.parameters(), old.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_min_snr_weights_are_the_formula():
    scheduler = embedded.build_train_scheduler()
    t = torch.arange(scheduler.config.num_train_timesteps)
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.clamp(snr, max=5.0) / (snr + 1)  # v-prediction Min-SNR-5, as before
    torch.testing.assert_close(train_mod._min_snr_weights(scheduler, t, 5.0), expected.float(), rtol=1e-5, atol=1e-7)
