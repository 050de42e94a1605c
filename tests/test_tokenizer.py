"""The domain tokenizer: exact round trips, independent prompt/text encoding, count_tokens,
and the saved directory that transformers (and SGLang) load."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apr import tokenizer as tk
from apr.countdown.threads import apr_threads, sos_threads
from apr.countdown.trace import render

TOK = tk.build()


@pytest.fixture(scope="module")
def tok():
    return TOK


@pytest.fixture(scope="module")
def texts(small_apr_corpus, small_sos_corpus):
    """Every prompt and text of ~100 APR and ~100 SoS+ traces."""
    out = []
    for item in small_apr_corpus:
        for t in apr_threads(item.trace):
            out += [t.prompt, t.text]
    for item in small_sos_corpus:
        (t,) = sos_threads(item.trace)
        out += [t.prompt, t.text]
    return out


@pytest.mark.slow
def test_decode_encode_round_trip(tok, texts):
    bos = tok.token_to_id(tk.BOS)
    for text in texts:
        ids = tok.encode(text).ids
        assert ids[0] == bos and bos not in ids[1:]
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tk.UNK not in tok.encode(text).tokens


@pytest.mark.slow
def test_prompt_and_text_tokenize_independently(tok, small_apr_corpus):
    for item in small_apr_corpus:
        for t in apr_threads(item.trace):
            joint = tok.encode(t.prompt + t.text).ids
            text_ids = tok.encode(t.text, add_special_tokens=False).ids
            assert joint == tok.encode(t.prompt).ids + text_ids


@pytest.mark.slow
def test_count_tokens_is_exact_on_traces(tok, texts, small_apr_corpus):
    for text in texts:
        assert tk.count_tokens(text) == len(tok.encode(text, add_special_tokens=False).ids)
    for item in small_apr_corpus:
        text = render(item.trace.context)
        assert tk.count_tokens(text) == len(tok.encode(text, add_special_tokens=False).ids)
    t = apr_threads(small_apr_corpus[0].trace)[0]
    assert tk.sequence_length(t.prompt, t.text) == len(tok.encode(t.prompt + t.text).ids) + 1


@given(st.text(alphabet=string.printable))
def test_count_tokens_is_exact_on_printable_text(text):
    assert tk.count_tokens(text) == len(TOK.encode(text, add_special_tokens=False).ids)


@given(st.lists(st.sampled_from(list(tk.PHRASES) + ["0", "1", "2", "[", "'", ",", " ", "\n", "#"]),
                max_size=30).map("".join))
def test_count_tokens_is_exact_on_phrase_soup(text):
    assert tk.count_tokens(text) == len(TOK.encode(text, add_special_tokens=False).ids)
    assert TOK.decode(TOK.encode(text).ids, skip_special_tokens=True) == text


# Regression: the tokenizer matches the special tokens' strings inside text ("<s>" is one
# token); count_tokens once counted their characters instead.
def test_count_tokens_on_special_token_strings(tok):
    for text in ["<s>", "a</s>b", "<pad>", "x<unk>"]:
        assert tk.count_tokens(text) == len(tok.encode(text, add_special_tokens=False).ids), text


def test_every_marker_phrase_is_one_token(tok):
    for phrase in tk.PHRASES:
        encoding = tok.encode(phrase, add_special_tokens=False)
        assert encoding.tokens == [phrase], phrase
        assert tk.count_tokens(phrase) == 1
    assert len(set(tok.token_to_id(p) for p in tk.PHRASES)) == len(tk.PHRASES)
    # the longer phrase wins where two share a start
    assert tok.encode("No solution found in sub search", add_special_tokens=False).tokens == [
        "No solution found in sub search"]
    assert tok.encode("No solution found.", add_special_tokens=False).tokens == [
        "No solution found."]


def test_every_character_of_the_language_is_a_token(tok):
    for ch in tk.CHARACTERS:
        assert tok.encode(ch, add_special_tokens=False).tokens == [ch]
    assert tok.encode("\t", add_special_tokens=False).tokens == [tk.UNK]


def test_build_is_deterministic():
    assert tk.build().to_str() == tk.build().to_str()


@pytest.mark.slow
def test_saved_tokenizer_loads_in_transformers(tmp_path, tok, texts):
    transformers = pytest.importorskip("transformers")
    directory = tk.save(tmp_path / "tok")
    for name in tk.TOKENIZER_FILES:
        assert (directory / name).is_file()
    assert tk.load(directory).to_str() == tok.to_str()
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert hf.bos_token_id == tok.token_to_id(tk.BOS)
    assert hf.eos_token_id == tok.token_to_id(tk.EOS)
    assert hf.pad_token_id == tok.token_to_id(tk.PAD)
    assert len({hf.bos_token_id, hf.eos_token_id, hf.pad_token_id}) == 3
    for text in texts[::5]:
        ids = tok.encode(text).ids
        assert hf(text)["input_ids"] == ids
        assert hf.encode(text) == ids
        assert hf.decode(ids, skip_special_tokens=True) == text
    # no space clean-up: decoding gives back exactly what was encoded
    spaced = "1 . 2 , 3 's 4 n't 5 ? 6 !"
    assert hf.decode(hf.encode(spaced), skip_special_tokens=True) == spaced
    assert hf.decode(hf.encode(spaced)) == tk.BOS + spaced


def test_load_without_a_tokenizer_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tk.load(tmp_path)
