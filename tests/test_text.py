"""Item text: template rendering and GPT-2's offline BPE tokenizer."""

import numpy as np
import pyarrow as pa
import pytest

from recsys_core.data.text import (
    load_tokenizer,
    pad_token_lists,
    render_texts,
    template_fields,
    tokenize_texts,
)

EOS = 50256  # GPT-2's <|endoftext|>


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECSYS_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield load_tokenizer("gpt2-offline")


@pytest.mark.unit
def test_offline_gpt2_tokenizer_matches_gpt2(tok):
    assert len(tok) == 50257
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert tok.eos_token_id == EOS
    assert tok.pad_token_id == EOS  # GPT-2 has no pad token; EOS stands in


@pytest.mark.unit
def test_render_texts_fills_template_per_row():
    items = pa.table({"title": ["Toy Story", "Heat"], "year": [1995, None], "genres": ["Animation|Comedy", "Crime"]})
    got = render_texts(items, "{title} ({year}). Genres: {genres}.")
    assert got == ["Toy Story (1995). Genres: Animation|Comedy.", "Heat (). Genres: Crime."]  # null -> ""


@pytest.mark.unit
def test_render_texts_missing_field_raises_naming_it():
    items = pa.table({"title": ["Heat"]})
    with pytest.raises(ValueError, match="'year'"):
        render_texts(items, "{title} ({year})")


@pytest.mark.unit
def test_template_fields():
    assert template_fields("{title} ({year}). Genres: {genres}.") == ["title", "year", "genres"]
    assert template_fields("no fields") == []


@pytest.mark.unit
def test_tokenize_texts_truncates_and_ends_with_eos(tok):
    # " world, this is" -> 995, 11, 428, 318; "Hello" -> 15496
    got = tokenize_texts(tok, ["Hello world, this is long", "Hello"], max_tokens=4)
    assert got == [[15496, 995, 11, EOS], [15496, EOS]]


@pytest.mark.unit
def test_tokenize_texts_short_text_is_not_padded(tok):
    assert tokenize_texts(tok, ["Hello world"], max_tokens=16) == [[15496, 995, EOS]]


@pytest.mark.unit
def test_pad_token_lists_right_pads_with_mask():
    mat, mask = pad_token_lists([[5, 6, 7], [8], [9, 10]], pad_id=0)
    np.testing.assert_array_equal(mat, [[5, 6, 7], [8, 0, 0], [9, 10, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    assert mat.dtype == np.int64 and mask.dtype == np.int64


@pytest.mark.unit
def test_pad_token_lists_fixed_length_keeps_the_most_recent():
    mat, mask = pad_token_lists([np.array([1, 2, 3, 4]), [5], []], pad_id=0, length=3)
    np.testing.assert_array_equal(mat, [[2, 3, 4], [5, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0], [0, 0, 0]])


@pytest.mark.unit
def test_pad_token_lists_empty():
    mat, mask = pad_token_lists([], pad_id=EOS)
    assert mat.shape == (0, 1) and mask.shape == (0, 1)
