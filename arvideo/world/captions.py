"""Shapes-world captions: palette, scene specs, sampling, and the closed caption grammar.

Grammar (world-spec.md, "Captions")::

    caption     := object_list " on a " background " background"
    object_list := obj | obj " and " obj | obj ", " obj " and " obj
    obj         := "a " size " " colour " " shape

Parsing is case-insensitive, ignores extra whitespace and accepts "an" for "a".
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from arvideo.errors import PromptError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 5, "medium": 7, "large": 9}
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 110, 250),
    "yellow": (240, 220, 40),
    "cyan": (40, 220, 220),
    "magenta": (220, 50, 220),
    "white": (245, 245, 245),
    "orange": (250, 140, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (110, 110, 110),
    "navy": (20, 20, 90),
}
MAX_OBJECTS = 3

# "," is a token of its own (the grammar writes ", "); "an" is accepted but never produced.
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {",", "a", "and", "on", "background"}
        | set(SIZES)
        | set(OBJECT_COLOURS)
        | set(SHAPES)
        | set(BACKGROUNDS)
    )
)

_WORDS = tuple(w for w in VOCABULARY if w != ",")
_EXAMPLE = (
    "a small red circle, a large blue square and a medium white triangle on a gray background"
)


@dataclass(frozen=True)
class ObjectSpec:
    """One captioned object: shape, size word and colour name."""

    shape: str
    size: str
    colour: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise PromptError(f"unknown shape {self.shape!r}: use one of {', '.join(SHAPES)}")
        if self.size not in SIZES:
            raise PromptError(f"unknown size {self.size!r}: use one of {', '.join(SIZES)}")
        if self.colour not in OBJECT_COLOURS:
            raise PromptError(
                f"unknown object colour {self.colour!r}: use one of {', '.join(OBJECT_COLOURS)}"
            )

    @property
    def radius(self) -> int:
        """Radius r in pixels of the 64 x 64 frame."""
        return SIZES[self.size]

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The object's palette colour."""
        return OBJECT_COLOURS[self.colour]

    @property
    def phrase(self) -> str:
        """The object's canonical phrase, e.g. "a small red circle"."""
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class SceneSpec:
    """What a video shows: 1 to 3 objects of distinct colours, in drawing order, on a background."""

    objects: tuple[ObjectSpec, ...]
    background: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise PromptError(
                f"a scene has 1 to {MAX_OBJECTS} objects, got {len(self.objects)}: "
                "add or remove objects"
            )
        if self.background not in BACKGROUNDS:
            raise PromptError(
                f"unknown background {self.background!r}: use one of {', '.join(BACKGROUNDS)}"
            )
        _check_distinct_colours(self.objects)

    @property
    def caption(self) -> str:
        """The canonical caption."""
        return format_caption(self)

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        """The background's palette colour."""
        return BACKGROUNDS[self.background]


def _check_distinct_colours(objects: tuple[ObjectSpec, ...]) -> None:
    seen: dict[str, int] = {}
    for number, obj in enumerate(objects, start=1):
        if obj.colour in seen:
            free = [c for c in OBJECT_COLOURS if c not in {o.colour for o in objects}]
            raise PromptError(
                f"colour {obj.colour!r} is used by objects {seen[obj.colour]} and {number}; "
                f"each object must have a distinct colour: change one to any of {', '.join(free)}"
            )
        seen[obj.colour] = number


def sample_scene_spec(rng: np.random.Generator) -> SceneSpec:
    """Draw a scene: count uniform in {1, 2, 3}; shape, size, colour uniform (colours without
    replacement); background uniform."""
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    colour_names = list(OBJECT_COLOURS)
    colour_ids = rng.choice(len(colour_names), size=count, replace=False)
    sizes = list(SIZES)
    objects = tuple(
        ObjectSpec(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            size=sizes[int(rng.integers(len(sizes)))],
            colour=colour_names[int(c)],
        )
        for c in colour_ids
    )
    backgrounds = list(BACKGROUNDS)
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    return SceneSpec(objects=objects, background=background)


def format_caption(spec: SceneSpec) -> str:
    """The canonical caption of a scene."""
    phrases = [obj.phrase for obj in spec.objects]
    if len(phrases) == 1:
        objects = phrases[0]
    else:
        objects = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{objects} on a {spec.background} background"


@dataclass(frozen=True)
class _Token:
    text: str  # as typed
    word: str  # lower-cased
    position: int  # 1-based, commas count as tokens
    column: int  # 1-based character offset in the prompt


def _tokenize(text: str) -> list[_Token]:
    return [
        _Token(m.group(), m.group().lower(), i + 1, m.start() + 1)
        for i, m in enumerate(re.finditer(r",|[^\s,]+", text))
    ]


class _Parser:
    """Recursive-descent parser over the token list; every failure names the first bad token."""

    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.index = 0

    def fail(self, expected: str, hint: str = "") -> PromptError:
        if self.index < len(self.tokens):
            tok = self.tokens[self.index]
            kind = "word" if tok.word in VOCABULARY or tok.word == "an" else "unknown word"
            where = f"{kind} {tok.text!r} (word {tok.position}, character {tok.column})"
        elif self.tokens:
            where = f"the end of the prompt (after {self.tokens[-1].text!r})"
        else:
            where = "an empty prompt"
        hint = f" {hint}" if hint else ""
        return PromptError(
            f"cannot parse prompt {self.text!r}: found {where}, expected {expected}.{hint} "
            f"Captions look like {_EXAMPLE!r}. Vocabulary: {', '.join(_WORDS)}; plus ',' after "
            "the first of three objects; 'an' is accepted for 'a'."
        )

    def take(self, choices: Collection[str], expected: str, hint: str = "") -> str:
        if self.index < len(self.tokens) and self.tokens[self.index].word in choices:
            word = self.tokens[self.index].word
            self.index += 1
            return word
        raise self.fail(expected, hint)

    def article(self) -> None:
        self.take(("a", "an"), "'a' (or 'an')")

    def obj(self) -> ObjectSpec:
        self.article()
        size = self.take(SIZES, f"a size ({', '.join(SIZES)})")
        colour = self.take(OBJECT_COLOURS, f"an object colour ({', '.join(OBJECT_COLOURS)})")
        shape = self.take(SHAPES, f"a shape ({', '.join(SHAPES)})")
        return ObjectSpec(shape=shape, size=size, colour=colour)

    def caption(self) -> SceneSpec:
        objects = [self.obj()]
        separator = self.take((",", "and", "on"), "',', 'and' or 'on'")
        if separator == ",":
            objects.append(self.obj())
            self.take(
                ("and",),
                "'and' before the last object",
                f"A caption has at most {MAX_OBJECTS} objects, written 'A, B and C'.",
            )
            objects.append(self.obj())
            self.take(("on",), "'on'", f"A caption has at most {MAX_OBJECTS} objects.")
        elif separator == "and":
            objects.append(self.obj())
            self.take(("on",), "'on'", "Three objects are written 'A, B and C'.")
        self.article()
        background = self.take(BACKGROUNDS, f"a background ({', '.join(BACKGROUNDS)})")
        self.take(("background",), "'background'")
        if self.index < len(self.tokens):
            raise self.fail("the end of the prompt")
        objects_t = tuple(objects)
        try:
            _check_distinct_colours(objects_t)
        except PromptError as err:
            raise PromptError(f"cannot use prompt {self.text!r}: {err}") from None
        return SceneSpec(objects=objects_t, background=background)


def parse_caption(text: str) -> SceneSpec:
    """Parse a caption of the closed grammar; raise PromptError naming the first offending word."""
    if not isinstance(text, str):
        raise PromptError(f"a prompt must be a string, got {type(text).__name__}")
    return _Parser(text).caption()
