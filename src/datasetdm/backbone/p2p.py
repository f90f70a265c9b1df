"""Prompt-to-prompt attention control (Hertz et al., 2022: the DatasetDM paper's ref. [24], used for
its editing-with-labels composition, §1 and Fig. 4).

A source prompt and an edited prompt (one word swapped: "a red ball" -> "a blue ball") are
denoised together from the same seed. During the first steps every cross-attention layer gives
the edited prompt the source prompt's attention maps for the tokens the two prompts share (and
for a swapped word of the same token length, the source word's map, as P2P's word swap does), and
the self-attention layers give it the source's self-attention (P2P's self-attention injection).
The layout, which the early steps fix, is then the source's, while the new word's conditioning
(its value vectors) changes what is drawn there. Only the conditional half of a classifier-free
guided batch is edited, as in P2P.

The control uses diffusers' public extension points only: ``Attention.get_processor`` /
``set_processor`` per layer (restored on exit) and a forward pre-hook on the UNet that counts the
denoising steps, so any generate loop (``capture.generate``, the labelers' ``generate_fn``) runs
under it unchanged. Layers compute the ordinary attention (their own processor) whenever they are
not injecting.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch

from datasetdm.errors import DatasetdmError


def token_alignment(tokenizer, source: str, target: str, max_length: int) -> tuple[list[int], list[int]]:
    """For each token position of ``target`` (padded to ``max_length``), the ``source`` position
    whose attention map it takes, or -1 (it keeps its own). Equal runs map one to one; a replaced
    run of the same length maps one to one too (a swapped word); other changes keep their own.
    Also returns the target positions that differ from the source."""
    def ids(text):
        return list(tokenizer(text, padding="max_length", max_length=max_length, truncation=True).input_ids)

    a, b = ids(source), ids(target)
    mapping = [-1] * len(b)
    changed = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op != "equal":
            changed += list(range(j1, j2))
        if op == "equal" or (op == "replace" and i2 - i1 == j2 - j1):
            for k in range(j2 - j1):
                mapping[j1 + k] = i1 + k
    return mapping, changed


@dataclass
class EditControl:
    """What to inject, and when. ``mapping``: per target token, the source token (-1 none);
    ``cross_steps``/``self_steps``: the number of first UNet forwards that inject; ``pairs``:
    source/target pairs in the batch (sources first, then targets, as ``prompts`` are passed)."""

    mapping: list[int]
    cross_steps: int
    self_steps: int
    pairs: int = 1
    self_max_tokens: int = 16 * 16  # P2P injects self-attention at 16x16 and coarser only (SD at 512 px)
    step: int = field(default=-1, init=False)  # index of the UNet forward running now

    def rows(self, batch: int) -> tuple[slice, slice] | None:
        """(source rows, target rows) of the conditional half of a UNet batch."""
        n = 2 * self.pairs
        if batch == 2 * n:
            start = n  # classifier-free guidance: [negative ..., conditional ...]
        elif batch == n:
            start = 0
        else:
            return None
        return slice(start, start + self.pairs), slice(start + self.pairs, start + n)

    def injects(self, cross: bool, tokens: int) -> bool:
        if cross:
            return 0 <= self.step < self.cross_steps
        return 0 <= self.step < self.self_steps and tokens <= self.self_max_tokens


class EditAttnProcessor:
    """A layer's processor under prompt-to-prompt control: its own processor when not injecting;
    otherwise the attention computed explicitly (as diffusers' ``AttnProcessor`` does) with the
    target rows' probabilities replaced by the source rows' where ``EditControl`` says."""

    def __init__(self, inner, control: EditControl):
        self.inner = inner
        self.control = control

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        ctl = self.control
        cross = encoder_hidden_states is not None
        tokens = hidden_states.shape[-2] * hidden_states.shape[-1] if hidden_states.ndim == 4 else hidden_states.shape[1]
        rows = ctl.rows(hidden_states.shape[0])
        if rows is None or not ctl.injects(cross, tokens):
            if temb is not None:
                kwargs["temb"] = temb
            return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, **kwargs)
        return self._injected(attn, hidden_states, encoder_hidden_states, attention_mask, temb, rows, cross)

    def _injected(self, attn, hidden_states, context, attention_mask, temb, rows, cross):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape4 = hidden_states.shape if hidden_states.ndim == 4 else None
        if shape4 is not None:
            b, c, h, w = shape4
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if context is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        q, k, v = (attn.head_to_batch_dim(t) for t in (q, k, v))  # (B * heads, n, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        probs = attn.get_attention_scores(q, k, mask)  # (B * heads, n_q, n_k)
        probs = probs.view(batch, attn.heads, *probs.shape[1:])
        src, tgt = rows
        if cross:
            mapping = self.control.mapping
            if len(mapping) != probs.shape[-1]:
                raise DatasetdmError(f"prompt-to-prompt: {len(mapping)} aligned tokens for a layer attending to "
                                     f"{probs.shape[-1]}")
            have = [j for j, i in enumerate(mapping) if i >= 0]
            if have:
                take = torch.tensor([mapping[j] for j in have], device=probs.device)
                edited = probs[tgt].clone()
                edited[..., have] = probs[src][..., take]
                probs = probs.clone()
                probs[tgt] = edited
        else:
            probs = probs.clone()
            probs[tgt] = probs[src]
        out = torch.bmm(probs.view(batch * attn.heads, *probs.shape[2:]), v)
        out = attn.batch_to_head_dim(out)
        out = attn.to_out[1](attn.to_out[0](out))
        if shape4 is not None:
            out = out.transpose(-1, -2).reshape(*shape4)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class prompt_to_prompt:
    """Context manager: installs ``EditAttnProcessor`` on every attention layer of ``unet`` and a
    step counter (forward pre-hook); both removed on exit. Generate with the prompts
    ``[source, target]`` and the same seed for both while it is active."""

    def __init__(self, unet, control: EditControl):
        self.unet, self.control = unet, control
        self._originals: dict = {}
        self._hook = None

    def __enter__(self) -> EditControl:
        from diffusers.models.attention_processor import Attention

        self.control.step = -1
        try:
            for module in self.unet.modules():
                if isinstance(module, Attention):
                    proc = module.get_processor()
                    self._originals[module] = proc
                    module.set_processor(EditAttnProcessor(proc, self.control))

            def advance(_module, _args):
                self.control.step += 1

            self._hook = self.unet.register_forward_pre_hook(advance)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.control

    def __exit__(self, *exc) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for module, proc in self._originals.items():
            module.set_processor(proc)
        self._originals = {}
