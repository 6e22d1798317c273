"""Prompt sources: built-in lists or a text file, sampled uniformly with replacement, seeded.

Built-ins: `animals` — the 45 common animals of DDPO's `simple_animals.txt` (kvablack/ddpo-pytorch),
the prompt set of the Nabla-GFlowNet Aesthetic experiments (bare names, e.g. "cat");
`photo`, `painting`, `photo_painting` — small HPSv2-*style* lists written for this project (photo
and painting styles). They are NOT the HPSv2 / HPDv2 benchmark prompts; for those, export the
benchmark's prompts to a text file and give its path as the source. `none` is the single empty
prompt, for unconditional models.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

ANIMALS = (
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow",
    "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant",
    "butterfly", "fish", "shark", "whale", "dolphin", "squirrel", "mouse", "rat", "snake", "turtle",
    "frog", "chicken", "duck", "goose", "bee", "pig", "turkey", "fly", "llama", "camel", "bat",
    "gorilla", "hedgehog", "kangaroo",
)

PHOTO = (
    "a photo of an old fisherman mending nets on a wooden pier at sunrise",
    "a close-up photo of dew drops on a spider web in the morning light",
    "a street photo of a rainy city crossing at night with neon reflections",
    "a photo of a red fox standing in fresh snow, shallow depth of field",
    "an aerial photo of a winding river through an autumn forest",
    "a portrait photo of a smiling grandmother in her garden, soft natural light",
    "a photo of a steaming bowl of ramen on a dark wooden table",
    "a long-exposure photo of the milky way above a mountain lake",
    "a photo of a vintage bicycle leaning against a blue door",
    "a wildlife photo of an eagle catching a fish above a lake",
    "a photo of a lighthouse on a rocky coast during a storm",
    "a macro photo of a honeybee on a lavender flower",
    "a photo of a busy market stall full of colourful spices",
    "a photo of a child flying a kite on a windy beach",
    "a photo of a snowy cabin in a pine forest with warm lit windows",
    "a photo of a tabby cat sleeping in a patch of sunlight",
    "a photo of a hot air balloon festival at dawn",
    "a photo of a desert road stretching to the horizon under a clear sky",
    "a black and white photo of an empty train station platform",
    "a photo of a sailboat on a calm sea at golden hour",
)

PAINTING = (
    "an oil painting of a quiet harbour with fishing boats at dusk",
    "a watercolor painting of a cottage surrounded by blooming wildflowers",
    "an impressionist painting of a crowded cafe terrace at night",
    "a painting of a lone tree on a hill under a swirling starry sky",
    "an oil painting portrait of a woman in a blue hat, dramatic lighting",
    "a watercolor painting of a heron standing in misty reeds",
    "a landscape painting of snow-capped mountains above a green valley",
    "a still life painting of lemons and a glass jug on a linen cloth",
    "an ink wash painting of bamboo in the wind",
    "a painting of a Venetian canal with gondolas, warm afternoon light",
    "a gouache painting of a fox in an autumn forest",
    "an oil painting of waves crashing against cliffs",
    "a painting of a medieval castle on a lake at sunset",
    "a pastel painting of a ballet dancer resting backstage",
    "an acrylic painting of a field of sunflowers under a bright sky",
    "a baroque-style painting of a feast with fruit and candles",
    "a watercolor painting of a lighthouse on a foggy morning",
    "an oil painting of a farmer ploughing a field with horses",
    "a painting of cherry blossoms along a river in spring",
    "an expressionist painting of a city skyline in vivid colors",
)

BUILTIN_SOURCES: dict[str, tuple[str, ...]] = {
    "animals": ANIMALS,
    "photo": PHOTO,
    "painting": PAINTING,
    "photo_painting": PHOTO + PAINTING,
    "none": ("",),  # unconditional models (the pixel family): one empty prompt
}


class PromptError(ValueError):
    """A prompt source is unknown, missing (names the file) or empty."""


class PromptSource:
    """A fixed list of prompts; `sample` draws ids uniformly with replacement.

    `sample(n)` without an rng uses the source's own generator (seeded with `seed`), so the
    sequence of batches is deterministic given the seed; an int or a numpy Generator overrides it.
    """

    def __init__(self, name: str, prompts, seed: int = 0):
        prompts = tuple(str(p) for p in prompts)
        if not prompts:
            raise PromptError(f"prompt source {name!r} is empty")
        self.name, self.prompts, self.seed = name, prompts, int(seed)
        self._rng = np.random.default_rng(self.seed)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, prompt_id: int) -> str:
        return self.prompts[int(prompt_id)]

    def sample(self, n: int, rng: np.random.Generator | int | None = None
               ) -> tuple[np.ndarray, list[str]]:
        """(prompt_ids int64 (n,), prompts list[str] of length n)."""
        if n < 0:
            raise PromptError(f"cannot sample {n} prompts")
        if rng is None:
            rng = self._rng
        elif not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(int(rng))
        ids = rng.integers(0, len(self.prompts), size=int(n), dtype=np.int64)
        return ids, [self.prompts[i] for i in ids]

    def __repr__(self) -> str:
        return f"PromptSource({self.name!r}, {len(self)} prompts, seed={self.seed})"


def load_prompt_file(path: str | Path) -> tuple[str, ...]:
    """One prompt a line (stripped, UTF-8); blank lines skipped; a missing file names itself."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PromptError(f"prompt file not found: {p}")
    lines = (line.strip() for line in p.read_text(encoding="utf-8").splitlines())
    prompts = tuple(s for s in lines if s)
    if not prompts:
        raise PromptError(f"prompt file has no prompts: {p}")
    return prompts


def build_prompt_source(cfg) -> PromptSource:
    """From a PromptConfig: a built-in list name, else a path to a text file."""
    source = cfg.source
    if source in BUILTIN_SOURCES:
        return PromptSource(source, BUILTIN_SOURCES[source], cfg.seed)
    p = Path(source).expanduser()
    if p.is_file():
        return PromptSource(str(p), load_prompt_file(p), cfg.seed)
    looks_like_path = "/" in source or "\\" in source or p.suffix != ""
    if looks_like_path:
        raise PromptError(f"prompt file not found: {p}")
    raise PromptError(f"unknown prompt source {source!r}: not a built-in list "
                      f"({sorted(BUILTIN_SOURCES)}) and no such file {p.resolve()}")
