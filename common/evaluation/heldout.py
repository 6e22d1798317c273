"""Held-out evaluation prompts: for each built-in training source, prompts it never contains.

`heldout_prompts(train_source)` gives the default evaluation prompts of `nablagfn eval` for runs
trained on `train_source`:

- `animals` (DDPO's 45 simple animals): 16 other animals (`HELDOUT_ANIMALS`), bare names like the
  training ones, none of them in the training list;
- `photo` / `painting` / `photo_painting` (this project's HPSv2-style lists): 8 new prompts per
  style written in the same manner (`HELDOUT_PHOTO`, `HELDOUT_PAINTING`), none in the lists;
- `none` (unconditional models): the empty prompt, the only one (there is nothing to hold out).

A run trained on a prompt file has no default split: `nablagfn eval --prompts` must name one. The
lists are disjoint from the training lists by construction (tests/common/evaluation check it).
"""
from __future__ import annotations

HELDOUT_ANIMALS = (
    "owl", "penguin", "elephant", "giraffe", "panda", "koala", "octopus", "crab", "parrot",
    "flamingo", "otter", "hippo", "rhino", "peacock", "seal", "swan",
)

HELDOUT_PHOTO = (
    "a photo of a fishing village on stilts above a turquoise lagoon",
    "a photo of a red tram climbing a steep cobbled street",
    "a close-up photo of frost patterns on a car window at dawn",
    "a photo of a border collie herding sheep across a green hillside",
    "a photo of paper lanterns floating on a river at night",
    "a photo of a bakery counter with fresh croissants and baguettes",
    "an aerial photo of terraced rice fields after the rain",
    "a photo of a climber on a granite cliff above the clouds",
)

HELDOUT_PAINTING = (
    "an oil painting of a windmill beside a frozen canal",
    "a watercolor painting of a tram stop in the rain",
    "an impressionist painting of poppies along a country lane",
    "a painting of an owl perched on a moonlit branch",
    "an ink painting of a mountain temple in the clouds",
    "a gouache painting of a market square on a summer morning",
    "an oil painting of a lighthouse keeper reading by lamplight",
    "a watercolor painting of koi fish in a garden pond",
)

HELDOUT_SPLITS: dict[str, tuple[str, ...]] = {
    "animals": HELDOUT_ANIMALS,
    "photo": HELDOUT_PHOTO,
    "painting": HELDOUT_PAINTING,
    "photo_painting": HELDOUT_PHOTO + HELDOUT_PAINTING,
    "none": ("",),
}


class HeldoutError(ValueError):
    """No default held-out split exists for a training source (names it and what to do)."""


def heldout_prompts(train_source: str) -> tuple[str, ...]:
    """The default held-out prompts of runs trained on built-in source `train_source`."""
    if train_source in HELDOUT_SPLITS:
        return HELDOUT_SPLITS[train_source]
    raise HeldoutError(f"prompts: the runs trained on prompts.source={train_source!r}, which has no "
                       f"default held-out split (built-in sources with one: {sorted(HELDOUT_SPLITS)}); "
                       "give the evaluation prompts with --prompts SOURCE (a built-in name or a text file)")
