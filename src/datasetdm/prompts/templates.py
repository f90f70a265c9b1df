"""Template prompts: "a photo of a {cls}" with attribute, colour, count and scene variations.

Each sample id gets a class (every class once per pass, in a seeded order, so classes stay
balanced) and a variation drawn from a generator seeded by (run seed, sample id): the same id
always gets the same prompt.
"""

from __future__ import annotations

import random
from typing import Sequence

from datasetdm.io import sample_seed
from datasetdm.prompts.base import Prompt
from datasetdm.text import plural

COLOURS = ("red", "blue", "green", "yellow", "white", "black", "grey", "brown", "orange", "purple")
ATTRIBUTES = ("small", "large", "old", "new", "shiny", "dusty", "bright", "dark")
COUNTS = ("two", "three", "four", "several", "a group of")
SCENES = (
    "in a park", "on a city street", "in a living room", "on a beach", "in a field",
    "at night", "in the snow", "next to a wall", "in a garden", "on a sunny day",
)
# Whole-prompt shapes; the variation names are what `TemplatePrompts.weights` refers to.
VARIATIONS = ("plain", "colour", "attribute", "count", "scene", "pair")

def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


class TemplatePrompts:
    """Deterministic template prompts over a list of class names.

    ``weights`` maps variation names (see ``VARIATIONS``) to relative frequencies; "pair" puts a
    second class in the prompt and is skipped when there is only one class.
    """

    def __init__(
        self,
        classes: Sequence[str],
        seed: int = 0,
        template: str = "a photo of {obj}",
        colours: Sequence[str] = COLOURS,
        attributes: Sequence[str] = ATTRIBUTES,
        counts: Sequence[str] = COUNTS,
        scenes: Sequence[str] = SCENES,
        weights: dict[str, float] | None = None,
    ):
        classes = [c.strip() for c in classes if c.strip()]
        if not classes:
            raise ValueError("TemplatePrompts needs at least one class name")
        if "{obj}" not in template:
            raise ValueError(f"template {template!r} must contain '{{obj}}'")
        self.classes = classes
        self.seed = seed
        self.template = template
        self.colours, self.attributes, self.counts, self.scenes = colours, attributes, counts, scenes
        weights = dict(weights or {"plain": 2, "colour": 1, "attribute": 1, "count": 1, "scene": 2, "pair": 1})
        unknown = set(weights) - set(VARIATIONS)
        if unknown:
            raise ValueError(f"unknown prompt variations {sorted(unknown)}; choose from {VARIATIONS}")
        if len(classes) < 2:
            weights.pop("pair", None)
        self.variations = [v for v in VARIATIONS if weights.get(v, 0) > 0]
        self.weights = [weights[v] for v in self.variations]
        if not self.variations:
            raise ValueError("all prompt variation weights are zero")

    def _class_for(self, sample_id: int) -> str:
        epoch, index = divmod(sample_id, len(self.classes))
        order = list(range(len(self.classes)))
        random.Random(sample_seed(self.seed, epoch, "template-class")).shuffle(order)
        return self.classes[order[index]]

    def prompt(self, sample_id: int) -> Prompt:
        cls = self._class_for(sample_id)
        rng = random.Random(sample_seed(self.seed, sample_id, "template"))
        kind = rng.choices(self.variations, weights=self.weights)[0]
        classes = (cls,)
        if kind == "colour":
            colour = rng.choice(self.colours)
            obj = f"{article(colour)} {colour} {cls}"
        elif kind == "attribute":
            attr = rng.choice(self.attributes)
            obj = f"{article(attr)} {attr} {cls}"
        elif kind == "count":
            obj = f"{rng.choice(self.counts)} {plural(cls)}"
        elif kind == "scene":
            obj = f"{article(cls)} {cls} {rng.choice(self.scenes)}"
        elif kind == "pair":
            other = rng.choice([c for c in self.classes if c != cls])
            obj = f"{article(cls)} {cls} and {article(other)} {other}"
            classes = (cls, other)
        else:
            obj = f"{article(cls)} {cls}"
        return Prompt(self.template.format(obj=obj), classes)
