"""Lexical features (the paper's Appendix D, Eq.4) on sentences counted by hand."""

import pytest
import torch

from surgellm_kernels import LexicalFeaturizer, lexical_features, task_prefix
from surgellm_kernels.surgellm.features import FEATURE_NAMES


def feats(text):
    return dict(zip(FEATURE_NAMES, lexical_features([text])[0].tolist()))


def test_prefix_match_case_and_counts():
    f = feats("This film was captivating and GREAT, truly a masterpiece!")
    assert f["sst_pos"] == 3  # captivat*, great (any case), masterpiece
    assert f["word_count"] == 9
    assert f["mean_word_length"] == pytest.approx(47 / 9)
    assert f["sentence_count"] == 1
    assert (f["question_marks"], f["exclamation_marks"], f["has_digit"]) == (0, 1, 0)


def test_multi_word_entries_digits_and_punctuation():
    f = feats("I think the results show 3 things. Do we agree? In conclusion, maybe!")
    assert f["human_pers"] == 3  # i, we, "i think"
    assert f["llm_stat"] == 1  # "results show"
    assert f["llm_formal"] == 1  # "in conclusion"
    assert f["human_hedge"] == 1  # maybe
    assert f["sentence_count"] == 3
    assert f["word_count"] == 13
    assert (f["question_marks"], f["exclamation_marks"], f["has_digit"]) == (1, 1, 1)


def test_word_boundaries_and_literal_entries():
    f = feats("Firstly, the itinerary (1) was multi-hop")
    assert f["llm_list"] == 2  # firstly, (1)
    assert f["prompt_cot"] == 0  # "first" is not a whole word in "Firstly"
    assert f["human_pers"] == 0  # "i" does not match inside "itinerary"
    assert f["retrieval"] == 1  # multi-hop


def test_presence_not_frequency_and_whitespace_in_phrases():
    f = feats("GREAT great Great. The data   show it")
    assert f["sst_pos"] == 1
    assert f["llm_stat"] == 1  # "data show" across several spaces


def test_shared_entries_count_in_each_group():
    f = feats("terrible")
    assert f["sst_neg"] == 1 and f["human_emo"] == 1


def test_empty_text_and_shape():
    out = lexical_features(["", "ok"])
    assert out.dtype == torch.float32 and out.shape == (2, 16)
    assert out[0].abs().sum() == 0
    assert lexical_features("single string").shape == (1, 16)


def test_word_lengths_are_of_the_text_not_its_lower_case():
    # "İ".lower() is two characters (i and a combining dot): lower case is for matching
    for text, words, mean in (("Istanbul", 1, 8.0), ("İstanbul", 1, 8.0), ("İİİİ ab", 2, 3.0)):
        f = feats(text)
        assert (f["word_count"], f["mean_word_length"]) == (words, mean), text


def test_task_prefix_prints_floor_as_integers():
    values = [1.0, 2.7, 0, 0, 0, 0, 0, 0, 0, 0, 12, 4.6, 2, 1, 0, 1]
    prefix = task_prefix("sst2", values)
    assert prefix == (
        "[TASK:sst2|F1:1|F2:2|F3:0|F4:0|F5:0|F6:0|F7:0|F8:0|F9:0|F10:0"
        "|F11:12|F12:4|F13:2|F14:1|F15:0|F16:1]"
    )
    assert task_prefix(3, torch.tensor(values)).startswith("[TASK:3|F1:1|")
    with pytest.raises(ValueError, match="16"):
        task_prefix(0, [1, 2])


def test_non_string_text_raises():
    with pytest.raises(TypeError, match="strings"):
        lexical_features([1, 2])


def test_one_unicode_form():
    """The same text, however its characters are encoded, has the same
    features: composed or decomposed accents, invisible characters inside a
    word, typographic apostrophes."""
    import unicodedata

    text = "A naïve, café-style résumé: I don't think it's wonderful."
    variants = [
        unicodedata.normalize("NFD", text),
        text.replace("won", "won\u00ad").replace("think", "th\u2060ink"),
        text.replace("'", "\u2019"),
        text.replace("é", "e\u00ad\u0301"),  # composed once the soft hyphen is out
    ]
    expected = lexical_features(text)
    assert expected[0, 10] == 10  # words: "don't" and "it's" one each
    for variant in variants:
        assert torch.equal(lexical_features(variant), expected), variant
    cafe = LexicalFeaturizer({"fr": [unicodedata.normalize("NFD", "café")]}, numeric=False)
    assert cafe("un café")[0, 0] == 1 and cafe(unicodedata.normalize("NFD", "un café"))[0, 0] == 1
    # a zero-width space is a break between words (Thai writes no other)
    assert torch.equal(lexical_features("won\u200bderful"), lexical_features("won derful"))


def test_combining_marks_are_word_characters():
    """A Hindi word's vowel signs and virama, and Thai's vowel and tone marks,
    are part of its word: counted as one word, and an entry matches only a
    whole word."""
    hindi = feats("नमस्ते दुनिया")  # two words of 6 code points each
    assert hindi["word_count"] == 2 and hindi["mean_word_length"] == 6
    assert feats("ที่นี่ ดี")["word_count"] == 2
    featurizer = LexicalFeaturizer({"greeting": ["नमस्ते"], "good": ["ดี"]}, numeric=False)
    assert featurizer(["नमस्ते दुनिया", "नमस्तेजी", "ที่นี่ ดี", "ดีมาก"]).tolist() == [
        [1, 0],
        [0, 0],  # inside a longer word
        [0, 1],
        [0, 0],
    ]
    # a zero-width joiner joins inside a word
    assert feats("क्\u200dष")["word_count"] == 1
    # U+001C-U+001F, white space to str.split (entries), are white space in text too
    phrase = LexicalFeaturizer({"g": ["very good"]}, numeric=False)
    assert phrase("it was very\x1cgood")[0, 0] == 1


def test_has_digit_takes_decimal_digits_of_any_script_only():
    assert feats("x² and ① cup")["has_digit"] == 0  # number signs, not digits
    assert feats("٣ cups")["has_digit"] == 1  # an Arabic-Indic three
