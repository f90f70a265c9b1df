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


@dataclass(frozen=True)
class Prompt:
    """A text prompt and the class names it asks for (used to score the annotations)."""

    text: str
    classes: tuple[str, ...] = ()


class PromptSource(Protocol):
    def prompt(self, sample_id: int) -> Prompt: ...


# plurals that are not the name + "s"/"es" ("two people" must count as asking for "person")
IRREGULAR_PLURALS = {"person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
                     "foot": "feet", "tooth": "teeth", "goose": "geese", "knife": "knives", "leaf": "leaves"}


def classes_in_text(text: str, classes: Sequence[str]) -> tuple[str, ...]:
    """The class names that occur in ``text`` as words (a trailing plural 's'/'es' allowed, and
    the irregular plurals of ``IRREGULAR_PLURALS``)."""
    lowered = text.lower()
    found = []
    for name in classes:
        forms = re.escape(name.lower()) + r"(?:s|es)?"
        if name.lower() in IRREGULAR_PLURALS:
            forms += "|" + re.escape(IRREGULAR_PLURALS[name.lower()])
        pattern = r"\b(?:" + forms + r")\b"
        if re.search(pattern, lowered):
            found.append(name)
    return tuple(found)


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
