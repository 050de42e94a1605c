"""The domain tokenizer: every marker phrase of the trace language is one token, every other
character (digits included, as in Llama's tokenizer) is one token.

Built with Hugging Face `tokenizers` from a fixed vocabulary (nothing is learned, so the same
code always gives the same ids) and saved as `tokenizer.json` plus its config, which is what
`transformers.AutoTokenizer.from_pretrained(dir)` and SGLang's `--tokenizer-path` read.
No token contains a newline, so a thread's prompt and text tokenize independently: the ids of
`prompt + text` are the prompt's ids followed by the text's.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)

from apr.config import InputError
from apr.countdown import trace

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Marker phrases of the trace language, longest match first (the tokenizer matches
# added tokens leftmost-longest, so "No solution found in sub search" beats "No solution found.").
PHRASES = (
    trace.MOVE, trace.STATE, trace.STATE_OPS, trace.EXPLORE, trace.EXPLORE_NUMS, trace.GOAL,
    trace.DEAD_END, trace.GENERATED, trace.GENERATED_OP, trace.EXHAUSTED, trace.DIVE_START,
    trace.DIVE_END, trace.DIVE_FAILED, trace.SPAWN_START, trace.SPAWN_CHILD, trace.SPAWN_END,
    trace.JOIN_START, trace.JOIN_GOAL, trace.JOIN_NO_SOLUTION, trace.JOIN_END, trace.AT_LEVEL,
    trace.AT_NODE, trace.SUB_CALL_BUDGET, trace.TOKEN_BUDGET,
    # pieces of the number and operation lists: [5, 50, 52] and ['79-27=52', '5+52=57']
    ", ", "['", "', '", "']", "[]",
)
CHARACTERS = tuple(sorted(set(string.printable) - set("\t\r\x0b\x0c")))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build() -> Tokenizer:
    """The tokenizer, from scratch: specials, single characters, then the marker phrases."""
    assert all("\n" not in p for p in PHRASES), "a phrase must not span lines"
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in PHRASES])
    bos, eos = vocab[BOS], vocab[EOS]
    # Encoding adds BOS, as SGLang and transformers expect of a causal LM's tokenizer.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {EOS} $B:1", special_tokens=[(BOS, bos), (EOS, eos)])
    return tok


def save(directory: str | Path, model_max_length: int = 1 << 20) -> Path:
    """Write the tokenizer files that AutoTokenizer and SGLang load."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build().save(str(directory / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        # Decoding must give back the exact trace text: no space clean-up.
        "clean_up_tokenization_spaces": False,
        "add_bos_token": True,
        "add_eos_token": False,
        **special,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return directory


def load(directory: str | Path) -> Tokenizer:
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}: run `apr datagen` (it writes one) "
                                "or point at a model directory that holds tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - `tokenizers` raises a bare Exception on bad JSON
        raise InputError(f"{path} is corrupt ({e}): regenerate it with `apr datagen`") from None


# Special-token strings inside text are matched like phrases by the tokenizer, so count them too.
_PHRASE = re.compile("|".join(re.escape(p) for p in sorted(PHRASES + SPECIAL_TOKENS, key=len,
                                                            reverse=True)))


def count_tokens(text: str) -> int:
    """How many tokens `text` encodes to, without BOS/EOS, 20x faster than encoding it.

    Exact for this tokenizer: each phrase is one token (matched leftmost-longest, as the
    tokenizer matches added tokens) and each other character is one token; a test pins it.
    """
    return len(_PHRASE.sub("#", text))


def sequence_length(prompt: str, text: str) -> int:
    """Tokens of a training sequence: BOS + prompt + text + EOS."""
    return count_tokens(prompt) + count_tokens(text) + 2
