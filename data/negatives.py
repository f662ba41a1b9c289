"""Hard-negative captions by word swaps: 'a red star above a circle' -> 'a red heart above a circle'.

A caption whose one word is replaced by another word of the same kind (a shape for a shape, a colour for a
colour) describes a different image. Used as an extra negative of the contrastive loss for its own image
(NegCLIP, Yuksekgonul et al. 2023), it can only be told apart from the true caption by the swapped attribute,
so the loss has to learn that attribute even when the rest of the batch can be matched without it.

A swap vocabulary is a list of groups of interchangeable words. Named vocabularies cover the built-in
synthetic world (``synth-shape``, ``synth-color``, ``synth``: a shape or a colour); any other value is read as a
text file with one group per line, its words separated by white space (``#`` starts a comment)::

    circle square triangle
    circles squares triangles

Singular and plural forms go in separate groups, so a swap keeps the grammar of the caption. Several
vocabularies joined by ``+`` (``synth-shape+synth-color``) give each caption one negative per vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["NAMED_VOCABULARIES", "WordSwap", "load_word_swap", "load_word_swaps"]

_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")
_ARTICLE = re.compile(r"(?:^|(?<=\W))(an?|An?) $")


def _synth_groups(kind: str) -> list[list[str]]:
    from .world import COLOR_NAMES, SHAPES

    if kind == "shape":
        return [[s.name for s in SHAPES.values()], [s.plural for s in SHAPES.values()]]
    return [list(COLOR_NAMES)]


NAMED_VOCABULARIES: tuple[str, ...] = ("synth-shape", "synth-color", "synth")


class WordSwap:
    """Replaces one word of a caption by another word of its group that the caption does not use.

    Args:
        groups: groups of interchangeable words (each at least two words; a word in one group only).

    ``negative(caption, rng)`` picks uniformly among the caption's words that have a replacement, then among
    their replacements, and returns the new caption, or None when no word of the caption can be swapped.
    Matching is by whole words, case-sensitive.
    """

    def __init__(self, groups: Sequence[Sequence[str]]):
        self.groups = [tuple(dict.fromkeys(group)) for group in groups]
        self._group_of: dict[str, int] = {}
        for index, group in enumerate(self.groups):
            if len(group) < 2:
                raise ValueError(f"a swap group needs at least two words, got {list(group)}")
            for word in group:
                if not _WORD.fullmatch(word):
                    raise ValueError(f"swap words must be letters (and inner hyphens), got {word!r}")
                if word in self._group_of:
                    raise ValueError(f"the swap word {word!r} is in more than one group")
                self._group_of[word] = index

    def negative(self, caption: str, rng: np.random.Generator) -> str | None:
        matches = [m for m in _WORD.finditer(caption) if m.group() in self._group_of]
        if not matches:
            return None
        used = {m.group() for m in matches}
        choices = []
        for m in matches:
            others = [w for w in self.groups[self._group_of[m.group()]] if w not in used]
            if others:
                choices.append((m, others))
        if not choices:
            return None
        m, others = choices[int(rng.integers(len(choices)))]
        word = others[int(rng.integers(len(others)))]
        head = caption[: m.start()]
        # 'a red circle' -> 'an orange circle': a wrong article would give the negative away.
        article = _ARTICLE.search(head)
        if article is not None:
            right = "an" if word[0].lower() in "aeiou" else "a"
            if article.group(1).lower() != right:
                right = right.capitalize() if article.group(1)[0].isupper() else right
                head = head[: article.start(1)] + right + head[article.end(1) :]
        return head + word + caption[m.end() :]

    def __repr__(self) -> str:
        return f"WordSwap({len(self.groups)} groups, {len(self._group_of)} words)"


def load_word_swap(spec: str) -> WordSwap:
    """A named vocabulary (``NAMED_VOCABULARIES``) or a text file of swap groups, one per line."""
    if spec in NAMED_VOCABULARIES:
        kinds = ("shape", "color") if spec == "synth" else (spec.removeprefix("synth-"),)
        return WordSwap([group for kind in kinds for group in _synth_groups(kind)])
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"negative words {spec!r}: expected one of {list(NAMED_VOCABULARIES)} or a text file of swap groups "
            "(one group of interchangeable words per line)"
        )
    groups = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) < 2:
            raise ValueError(f"{path}:{number}: a swap group needs at least two words, got {words}")
        groups.append(words)
    if not groups:
        raise ValueError(f"{path} holds no swap group (one group of interchangeable words per line)")
    try:
        return WordSwap(groups)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def load_word_swaps(spec: str) -> list[WordSwap]:
    """One ``WordSwap`` per ``+``-separated vocabulary of ``spec`` (each as :func:`load_word_swap` reads it)."""
    parts = [part.strip() for part in spec.split("+")]
    if not all(parts):
        raise ValueError(f"negative words {spec!r}: an empty vocabulary between '+' signs")
    return [load_word_swap(part) for part in parts]
