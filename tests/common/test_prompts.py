"""Prompt sources: built-in lists, text files, seeded sampling, errors."""
import numpy as np
import pytest

from nablagfn.common.config import PromptConfig
from nablagfn.common.config_io import ConfigError, from_dict
from nablagfn.common.prompts import (ANIMALS, BUILTIN_SOURCES, PromptError, PromptSource,
                                     build_prompt_source, load_prompt_file)


def test_builtin_lists():
    assert len(ANIMALS) == 45 and len(set(ANIMALS)) == 45  # DDPO's simple_animals.txt
    assert ANIMALS[0] == "cat" and ANIMALS[-1] == "kangaroo"
    assert set(BUILTIN_SOURCES) == {"animals", "photo", "painting", "photo_painting", "none"}
    assert BUILTIN_SOURCES["none"] == ("",)  # unconditional models: one empty prompt
    for name, prompts in BUILTIN_SOURCES.items():
        if name == "none":
            continue
        assert len(prompts) >= 20 and len(set(prompts)) == len(prompts), name
        assert all(p == p.strip() and p for p in prompts)
    both = BUILTIN_SOURCES["photo"] + BUILTIN_SOURCES["painting"]
    assert BUILTIN_SOURCES["photo_painting"] == both


def test_sampling_is_seeded_and_consistent():
    a = build_prompt_source(PromptConfig(source="animals", seed=7))
    b = build_prompt_source(PromptConfig(source="animals", seed=7))
    batches_a = [a.sample(8) for _ in range(3)]
    batches_b = [b.sample(8) for _ in range(3)]
    for (ia, pa), (ib, pb) in zip(batches_a, batches_b):
        assert np.array_equal(ia, ib) and pa == pb
        assert ia.dtype == np.int64 and ia.shape == (8,)
        assert pa == [ANIMALS[i] for i in ia] and all(a[i] == p for i, p in zip(ia, pa))
    assert not np.array_equal(batches_a[0][0], batches_a[1][0])  # the generator advances
    c = build_prompt_source(PromptConfig(source="animals", seed=8))
    assert not np.array_equal(c.sample(8)[0], batches_a[0][0])
    # an explicit int or Generator overrides the source's own stream, deterministically
    assert np.array_equal(a.sample(16, rng=3)[0], b.sample(16, rng=3)[0])
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    assert np.array_equal(a.sample(16, rng=g1)[0], c.sample(16, rng=g2)[0])
    ids, prompts = a.sample(0)
    assert ids.shape == (0,) and prompts == []
    # uniform over the list: 45 000 draws, each id ~1000 times (sd ~31); 6 sd bounds.
    counts = np.bincount(a.sample(45000, rng=0)[0], minlength=45)
    assert counts.min() > 1000 - 190 and counts.max() < 1000 + 190


def test_text_file_source(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a red apple\n\n   \n  a blue car  \r\nthird prompt\n", encoding="utf-8")
    assert load_prompt_file(p) == ("a red apple", "a blue car", "third prompt")
    src = build_prompt_source(PromptConfig(source=str(p), seed=1))
    assert isinstance(src, PromptSource) and len(src) == 3
    ids, prompts = src.sample(10)
    assert set(prompts) <= {"a red apple", "a blue car", "third prompt"}


def test_errors(tmp_path):
    missing = tmp_path / "nope" / "prompts.txt"
    with pytest.raises(PromptError, match=f"prompt file not found: {missing}"):
        build_prompt_source(PromptConfig(source=str(missing)))
    with pytest.raises(PromptError, match="not found: .*nope.txt"):
        build_prompt_source(PromptConfig(source="nope.txt"))
    with pytest.raises(PromptError, match=r"unknown prompt source 'dinosaurs'.*'animals'"):
        build_prompt_source(PromptConfig(source="dinosaurs"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(PromptError, match="no prompts"):
        build_prompt_source(PromptConfig(source=str(empty)))
    with pytest.raises(PromptError, match="empty"):
        PromptSource("x", [])
    with pytest.raises(ConfigError, match="seed"):
        from_dict(PromptConfig, {"seed": -1})
