"""Tokenizer: shipped BPE, special tokens, round trips, chat formats, LLaDA-style files."""

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import models

from ruvdllm.tokenizer import DEFAULT_PATH, SPECIAL_TOKENS, Tokenizer, main, train_bpe


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(DEFAULT_PATH)


def word_level(tokens: list[str]) -> tokenizers.Tokenizer:
    """A tiny tokenizer whose added special tokens mimic a foreign tokenizer.json."""
    t = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    t.add_special_tokens(tokens)
    return t


def test_shipped_tokenizer_is_small_with_specials_first(tok):
    assert DEFAULT_PATH.stat().st_size < 1_000_000
    assert tok.vocab_size == 8192
    ids = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id]
    assert ids == [0, 1, 2, 3]


@pytest.mark.parametrize("token", SPECIAL_TOKENS)
def test_special_tokens_are_single_ids_also_inside_text(tok, token):
    (token_id,) = tok.encode(token)
    # decided: special-token strings in text are read as those tokens (as Hugging Face does)
    assert tok.encode(f"a{token}b") == [*tok.encode("a"), token_id, *tok.encode("b")]
    assert tok.decode([token_id]) == ""
    assert tok.decode([token_id], skip_special=False) == token


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_round_trips(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special=False) == text
    if not any(s in text for s in SPECIAL_TOKENS):
        assert tok.decode(ids) == text
        assert tok.mask_token_id not in ids


def test_bos_and_batches(tok):
    texts = ["To be, or not to be", "def f(x):\n    return x", "", "Ünïcödé ✓ 日本"]
    assert tok.encode(texts[0], add_bos=True) == [tok.bos_token_id, *tok.encode(texts[0])]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, add_bos=True)[2] == [tok.bos_token_id]
    assert len(tok.encode("In the beginning God created the heaven")) <= 8  # BPE merged words


def test_own_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief. "},
                {"role": "user", "content": "Who wrote Hamlet?"}]
    prompt = tok.apply_chat_template(messages)
    assert prompt == ("<|system|>\nBe brief.<|end|>\n<|user|>\nWho wrote Hamlet?<|end|>\n"
                      "<|assistant|>\n")
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("<|end|>\n")
    ids = tok.encode(prompt)
    assert ids[0] == tok.encode("<|system|>")[0] and ids.count(tok.encode("<|end|>")[0]) == 2


@pytest.mark.parametrize("bad", [{"role": "tool", "content": "x"}, {"role": "user"},
                                 {"role": "user", "content": 3}])
def test_bad_chat_messages_are_refused(tok, bad):
    with pytest.raises(ValueError, match="message 0"):
        tok.apply_chat_template([bad])


def test_llada_style_tokenizer_resolves_specials_and_uses_its_chat_format():
    specials = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(word_level(specials))
    assert (tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (2, 3, 4)
    assert tok.pad_token_id == tok.eos_token_id  # no pad token: falls back to eos
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert prompt == ("<|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_config_ids_and_strings_override_names():
    tok = Tokenizer(word_level(["<|endoftext|>", "<|mdm_mask|>", "<|im_start|>", "<|im_end|>"]),
                    mask_token=3, eos_token="<|im_end|>")
    assert (tok.mask_token_id, tok.eos_token_id, tok.bos_token_id) == (3, 5, None)
    with pytest.raises(ValueError, match="no bos token"):
        tok.encode("hello", add_bos=True)
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}]) == (
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")


def test_unresolvable_specials_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no mask token"):
        Tokenizer(word_level(["<|endoftext|>"]))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer(word_level(["<|endoftext|>"]), mask_token=126336)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer(word_level(["<|endoftext|>"]), mask_token="<|nope|>")
    with pytest.raises(ValueError, match="no chat tokens"):
        Tokenizer(word_level(["<|endoftext|>", "<|mask|>"])).apply_chat_template([])
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(ValueError, match=r"bad\.json is not a tokenizer\.json file"):
        Tokenizer(tmp_path / "bad.json")


def test_train_bpe_save_and_load(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog"] * 50 + ["Ünïcödé ✓"]
    trained = train_bpe(texts, vocab_size=300)
    assert trained.vocab_size == 300
    assert trained.encode("".join(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    trained.save(tmp_path / "new" / "tok.json")  # missing folders are made
    loaded = Tokenizer(tmp_path / "new" / "tok.json")
    assert loaded.encode("the lazy dog ✓") == trained.encode("the lazy dog ✓")
    assert loaded.decode(loaded.encode("emoji 🙂 unseen")) == "emoji 🙂 unseen"
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(texts, vocab_size=100)


def test_cli_refuses_bad_paths_before_training(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{")
    for argv, message in ((["count", "--tokenizer", str(tmp_path / "bad.json")],
                           "is not a tokenizer.json file"),
                          (["train", str(tmp_path)], "exists and is a folder"),
                          (["train", str(tmp_path / "bad.json" / "tok.json")], "cannot create it")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "bad.json").read_text() == "{"
