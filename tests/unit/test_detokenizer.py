"""IncrementalDetokenizer: deltas add up to the full decode, incomplete characters and stop strings
are held back, stop strings cut exactly. Fake byte-level and sentencepiece-style tokenizers, and the
real tokenizers of the fixture checkpoints."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from internvl_runtime.engine.detokenizer import IncrementalDetokenizer
from paths import FIXTURES

CKPT = FIXTURES / "ckpt"
SPECIALS = {"<s>": 1000, "</s>": 1001, "<|im_end|>": 1002}


class FakeByteTokenizer:
    """Byte-level BPE in miniature: ids 0-255 are bytes, a few merges, some special tokens."""

    MERGES = (b"Hello", b" world", b" the", b"\xe4\xbd", b"\xa0\xe5", b"\xf0\x9f", b"\x8e\x89", b"  ", b"\n\n", b"##")

    def __init__(self) -> None:
        self.pieces: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
        self.pieces.update({256 + i: m for i, m in enumerate(self.MERGES)})
        self.special = {v: k for k, v in SPECIALS.items()}

    def encode(self, text: str) -> list[int]:
        data, ids, i = text.encode(), [], 0
        by_length = sorted(self.pieces.items(), key=lambda kv: -len(kv[1]))
        while i < len(data):
            for token, piece in by_length:
                if data.startswith(piece, i):
                    ids.append(token)
                    i += len(piece)
                    break
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out = b""
        for i in ids:
            if i in self.special:
                out += b"" if skip_special_tokens else self.special[i].encode()
            else:
                out += self.pieces[i]
        return out.decode("utf-8", errors="replace")


class FakeCleanUpTokenizer(FakeByteTokenizer):
    """Decodes with transformers' ``clean_up_tokenization_spaces`` (as the 76B tokenizer does)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = super().decode(ids, skip_special_tokens)
        for before, after in [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" n't", "n't"), (" 's", "'s")]:
            text = text.replace(before, after)
        return text


class FakeSentencePieceTokenizer:
    """Llama-style sentencepiece: '▁' marks a space, byte fallback, the first leading space stripped."""

    WORDS = ("▁Hello", "▁world", "▁the", "▁", "▁a", "你", "好", "Hel", "lo", "▁▁", "\n")

    def __init__(self) -> None:
        self.pieces = {i: f"<0x{i:02X}>" for i in range(256)}
        self.pieces.update({256 + i: w for i, w in enumerate(self.WORDS)})
        self.ids = {p: i for i, p in self.pieces.items()}
        self.special = {v: k for k, v in SPECIALS.items()}

    def encode(self, text: str) -> list[int]:
        text = "▁" + text.replace(" ", "▁")
        ids, i = [], 0
        words = sorted(self.WORDS, key=len, reverse=True)
        while i < len(text):
            word = next((w for w in words if text.startswith(w, i)), None)
            if word is not None:
                ids.append(self.ids[word])
                i += len(word)
            else:
                ids.extend(self.ids[f"<0x{b:02X}>"] for b in text[i].encode())
                i += 1
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text, pending = "", b""
        for i in ids:
            piece = self.special.get(i) if i in self.special else self.pieces[i]
            assert piece is not None
            if piece.startswith("<0x") and len(piece) == 6:
                pending += bytes([int(piece[3:5], 16)])
                continue
            text += pending.decode("utf-8", errors="replace")
            pending = b""
            if i in self.special:
                text += "" if skip_special_tokens else piece
            else:
                text += piece.replace("▁", " ")
        text += pending.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text


class FakeLegacyLlamaTokenizer(FakeSentencePieceTokenizer):
    """transformers' slow legacy Llama decode: the first token loses its '▁', then sentencepiece strips
    one more leading space, so ``decode(['▁', '▁'])`` is '' (not prefix-stable)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if ids and self.pieces.get(ids[0], "").startswith("▁"):
            head = self.pieces[ids[0]][1:]
            text = super().decode([], skip_special_tokens)
            rest = super().decode(ids[1:], skip_special_tokens)
            joined = head.replace("▁", " ") + (
                " " + rest if ids[1:] and self.pieces.get(ids[1], "").startswith("▁") else rest
            )
            return (text + joined).removeprefix(" ")
        return super().decode(ids, skip_special_tokens)


ALPHABET = [
    "Hello",
    " world",
    " the",
    " ",
    "  ",
    "\n",
    "\n\n",
    "a",
    "b",
    "你",
    "好",
    "你好",
    "🎉",
    "😀",
    "é",
    "##",
    "x y",
    "。",
]
ALPHABET += [" .", ".", " ,", " ?", "!", "n't", " n't", "'s", " 's", "\t"]


def random_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 25))) for _ in range(count)]


def stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Feed ids one or a few at a time; return every delta, the flush included."""
    deltas, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 1, 2, 3])
        deltas.append(detok.add(ids[i : i + n]))
        i += n
    deltas.append(detok.flush())
    return deltas


class Adapter:
    """Gives a raw tokenizer the ``encode`` / ``decode`` calls the tests use."""

    def __init__(self, encode: Callable[[str], list[int]], decode: Callable[[list[int], bool], str]) -> None:
        self._encode, self._decode = encode, decode

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._decode(ids, skip_special_tokens)


def check_roundtrip(
    tok: FakeByteTokenizer | FakeSentencePieceTokenizer | Adapter, seed: int, count: int, prompt: list[int]
) -> None:
    rng = random.Random(seed)
    prompt_text = tok.decode(prompt, skip_special_tokens=True)
    for text in random_texts(seed, count):
        ids = tok.encode(text)
        full = tok.decode(prompt + ids, skip_special_tokens=True)
        assert full.startswith(prompt_text)
        detok = IncrementalDetokenizer(tok, prompt)
        deltas = stream(detok, ids, rng)
        assert "".join(deltas) == full[len(prompt_text) :] == detok.text, text
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas)
        assert detok.token_ids == ids


@pytest.mark.parametrize(
    "make", [FakeByteTokenizer, FakeSentencePieceTokenizer, FakeCleanUpTokenizer, FakeLegacyLlamaTokenizer]
)
def test_deltas_add_up_to_the_decode(make: Callable[[], FakeByteTokenizer | FakeSentencePieceTokenizer]) -> None:
    tok = make()
    check_roundtrip(tok, seed=0, count=200, prompt=[])
    check_roundtrip(tok, seed=1, count=100, prompt=[*tok.encode("Hello the"), SPECIALS["<|im_end|>"]])


def test_sentencepiece_word_initial_space() -> None:
    tok = FakeSentencePieceTokenizer()
    prompt = tok.encode("say")
    detok = IncrementalDetokenizer(tok, prompt)
    hello, world = tok.ids["▁Hello"], tok.ids["▁world"]
    assert detok.add([hello]) == " Hello"  # after the prompt, the word-initial space is kept
    assert detok.add([world]) == " world"
    fresh = IncrementalDetokenizer(tok, [])
    assert fresh.add([hello]) + fresh.add([world]) == "Hello world" == tok.decode([hello, world])


def test_incomplete_utf8_is_held_back() -> None:
    tok = FakeByteTokenizer()
    ids = tok.encode("a🎉")
    assert len(ids) == 3  # 'a', b'\xf0\x9f', b'\x8e\x89'
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(ids[:2]) == "a"
    assert detok.add(ids[2:]) == "🎉"
    broken = IncrementalDetokenizer(tok, [])
    assert broken.add([0xE4]) == ""
    assert broken.flush() == "\ufffd"  # an unfinished character comes out only at the end


def test_special_tokens() -> None:
    tok = FakeByteTokenizer()
    ids = [*tok.encode("hi"), SPECIALS["<|im_end|>"]]
    assert "".join(stream(IncrementalDetokenizer(tok, []), ids, random.Random(0))) == "hi"
    kept = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert "".join(stream(kept, ids, random.Random(0))) == "hi<|im_end|>"


@pytest.mark.parametrize("make", [FakeByteTokenizer, FakeSentencePieceTokenizer, FakeCleanUpTokenizer])
@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_cut_exactly(
    make: Callable[[], FakeByteTokenizer | FakeSentencePieceTokenizer], include: bool
) -> None:
    tok = make()
    rng = random.Random(5)
    tested = 0
    for text in random_texts(7, 300):
        ids = tok.encode(text)
        full = tok.decode(ids)
        if len(full) < 4:
            continue
        start = rng.randrange(len(full) - 2)
        stop = full[start : start + rng.randrange(1, 5)]
        decoy = "NEVER"
        cut = full.find(stop)
        expected = full[: cut + len(stop)] if include else full[:cut]
        detok = IncrementalDetokenizer(tok, [], stop=[decoy, stop], include_stop_str=include)
        deltas, emitted = [], ""
        for token in ids:
            delta = detok.add([token])
            emitted += delta
            assert expected.startswith(emitted), (text, stop)  # never any text past the cut
            deltas.append(delta)
        emitted += detok.flush()
        assert emitted == expected == detok.text, (text, stop)
        assert detok.stopped_by == stop
        assert detok.add([0]) == "" and detok.flush() == ""
        tested += 1
    assert tested > 200


def test_stop_string_split_across_tokens_is_never_emitted() -> None:
    tok = FakeByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    out = [detok.add(tok.encode(piece)) for piece in ["ab", "S", "T", "O", "P", "zz"]]
    assert out == ["", "", "a", "b", "", ""]  # the last len("STOP") - 1 = 3 characters are held back
    assert detok.stopped_by == "STOP" and detok.text == "ab"


def test_held_back_stop_prefix_is_released_when_it_does_not_complete() -> None:
    tok = FakeByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    assert detok.add(tok.encode("xST")) == ""
    assert detok.add(tok.encode("A")) == "x"
    assert detok.flush() == "STA" and detok.stopped_by is None


def test_trailing_whitespace_waits_for_the_next_token() -> None:
    tok = FakeCleanUpTokenizer()
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(tok.encode("Hello")) == "Hello"
    assert detok.add(tok.encode(" ")) == ""  # might still become part of " ."
    assert detok.add(tok.encode(".")) == "."
    assert detok.add(tok.encode(" ")) == ""
    assert detok.flush() == " " and detok.text == "Hello. "


def test_legacy_llama_blank_tokens_keep_their_spaces() -> None:
    tok = FakeLegacyLlamaTokenizer()
    blank, the = tok.ids["▁"], tok.ids["▁the"]
    assert tok.decode([blank, blank, the]) == " the"  # the decode this test is about
    ids = [tok.ids["你"], blank, blank, the]
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(detok.add([t]) for t in ids) + detok.flush() == "你   the" == tok.decode(ids)


def test_stop_string_ending_in_whitespace_is_caught_on_its_last_token() -> None:
    tok = FakeByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], stop=["\n\n"])
    assert detok.add(tok.encode("ab")) == "a"
    assert detok.add(tok.encode("\n\n")) == "b"
    assert detok.stopped_by == "\n\n" and detok.text == "ab"


def test_earliest_stop_string_wins() -> None:
    tok = FakeByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], stop=["world", "lo w"])
    text = "".join([detok.add([t]) for t in tok.encode("Hello world!")]) + detok.flush()
    assert text == "Hel" and detok.stopped_by == "lo w"


def test_decodes_only_a_small_window() -> None:
    tok = FakeByteTokenizer()
    lengths: list[int] = []
    decode = tok.decode

    def spy(ids: list[int], skip_special_tokens: bool = True) -> str:
        lengths.append(len(ids))
        return decode(ids, skip_special_tokens)

    tok.decode = spy  # type: ignore[method-assign]
    detok = IncrementalDetokenizer(tok, list(range(100)))
    for token in tok.encode("Hello world " * 50):
        detok.add([token])
    assert max(lengths) <= 8


# ---- the fixture checkpoints' real tokenizers -----------------------------------------------------------
BPE_MODELS = ["tiny-1B", "tiny-76B"]
SP_MODELS = ["tiny-2B", "tiny-4B", "tiny-8B", "tiny-26B", "tiny-40B"]


def raw_tokenizer(name: str) -> Adapter:
    path = CKPT / name
    if name in BPE_MODELS:
        tokenizers = pytest.importorskip("tokenizers")
        bpe = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        return Adapter(
            lambda t: bpe.encode(t, add_special_tokens=False).ids,
            lambda ids, skip: bpe.decode(ids, skip_special_tokens=skip),
        )
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    return Adapter(lambda t: sp.encode(t), lambda ids, skip: sp.decode(ids))


def project_tokenizer(name: str) -> Adapter:
    module = pytest.importorskip("internvl_runtime.processing.tokenization")
    tok = module.Tokenizer.from_pretrained(CKPT / name)
    return Adapter(
        lambda t: list(tok.encode(t, add_special_tokens=False)),
        lambda ids, skip: tok.decode(ids, skip_special_tokens=skip),
    )


@pytest.mark.parametrize("name", BPE_MODELS + SP_MODELS)
@pytest.mark.parametrize("load", [raw_tokenizer, project_tokenizer], ids=["raw", "project"])
def test_fixture_tokenizers(name: str, load: Callable[[str], Adapter]) -> None:
    assert (CKPT / name).is_dir(), f"fixture checkpoint missing: {CKPT / name}"
    tok = load(name)
    check_roundtrip(tok, seed=11, count=40, prompt=[])
    check_roundtrip(tok, seed=12, count=20, prompt=tok.encode("Describe the image.\n"))
    rng = random.Random(13)
    for text in random_texts(14, 30):
        ids = tok.encode(text)
        full = tok.decode(ids, skip_special_tokens=True)
        if len(full) < 3:
            continue
        start = rng.randrange(len(full) - 1)
        stop = full[start : start + rng.randrange(1, 4)]
        detok = IncrementalDetokenizer(tok, [], stop=[stop])
        assert "".join(stream(detok, ids, rng)) == full[: full.find(stop)], (text, stop)


def test_special_tokens_kept_verbatim_with_any_window() -> None:
    """InternLM2's slow decode puts window-dependent spaces before special tokens; kept special tokens are
    given verbatim and the text between them decoded run by run, so every split adds up (tool-call tags)."""
    from internvl_runtime.processing.tokenization import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(CKPT / "tiny-2B")
    special = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in ("<|action_start|>", "<|plugin|>", "<|action_end|>")}
    body = tokenizer.encode('\n{"name":"f","parameters":{"a":"b c"}}', add_special_tokens=False)
    output = [ids["<|action_start|>"], ids["<|plugin|>"], *body, ids["<|action_end|>"]]
    expected = '<|action_start|><|plugin|>\n{"name":"f","parameters":{"a":"b c"}}<|action_end|>'
    for seed in range(5):
        detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hi"), skip_special_tokens=False,
                                       special_tokens=special)
        deltas = stream(detok, output, random.Random(seed))
        assert "".join(deltas) == detok.text == expected
