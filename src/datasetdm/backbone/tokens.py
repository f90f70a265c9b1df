"""Class names as prompt tokens, and their cross-attention maps: the one place for both.

Dataset Diffusion treated each word as one CLIP token; BPE splits many names ("hedgehog" may be
one token, "aardwolf" several) and WordPiece splits them differently again. Here the phrase is
tokenized alone with the model's own tokenizer (``name_token_ids``) and its token sequence is
searched in the prompt's (``span_positions``); a class's map is the average of the maps of the
tokens it occupies (``class_token_maps``: every occurrence, every token of a multi-token name).
The decoder's inputs, the attention labeler and the backbone's probe gate all read maps this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from datasetdm.backbone.loader import MAX_TOKENS
from datasetdm.errors import DatasetdmError


def _ids(tokenizer, text: str, max_length: int | None = None) -> list[int]:
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    return list(tokenizer(text, add_special_tokens=max_length is not None, **kwargs).input_ids)


def name_token_ids(tokenizer, names: Sequence[str]) -> list[list[int]]:
    """Each name's token ids as they stand inside a prompt (no BOS/EOS or CLS/SEP of its own)."""
    return [_ids(tokenizer, name) for name in names]


def span_positions(ids: Sequence[int], span: Sequence[int]) -> list[int]:
    """Positions in ``ids`` covered by the occurrences of ``span`` (whole tokens, left to right,
    occurrences not overlapping): ``[a, b, a, b]`` and ``[a, b]`` give ``[0, 1, 2, 3]``."""
    ids, span = list(ids), list(span)
    n, positions, i = len(span), [], 0
    if n == 0:
        return positions
    while i <= len(ids) - n:
        if ids[i : i + n] == span:
            positions.extend(range(i, i + n))
            i += n
        else:
            i += 1
    return positions


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
    positions = span_positions(_ids(tokenizer, prompt, max_length=limit), phrase_ids)
    if not positions:
        cut = " (it lies beyond the first %d tokens the model sees)" % limit if span_positions(
            _ids(tokenizer, prompt), phrase_ids) else ""
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


def position_weights(positions: Sequence[Sequence[Sequence[int]]], tokens: int):
    """(B, K, T) averaging weights: row (b, k) is 1/n on the n positions ``positions[b][k]``
    (zero when there are none: the class is not named in that prompt)."""
    import torch

    classes = {len(per_class) for per_class in positions}
    if len(classes) > 1:
        raise ValueError(f"position lists for {sorted(classes)} classes: every prompt needs one per class")
    weights = torch.zeros(len(positions), classes.pop() if classes else 0, tokens)
    for b, per_class in enumerate(positions):
        for k, pos in enumerate(per_class):
            if pos:
                weights[b, k].index_add_(0, torch.as_tensor(list(pos)), torch.full((len(pos),), 1.0 / len(pos)))
    return weights


def weighted_token_maps(maps, weights):
    """Per-token maps (B, T, h, w) — or a list of them, one per resolution — combined by (B, K, T)
    weights into (B, K, h, w) (or a list). fp16 maps are summed in fp32 and returned as fp16."""
    if isinstance(maps, (list, tuple)):
        return [weighted_token_maps(m, weights) for m in maps]
    import torch

    summed = torch.einsum("bkt,bthw->bkhw", weights.to(maps.device, torch.float32), maps.float())
    return summed.to(maps.dtype)


def class_token_maps(maps, input_ids, class_spans: Sequence[Sequence[Sequence[int]]]):
    """Per-class cross-attention maps from per-token ones: class k's map in prompt b is the mean of
    the maps at every position where one of ``class_spans[k]`` (token sequences that name it, e.g.
    a name and its plural) occurs in ``input_ids[b]``; zero where the prompt does not name it.

    ``maps``: (B, T, h, w) or a list per resolution; ``input_ids``: (B, ≥T) ids of the prompts the
    maps were captured with (positions past T, beyond the maps, are not counted)."""
    tokens = (maps[0] if isinstance(maps, (list, tuple)) else maps).shape[1]
    rows = input_ids.tolist() if hasattr(input_ids, "tolist") else [list(r) for r in input_ids]
    positions = [[sorted({p for span in spans for p in span_positions(ids, span) if p < tokens}) for spans in class_spans]
                 for ids in rows]
    return weighted_token_maps(maps, position_weights(positions, tokens))


def average_token_maps(maps, positions):
    """One map per sample for a phrase: its tokens' attention maps averaged.

    ``maps``: a (B, T, h, w) tensor or a list of them (one per resolution, as
    ``Hypercolumns.cross_attention``). ``positions``: the phrase's token positions from
    ``token_positions`` — one list for every sample, or one list per sample (prompts differ).
    Returns (B, h, w) (or a list of them): a name of several BPE/WordPiece tokens, or one that
    occurs twice, is the mean of all its token maps.
    """
    first = maps[0] if isinstance(maps, (list, tuple)) else maps
    b, t = first.shape[:2]
    per_sample = [list(p) for p in positions] if positions and not isinstance(positions[0], int) else [list(positions)] * b
    if len(per_sample) != b:
        raise DatasetdmError(f"{len(per_sample)} position lists for a batch of {b}: pass one list, or one per sample")
    for pos in per_sample:
        if not pos or min(pos) < 0 or max(pos) >= t:
            raise DatasetdmError(f"token positions {pos}: need at least one, each in [0, {t})")
    out = weighted_token_maps(maps, position_weights([[pos] for pos in per_sample], t))
    return [m[:, 0] for m in out] if isinstance(out, list) else out[:, 0]
