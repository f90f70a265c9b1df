import pytest

from datasetdm.backbone.tokens import token_positions
from datasetdm.errors import DatasetdmError


def _tokens_at(tok, prompt, positions):
    ids = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    return tok.convert_ids_to_tokens([ids[p] for p in positions])


def test_clip_multi_token_name(tiny_clip):
    tok = tiny_clip.tokenizer
    prompt = "a photo of a aardwolf, aardwolf"
    assert tok.tokenize("aardwolf") == ["aard", "wolf</w>"]  # BPE splits it
    # 0 = <|startoftext|>, then a photo of a -> 1..4, aardwolf -> 5, 6, "," -> 7, aardwolf -> 8, 9
    pos = token_positions(tok, prompt, "aardwolf")
    assert pos == [5, 6, 8, 9]
    assert _tokens_at(tok, prompt, pos) == ["aard", "wolf</w>"] * 2


def test_clip_single_token_and_phrase(tiny_clip):
    tok = tiny_clip.tokenizer
    assert token_positions(tok, "a photo of a hedgehog.", "hedgehog") == [5]
    assert token_positions(tok, "a Traffic Light at night", "traffic light") == [2, 3]


def test_bert_wordpiece_name(tiny_bert):
    tok = tiny_bert.tokenizer
    prompt = "a hedgehog next to a dog"
    assert tok.tokenize("hedgehog") == ["hedge", "##hog"]
    pos = token_positions(tok, prompt, "hedgehog")
    assert pos == [2, 3]  # 0 = [CLS], 1 = a
    assert _tokens_at(tok, prompt, pos) == ["hedge", "##hog"]
    assert token_positions(tok, prompt, "dog") == [7]  # next=4 to=5 a=6


def test_whole_tokens_only(tiny_clip):
    # "cat" is a different token from "cats": no partial match
    with pytest.raises(DatasetdmError, match="does not occur"):
        token_positions(tiny_clip.tokenizer, "two cats", "cat")


def test_absent_and_truncated(tiny_bert):
    tok = tiny_bert.tokenizer
    with pytest.raises(DatasetdmError, match="'zebra' does not occur"):
        token_positions(tok, "a photo of a dog", "zebra")
    long_prompt = "a dog " * 60 + "and a zebra"
    with pytest.raises(DatasetdmError, match="beyond the first 77 tokens"):
        token_positions(tok, long_prompt, "zebra")
