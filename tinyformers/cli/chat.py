"""Talk with an instruct model (the default SmolLM2-135M-Instruct, or --model).

On a terminal: a prompt with line editing and history; each answer streams as it is
generated. A pasted block of lines is one message, and so is a block between lines that
start and end with three double quotes (as in Ollama). Otherwise: all of stdin is one
message, the answer goes to stdout, and the command exits.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path

from tinyformers.chat import Conversation
from tinyformers.cli.options import (
    add_model_arguments,
    add_sampling_arguments,
    load_from_args,
    print_stats,
    read_stdin,
    sampling_options,
)
from tinyformers.errors import TinyformersError

SLASH_COMMANDS = """\
/reset        forget the conversation (the system message stays)
/system TEXT  set the system message and start over (/system alone: the template's default)
/stats        token counts and speed of the last answer
/help         this list
/quit, /exit  leave (Ctrl-D too)
\"\"\"         start a message of several lines; a line ending with \"\"\" ends it
Ctrl-C stops an answer; what was shown of it stays in the conversation."""

HELP = "talk with an instruct model"
EXAMPLES = """\
examples:
  tinyformers chat
  tinyformers chat --model ./SmolLM2-360M-Instruct --system "Answer in French."
  echo "Tell me a joke" | tinyformers chat --temp 0
"""

PROMPT, MORE = ">>> ", "... "
# A terminal in bracketed-paste mode wraps pasted text in these, so a paste is told from typing.
PASTE_ON, PASTE_OFF = "\x1b[?2004h", "\x1b[?2004l"
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p, max_new_tokens=512)
    p.add_argument("--system", "-s", help="system message (default: the chat template's, if any)")


def run(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        return _repl(_load(args), args)
    message = read_stdin("the message").strip()
    if not message:
        raise TinyformersError("stdin is empty: no message to answer")
    model = _load(args)
    _answer(model, Conversation(args.system, [{"role": "user", "content": message}]), args)
    sys.stdout.write("\n")
    return 0


def _load(args: argparse.Namespace):
    """The model, refused now rather than at the first message if it cannot chat."""
    model = load_from_args(args)
    if model.tokenizer is None or model.tokenizer.chat_template is None:
        raise TinyformersError(
            f"{model.source}: no chat template in the tokenizer files (a base model?); "
            "`tinyformers generate` continues plain text"
        )
    return model


def _repl(model, args: argparse.Namespace) -> int:
    # Ctrl-C is part of this REPL (stop an answer, clear a line): take it back even when the
    # process was started with SIGINT ignored, as shells do for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with contextlib.suppress(ImportError):  # Windows has no readline: plain input()
        import readline  # noqa: F401  (gives input() line editing and history)
    chat = Conversation(args.system)
    print(banner(model), file=sys.stderr)
    print("Type a message; /help lists commands; Ctrl-D quits.", file=sys.stderr)
    # The terminal marks pastes from now on (and stops when we leave): see read_message.
    terminal = next((s for s in (sys.stdout, sys.stderr) if s.isatty()), None)
    if terminal is None:
        return _loop(model, chat, args)
    terminal.write(PASTE_ON)
    try:
        return _loop(model, chat, args)
    finally:
        terminal.write(PASTE_OFF)
        terminal.flush()


def banner(model) -> str:
    """The model's name, format and context, before the first prompt."""
    info = model.info()
    weights = next(v for k, v in info.items() if k.startswith("weights"))  # the matrices first
    return (
        f"{Path(model.source).name}: {info['architecture']}, {weights}, "
        f"{model.config.context_length}-token context"
    )


def _loop(model, chat: Conversation, args: argparse.Namespace) -> int:
    while True:
        try:
            line = read_message()
        except KeyboardInterrupt:  # as in a shell: drop the line, prompt again
            print()
            continue
        except EOFError:
            print()
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            if _command(line, chat, model):
                return 0
            continue
        chat.turns.append({"role": "user", "content": line})
        try:
            _answer(model, chat, args)
        except KeyboardInterrupt:
            print("\n[interrupted]", end="", file=sys.stderr)
        except TinyformersError as e:  # a message too long, a template that refuses a role
            print(f"error: {e}", file=sys.stderr)
        if chat.turns[-1]["role"] == "user":  # no answer was started: forget the message
            chat.turns.pop()
        print("\n")  # end the answer's line, then a blank line


def read_message() -> str:
    """One message from the terminal: a line, a pasted block, or a \"\"\" block.

    With readline, a bracketed paste arrives as one line holding newlines. Without it, the
    paste markers arrive as text: the lines up to the end marker are one message.
    \"\"\" opens a block that the first line ending with \"\"\" closes (Ollama's rule).
    """
    line = input(PROMPT)
    if PASTE_START in line:
        lines = [line]
        while PASTE_END not in lines[-1]:
            lines.append(input())
        return "\n".join(lines).replace(PASTE_START, "").replace(PASTE_END, "").strip()
    if not line.lstrip().startswith('"""'):
        return line
    lines = [line.lstrip()[3:]]
    while not lines[-1].rstrip().endswith('"""'):
        lines.append(input(MORE))
    return "\n".join(lines).rstrip().removesuffix('"""').strip()


def _command(line: str, chat: Conversation, model) -> bool:
    """Run a /command; True when it asks to quit."""
    name, _, text = line.strip().partition(" ")
    if name in ("/quit", "/exit"):
        return True
    if name == "/reset":
        chat.turns.clear()
        print("[conversation cleared]", file=sys.stderr)
    elif name == "/system":
        chat.system = text.strip() or None
        chat.turns.clear()
        state = "set" if chat.system else "back to the template's default"
        print(f"[system message {state}; conversation cleared]", file=sys.stderr)
    elif name == "/stats":
        if model.last_stats.new_tokens:
            print_stats(model.last_stats)
        else:
            print("no answer yet", file=sys.stderr)
    elif name in ("/help", "/?"):
        print(SLASH_COMMANDS, file=sys.stderr)
    else:
        print(f"unknown command {name}; /help lists them", file=sys.stderr)
    return False


def _answer(model, chat: Conversation, args: argparse.Namespace) -> None:
    """Stream the answer to the last user message to stdout and add it to the conversation."""
    context = model.config.context_length
    ids, dropped = chat.fit(model.tokenizer, context, args.max_new_tokens)
    if dropped:
        turns = "turn" if dropped == 1 else "turns"
        print(
            f"[dropped {dropped} oldest {turns} to fit the {context}-token context]",
            file=sys.stderr,
        )
    answer = ""
    try:
        # Token ids go in as they are: the template wrote every BOS the model needs.
        for delta in model.stream(ids, args.max_new_tokens, **sampling_options(args)):
            sys.stdout.write(delta)
            sys.stdout.flush()
            answer += delta
    finally:  # Ctrl-C included: the part the user saw is part of the conversation
        chat.turns.append({"role": "assistant", "content": answer})
