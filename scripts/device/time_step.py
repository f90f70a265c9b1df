"""Seconds per UNet training step (forward, backward, AdamW, EMA) at a batch size, on this machine's GPU.

The device script sizes ``--unet-steps`` from it so that training ends inside the call's time.
"""

import argparse
import time

import torch

from datasetdm.embedded import model as embedded

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=256)
parser.add_argument("--device", default="cuda")
args = parser.parse_args()
dev = torch.device(args.device)
unet = embedded.build_unet().to(dev)
ema = [p.detach().clone() for p in unet.parameters()]
opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
x = torch.randn(args.batch, embedded.LATENT_CHANNELS, embedded.LATENT_SIZE, embedded.LATENT_SIZE, device=dev)
cond = torch.randn(args.batch, embedded.MAX_TOKENS, embedded.TEXT_DIM, device=dev)
t = torch.randint(0, 1000, (args.batch,), device=dev)


def step() -> None:
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        loss = unet(x, t, cond).sample.float().pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    torch._foreach_lerp_(ema, list(unet.parameters()), 0.001)


def sync() -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


for _ in range(10):
    step()
sync()
n = 30 if dev.type == "cuda" else 3
t0 = time.perf_counter()
for _ in range(n):
    step()
sync()
print(f"{(time.perf_counter() - t0) / n:.4f}")
