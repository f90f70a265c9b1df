"""Prompts for text-to-data generation: templates, prompt files and an LLM prompt builder."""

from datasetdm.prompts.base import Prompt, PromptList, PromptSource, classes_in_text
from datasetdm.prompts.files import load_prompts, read_prompts, write_prompts
from datasetdm.prompts.templates import TemplatePrompts

__all__ = [
    "Prompt",
    "PromptList",
    "PromptSource",
    "TemplatePrompts",
    "classes_in_text",
    "load_prompts",
    "read_prompts",
    "write_prompts",
]
