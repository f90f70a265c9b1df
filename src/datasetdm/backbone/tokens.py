"""Find which prompt tokens a class name occupies, so its cross-attention maps can be averaged.

Dataset Diffusion treated each word as one CLIP token; BPE splits many names ("hedgehog" may be
one token, "aardwolf" several) and WordPiece splits them differently again. Here the phrase is
tokenized alone with the model's own tokenizer and its token sequence is searched in the prompt's.
"""

from __future__ import annotations

from dataclasses import dataclass

from datasetdm.backbone.loader import MAX_TOKENS
from datasetdm.errors import DatasetdmError


def _ids(tokenizer, text: str, max_length: int | None = None) -> list[int]:
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    return list(tokenizer(text, add_special_tokens=max_length is not None, **kwargs).input_ids)


def token_positions(tokenizer, prompt: str, phrase: str, max_tokens: int | None = MAX_TOKENS) -> list[int]:
    """Indices of ``phrase``'s tokens in the tokenized ``prompt`` (padded ids, BOS/CLS counted as 0).

    Every occurrence is returned, in order (``"a photo of a dog, dog"`` gives both ``dog``
    positions), so a caller averaging the maps uses all of them; a name of several tokens returns
    all its token positions. Matching is on whole tokens: ``"cat"`` is not found in ``"cats"``
    (a different token). Raises ``DatasetdmError`` if the phrase does not occur within the first
    ``max_tokens`` tokens (the part of the prompt the model sees).
    """
    phrase_ids = _ids(tokenizer, phrase)
    if not phrase_ids:
        raise DatasetdmError(f"phrase {phrase!r} has no tokens")
    limit = min(int(max_tokens or tokenizer.model_max_length), int(tokenizer.model_max_length))
    prompt_ids = _ids(tokenizer, prompt, max_length=limit)
    n = len(phrase_ids)
    positions: list[int] = []
    i = 0
    while i <= len(prompt_ids) - n:
        if prompt_ids[i : i + n] == phrase_ids:
            positions.extend(range(i, i + n))
            i += n
        else:
            i += 1
    if not positions:
        full = _ids(tokenizer, prompt)
        cut = " (it lies beyond the first %d tokens the model sees)" % limit if _contains(full, phrase_ids) else ""
        raise DatasetdmError(f"phrase {phrase!r} does not occur in prompt {prompt!r}{cut}")
    return positions


@dataclass(frozen=True)
class PromptFit:
    """How a prompt fits the text encoder's window: ``text`` is the part the model reads (its
    first ``limit`` tokens, special tokens included, decoded back to words), ``tokens`` the whole
    prompt's length counted the same way."""

    text: str
    tokens: int
    limit: int

    @property
    def truncated(self) -> bool:
        return self.tokens > self.limit


def fit_prompt(tokenizer, prompt: str, max_tokens: int | None = MAX_TOKENS) -> PromptFit:
    """What of ``prompt`` the model reads. Words past the limit never reach the UNet, so a class
    named only there must not be labelled (the generation loop drops it from the labels)."""
    limit = min(int(max_tokens or tokenizer.model_max_length), int(tokenizer.model_max_length))
    full = _ids(tokenizer, prompt, max_length=10**6)
    if len(full) <= limit:
        return PromptFit(prompt, len(full), limit)
    seen = tokenizer.decode(full[:limit], skip_special_tokens=True)
    return PromptFit(seen, len(full), limit)


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def average_token_maps(maps, positions):
    """One map per sample for a phrase: its tokens' attention maps averaged.

    ``maps``: a (B, T, h, w) tensor or a list of them (one per resolution, as
    ``Hypercolumns.cross_attention``). ``positions``: the phrase's token positions from
    ``token_positions`` — one list for every sample, or one list per sample (prompts differ).
    Returns (B, h, w) (or a list of them): a name of several BPE/WordPiece tokens, or one that
    occurs twice, is the mean of all its token maps.
    """
    if isinstance(maps, (list, tuple)):
        return [average_token_maps(m, positions) for m in maps]
    import torch

    b, t = maps.shape[:2]
    per_sample = [list(p) for p in positions] if positions and not isinstance(positions[0], int) else [list(positions)] * b
    if len(per_sample) != b:
        raise DatasetdmError(f"{len(per_sample)} position lists for a batch of {b}: pass one list, or one per sample")
    weights = torch.zeros(b, t, dtype=maps.dtype, device=maps.device)
    for i, pos in enumerate(per_sample):
        if not pos or min(pos) < 0 or max(pos) >= t:
            raise DatasetdmError(f"token positions {pos}: need at least one, each in [0, {t})")
        for p in pos:
            weights[i, p] += 1.0 / len(pos)
    return torch.einsum("bt,bthw->bhw", weights, maps)
