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


def test_multi_token_name_maps_are_averaged(tiny_clip):
    import torch

    from datasetdm.backbone.capture import capture_real
    from datasetdm.backbone.tokens import average_token_maps

    tok = tiny_clip.tokenizer
    prompts = ["a photo of a aardwolf", "an aardwolf and a dog"]
    pos = [token_positions(tok, p, "aardwolf") for p in prompts]
    assert pos == [[5, 6], [2, 3]]
    img = torch.rand(2, 3, 32, 32)
    hc = capture_real(tiny_clip, img, prompts, seeds=[0, 1])
    maps = average_token_maps(hc.cross_attention, pos)
    for m, a in zip(maps, hc.cross_attention):
        assert m.shape == (2, *a.shape[2:])
        torch.testing.assert_close(m[0], (a[0, 5] + a[0, 6]) / 2)
        torch.testing.assert_close(m[1], (a[1, 2] + a[1, 3]) / 2)
    # one list for the whole batch
    same = average_token_maps(hc.cross_attention[0], [5, 6])
    torch.testing.assert_close(same[1], (hc.cross_attention[0][1, 5] + hc.cross_attention[0][1, 6]) / 2)
    with pytest.raises(DatasetdmError, match=r"token positions \[77\]"):
        average_token_maps(hc.cross_attention[0], [77])
    with pytest.raises(DatasetdmError, match="3 position lists for a batch of 2"):
        average_token_maps(hc.cross_attention[0], [[1], [2], [3]])


def test_span_positions_and_class_token_maps():
    """The one per-class map: the mean of the maps of every token that names the class (any of its
    spans, every occurrence), zero when the prompt does not name it, blind past the maps' length."""
    import torch

    from datasetdm.backbone.tokens import class_token_maps, span_positions

    assert span_positions([5, 7, 8, 5, 7, 8, 7], [7, 8]) == [1, 2, 4, 5]
    assert span_positions([1, 1, 1], [1, 1]) == [0, 1]  # occurrences do not overlap
    assert span_positions([1, 2], []) == [] and span_positions([1], [1, 2]) == []
    ids = torch.tensor([[0, 11, 20, 21, 11, 30], [0, 12, 9, 9, 9, 11]])  # 11 "dog", 12 "dogs", 20 21 "aard wolf"
    maps = torch.rand(2, 5, 3, 3)  # the maps cover the first 5 tokens only
    spans = [[[11], [12]], [[20, 21]], [[40]]]
    dog, aardwolf, absent = class_token_maps(maps, ids, spans).unbind(1)
    torch.testing.assert_close(dog[0], (maps[0, 1] + maps[0, 4]) / 2)
    torch.testing.assert_close(dog[1], maps[1, 1])  # its 11 at position 5 lies past the maps
    torch.testing.assert_close(aardwolf[0], (maps[0, 2] + maps[0, 3]) / 2)
    assert aardwolf[1].abs().sum() == 0 and absent.abs().sum() == 0
    per_level = class_token_maps([maps, maps[..., :1, :1].half()], ids, spans)
    assert per_level[1].dtype == torch.float16 and per_level[1].shape == (2, 3, 1, 1)
