"""Tokenizer: a `tokenizers.Tokenizer` with the special tokens masked diffusion needs.

The same class serves the project's own byte-level BPE (`assets/tokenizer.json`, made
by `train_bpe` on the base-training split) and real LLaDA / Dream `tokenizer.json`
files: special tokens are resolved from ids or strings given by the model config, else
from the usual names (`<|mask|>`, `<|mdm_mask|>`, `<|endoftext|>`, ...).

Special-token strings inside text ARE read as special tokens (as Hugging Face does), so
the string from `apply_chat_template` encodes to the right ids. Decoding with
`skip_special=False` therefore returns any text exactly; `skip_special=True` (the
default) drops special tokens such as unfinished masks from the output.

    python -m ruvdllm.tokenizer train OUT.json [--vocab-size 8192]
    python -m ruvdllm.tokenizer count [--tokenizer PATH] [--domains ...]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from ruvdllm import corpus

DEFAULT_PATH = Path(__file__).parent / "assets" / "tokenizer.json"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|mask|>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

# Names tried, in order, when the model config gives no id or string for a role.
_CANDIDATES = {
    "mask": ("<|mask|>", "<|mdm_mask|>", "[MASK]", "<mask>"),
    "eos": ("<|eos|>", "<|endoftext|>", "<|eot_id|>", "</s>", "[SEP]"),
    "pad": ("<|pad|>", "<pad>", "[PAD]"),
    "bos": ("<|bos|>", "<|startoftext|>", "<|beginoftext|>", "<|begin_of_text|>", "<s>", "[CLS]"),
}

# Chat formats as (token that identifies it, header of a turn, end of a turn), preferred
# first: LLaDA (Llama 3 style), Dream (Qwen2 ChatML), then this project's own tokens.
_CHAT_FORMATS = (
    ("<|start_header_id|>", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"),
    ("<|im_start|>", "<|im_start|>{role}\n", "<|im_end|>\n"),
    ("<|user|>", "<|{role}|>\n", "<|end|>\n"),
)

TokenSpec = int | str | None


class Tokenizer:
    """Encode and decode text; know the mask, eos, pad and bos ids; format chats."""

    def __init__(self, source: str | Path | tokenizers.Tokenizer, *, mask_token: TokenSpec = None,
                 eos_token: TokenSpec = None, pad_token: TokenSpec = None,
                 bos_token: TokenSpec = None) -> None:
        """Load `source` (a tokenizer.json path, or a loaded tokenizer).

        Each *_token is an id or a token string (from the model config, e.g. LLaDA's
        mask_token_id 126336), or None to look up the usual names. mask and eos must
        resolve; pad falls back to eos; bos may be absent (then add_bos is refused).
        """
        if isinstance(source, tokenizers.Tokenizer):
            self._tok = source
        elif Path(source).is_file():
            try:
                self._tok = tokenizers.Tokenizer.from_file(str(source))
            except Exception as e:  # tokenizers raises a bare Exception for any bad file
                raise ValueError(f"{source} is not a tokenizer.json file: {e}") from e
        else:
            raise FileNotFoundError(f"tokenizer file {source} not found")
        mask, eos = self._resolve("mask", mask_token), self._resolve("eos", eos_token)
        if mask is None or eos is None:
            role = "mask" if mask is None else "eos"
            raise ValueError(f"tokenizer has no {role} token (tried {_CANDIDATES[role]}); "
                             f"pass {role}_token= from the model config")
        pad = self._resolve("pad", pad_token)
        self._mask, self._eos, self._pad = mask, eos, eos if pad is None else pad
        self._bos = self._resolve("bos", bos_token)

    def _resolve(self, role: str, spec: TokenSpec) -> int | None:
        """The id of a special token given as an id, a string, or None (try the usual names)."""
        if isinstance(spec, int):
            if self._tok.id_to_token(spec) is None:
                raise ValueError(f"{role} token id {spec} is not in the vocabulary")
            return spec
        if isinstance(spec, str):
            token_id = self._tok.token_to_id(spec)
            if token_id is None:
                raise ValueError(f"{role} token {spec!r} is not in the vocabulary")
            return token_id
        found = (self._tok.token_to_id(name) for name in _CANDIDATES[role])
        return next((i for i in found if i is not None), None)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def mask_token_id(self) -> int:
        return self._mask

    @property
    def eos_token_id(self) -> int:
        return self._eos

    @property
    def pad_token_id(self) -> int:
        return self._pad

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    def _prefix(self, add_bos: bool) -> list[int]:
        if add_bos and self._bos is None:
            raise ValueError("this tokenizer has no bos token; encode with add_bos=False")
        return [self._bos] if add_bos and self._bos is not None else []

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`, optionally after the bos id."""
        return self._prefix(add_bos) + self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """`encode` for many texts at once (parallel inside `tokenizers`)."""
        prefix = self._prefix(add_bos)
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [prefix + e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; special tokens (mask, eos, chat markers) dropped unless asked for."""
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special))

    def apply_chat_template(self, messages: Sequence[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The prompt string for a chat, in the format this tokenizer's tokens belong to.

        Contents are stripped (as LLaDA's template does). bos is not included: encode the
        result with add_bos=True where the model expects it (LLaDA does).
        """
        fmt = next((f for f in _CHAT_FORMATS if self._tok.token_to_id(f[0]) is not None), None)
        if fmt is None:
            raise ValueError("tokenizer has no chat tokens (<|user|>, <|im_start|> or "
                             "<|start_header_id|>)")
        _, header, end = fmt
        turns = []
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES or not isinstance(content, str):
                raise ValueError(f"message {i} must be {{'role': one of {ROLES}, "
                                 f"'content': str}}, got {message!r}")
            turns.append(header.format(role=role) + content.strip() + end)
        if add_generation_prompt:
            turns.append(header.format(role="assistant"))
        return "".join(turns)

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as tokenizer.json (compact, one line), making missing folders."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path), pretty=False)


def train_bpe(texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    """A byte-level BPE (any text encodes, no unknown token) with SPECIAL_TOKENS first."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must cover 256 bytes + {len(SPECIAL_TOKENS)} specials")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


def count_tokens(tok: Tokenizer, domains: Sequence[str]) -> str:
    """A Markdown table of documents and tokens per domain and split."""
    rows = ["| domain | split | documents | characters | tokens | chars/token |",
            "|---|---|---:|---:|---:|---:|"]
    for domain in domains:
        for split in corpus.SPLITS:
            docs = corpus.documents(domain, split)
            chars, tokens = sum(map(len, docs)), sum(map(len, tok.encode_batch(docs)))
            rows.append(f"| {domain} | {split} | {len(docs):,} | {chars:,} | {tokens:,} | "
                        f"{chars / max(tokens, 1):.2f} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    """Train the default tokenizer on the base train split, or count tokens per domain."""
    parser = argparse.ArgumentParser(prog="python -m ruvdllm.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a byte-level BPE on BASE_DOMAINS/train")
    train.add_argument("out", type=Path)
    train.add_argument("--vocab-size", type=int, default=8192)
    count = commands.add_parser("count", help="print tokens per domain and split (Markdown)")
    count.add_argument("--tokenizer", type=Path, default=DEFAULT_PATH)
    count.add_argument("--domains", nargs="+", choices=corpus.DOMAINS, default=list(corpus.DOMAINS))
    args = parser.parse_args(argv)
    from ruvdllm.cli import check_output  # imports torch: only this command needs it

    try:
        if args.command == "train":
            check_output(args.out)
            start = time.perf_counter()
            texts = [d for domain in corpus.BASE_DOMAINS for d in corpus.documents(domain, "train")]
            tok = train_bpe(texts, args.vocab_size)
            tok.save(args.out)
            print(f"{args.out}: {tok.vocab_size} tokens, trained on {len(texts)} documents "
                  f"in {time.perf_counter() - start:.1f} s")
        else:
            print(count_tokens(Tokenizer(args.tokenizer), args.domains))
    except (OSError, ValueError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
