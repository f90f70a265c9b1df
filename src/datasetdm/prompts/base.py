"""A prompt and the rule that picks one for each sample id.

Generation asks a prompt source for ``prompt(sample_id)``; the answer depends only on the run seed
and the id, so a resumed run, or one with another batch size, sees the same prompts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Protocol, Sequence

from datasetdm.io import sample_seed
from datasetdm.text import plural


@dataclass(frozen=True)
class Prompt:
    """A text prompt and the class names it asks for (used to score the annotations)."""

    text: str
    classes: tuple[str, ...] = ()


class PromptSource(Protocol):
    def prompt(self, sample_id: int) -> Prompt: ...


def classes_in_text(text: str, classes: Sequence[str]) -> tuple[str, ...]:
    """The class names that occur in ``text`` as words, singular or plural (a trailing 's'/'es'
    allowed, and the plural ``text.plural`` writes: "two people" asks for "person")."""
    lowered = text.lower()
    found = []
    for name in classes:
        forms = re.escape(name.lower()) + r"(?:s|es)?|" + re.escape(plural(name.lower()))
        pattern = r"\b(?:" + forms + r")\b"
        if re.search(pattern, lowered):
            found.append(name)
    return tuple(found)


def append_class_names(text: str, classes: Sequence[str]) -> str:
    """Class-prompt appending (Dataset Diffusion, §3.2): "a dog on a sofa" -> "a dog on a sofa;
    dog sofa", so every class is named even where the text says "two people" or "a man".

    A text that already ends with these names after "; " is returned as it is, so appending twice
    (a prompt file written this way, then a labeler that appends) changes nothing."""
    if not classes:
        return text
    joined = " ".join(classes)
    head, sep, tail = text.rpartition("; ")
    if sep and sorted(tail.split()) == sorted(joined.split()):
        return text
    return f"{text}; {joined}"


class PromptList:
    """A fixed list of prompts, used in a seeded order.

    Sample ids walk through one seeded permutation of the list per pass ("epoch"), so every prompt
    is used once before any is repeated, and the order still varies between passes.
    """

    def __init__(self, prompts: Sequence[Prompt], seed: int = 0):
        if not prompts:
            raise ValueError("PromptList needs at least one prompt")
        self.prompts = list(prompts)
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.prompts)))
            random.Random(sample_seed(self.seed, epoch, "prompt-order")).shuffle(order)
            self._orders = {epoch: order}  # one pass at a time is all a run needs
        return self._orders[epoch]

    def prompt(self, sample_id: int) -> Prompt:
        epoch, index = divmod(sample_id, len(self.prompts))
        return self.prompts[self._order(epoch)[index]]
