"""Fixtures of the reward tests: a tiny random CLIP saved to / loaded from a local dir."""
import pytest
from transformers import CLIPTokenizer

from reward_fixtures import tiny_clip, write_tokenizer_files


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A local CLIP dir (config, safetensors weights, tokenizer files) for from_pretrained."""
    d = tmp_path_factory.mktemp("tiny_clip")
    tok = write_tokenizer_files(d)
    tiny_clip(tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def clip_and_tokenizer(clip_dir):
    """The same tiny CLIP built in memory: the reference the loaded rewards are checked against."""
    tok = CLIPTokenizer.from_pretrained(str(clip_dir))
    return tiny_clip(tok), tok
