"""Prompts from a large language model behind any OpenAI-compatible chat-completions endpoint.

Asks as the DatasetDM supplementary (§4.1, §4.2) describes: about 100 descriptions per class for
class-sensitive tasks (segmentation), or one large batch for class-agnostic ones (pose, depth),
with short follow-ups such as "More variation in number" until enough distinct ones are in.
The result is cached to a prompt file, so generation never needs the model.

Plain ``urllib`` keeps the dependency list short; the protocol is one POST to
``{base_url}/chat/completions``.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from datasetdm.errors import DatasetdmError
from datasetdm.prompts.base import Prompt, classes_in_text
from datasetdm.prompts.files import read_prompts, write_prompts
from datasetdm.prompts.templates import article
from datasetdm.text import plural

DEFAULT_BASE_URL = "https://api.openai.com/v1"

# Follow-ups cycled through after the first answer ({cls} and {plural} are filled in).
FOLLOW_UPS = (
    "More variation in number: some photos with one {cls}, some with two, some with many {plural}.",
    "More variation in the scene: different places, backgrounds and surrounding objects.",
    "More variation in viewpoint, distance, lighting, weather and time of day.",
    "More variation in the appearance of the {cls}: size, colour, pose, style and condition.",
)
AGNOSTIC_FOLLOW_UPS = (
    "More variation in number: some photos with one person, some with several.",
    "More variation in the scene: different places, backgrounds and activities.",
    "More variation in viewpoint, distance, lighting, weather and time of day.",
)

_NUMBERING = re.compile(r"^\s*(?:\(?\d+[.):\]]|[-*\u2022])\s*")


class ChatClient:
    """A minimal OpenAI-compatible chat-completions client.

    ``base_url``, ``api_key`` and ``model`` fall back to ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``
    and ``OPENAI_MODEL``. The key may be empty for local servers that need none.
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 2,
        retry_wait: float = 2.0,
        temperature: float = 1.0,
    ):
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.model = model or os.environ.get("OPENAI_MODEL")
        if not self.model:
            raise DatasetdmError("LLM prompts: no model given (pass --llm-model or set OPENAI_MODEL)")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.timeout = timeout
        self.retries = retries
        self.retry_wait = retry_wait
        self.temperature = temperature

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def chat(self, messages: list[dict]) -> str:
        """Send one conversation, return the assistant's reply text."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as e:
                # Rate limits and server errors are often transient; client errors are not.
                if (e.code == 429 or e.code >= 500) and attempt < self.retries:
                    time.sleep(self.retry_wait * 2**attempt)
                    continue
                raise DatasetdmError(f"{self.url}: HTTP {e.code}: {_error_message(e)}") from None
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise DatasetdmError(f"{self.url}: cannot reach the chat endpoint ({reason})") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise DatasetdmError(f"{self.url}: not a chat-completions response: {raw[:200]!r}") from None
        if not isinstance(content, str):
            raise DatasetdmError(f"{self.url}: reply content is not text: {content!r}"[:300])
        return content


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        raw = error.read()
    except Exception:
        return error.reason or "no details"
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace")[:300] or (error.reason or "no details")


def parse_descriptions(text: str, min_words: int = 0) -> list[str]:
    """One description per line: strip numbering, bullets and quotes; drop headers and short lines."""
    out = []
    for line in text.splitlines():
        line = _NUMBERING.sub("", line.strip()).strip().strip('"\u201c\u201d\'').strip()
        # "Here are 100 descriptions:" and similar preambles end with a colon.
        if not line or line.endswith(":"):
            continue
        line = " ".join(line.split())
        if len(line.split()) < max(min_words, 1):
            continue
        out.append(line)
    return out


def _dedupe_key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


class LLMPromptBuilder:
    """Collects ``n`` distinct descriptions per class (or ``n`` in all when ``classes`` is None)."""

    def __init__(self, client: ChatClient, min_words: int = 10, max_rounds: int = 6, task: str = "semantic segmentation"):
        self.client = client
        self.min_words = min_words
        self.max_rounds = max_rounds
        self.task = task

    def _first_request(self, n: int, cls: str | None, topic: str) -> str:
        subject = f"that contain {article(cls)} {cls}" if cls else f"of {topic}"
        mention = f" and mention the {cls}" if cls else ""
        return (
            f"Write {n} different descriptions of photos {subject}. Each description is one "
            f"sentence of at least {self.min_words} words{mention}, describing a realistic scene. "
            "Vary the setting, the viewpoint, the lighting and the appearance of the objects. "
            "Answer with one description per line, numbered, and nothing else."
        )

    def collect(self, n: int, cls: str | None = None, topic: str = "people in everyday scenes") -> list[str]:
        system = (
            "You write short, concrete descriptions of photographs. They are prompts for a "
            f"text-to-image model that generates training data for {self.task}."
        )
        messages = [{"role": "system", "content": system}, {"role": "user", "content": self._first_request(n, cls, topic)}]
        follow_ups = FOLLOW_UPS if cls else AGNOSTIC_FOLLOW_UPS
        found: dict[str, str] = {}
        for round_ in range(self.max_rounds):
            reply = self.client.chat(messages)
            for text in parse_descriptions(reply, self.min_words):
                found.setdefault(_dedupe_key(text), text)
            if len(found) >= n:
                break
            follow = follow_ups[round_ % len(follow_ups)].format(cls=cls, plural=plural(cls) if cls else "")
            messages += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": f"{follow} Write {n - len(found)} more, all different from the ones above, in the same format."},
            ]
        return list(found.values())[:n]

    def build(self, classes: Sequence[str] | None, n: int, topic: str = "people in everyday scenes") -> list[Prompt]:
        """Per class (class-sensitive tasks) or all at once (``classes`` None: pose, depth)."""
        if not classes:
            return [Prompt(t) for t in self.collect(n, None, topic)]
        prompts = []
        for cls in classes:
            for text in self.collect(n, cls):
                others = tuple(c for c in classes_in_text(text, classes) if c != cls)
                prompts.append(Prompt(text, (cls,) + others))
        return prompts


def build_prompt_file(
    out: str | os.PathLike,
    classes: Sequence[str] | None,
    n: int = 100,
    client: ChatClient | None = None,
    min_words: int = 10,
    max_rounds: int = 6,
    topic: str = "people in everyday scenes",
    refresh: bool = False,
) -> list[Prompt]:
    """Ask the model once and cache the prompts to ``out``; later calls just read the file."""
    out = Path(out)
    if out.exists() and not refresh:
        return read_prompts(out, classes)
    builder = LLMPromptBuilder(client or ChatClient(), min_words=min_words, max_rounds=max_rounds)
    prompts = builder.build(classes, n, topic)
    if not prompts:
        raise DatasetdmError(f"{builder.client.url}: the model returned no usable descriptions (at least {min_words} words each)")
    write_prompts(out, prompts)
    return prompts
