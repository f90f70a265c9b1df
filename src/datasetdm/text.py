"""English plurals of class names: prompts write them, the world's captions use them, and prompt
agreement must read "two people" as asking for "person"."""

from __future__ import annotations

# plurals that are not the name + "s"/"es"/"ies"
IRREGULAR_PLURALS = {
    "person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
    "sheep": "sheep", "fish": "fish", "deer": "deer", "foot": "feet", "tooth": "teeth",
    "goose": "geese", "knife": "knives", "leaf": "leaves",
}


def plural(noun: str) -> str:
    """English plural of a class name (last word only: "traffic light" -> "traffic lights")."""
    head, _, last = noun.rpartition(" ")
    lower = last.lower()
    if lower in IRREGULAR_PLURALS:
        last = IRREGULAR_PLURALS[lower]
    elif lower.endswith(("s", "x", "z", "ch", "sh")):
        last = last + "es"
    elif lower.endswith("y") and lower[-2:-1] not in tuple("aeiou"):
        last = last[:-1] + "ies"
    else:
        last = last + "s"
    return f"{head} {last}" if head else last
