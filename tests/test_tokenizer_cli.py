"""`tinyformers tokenize`: ids and pieces as tiktoken and llama.cpp's vectors give them."""

from __future__ import annotations

from corpus import GPT2_DIR, llama_cpp_vectors, tiktoken_gpt2

from tinyformers.cli import main


def lines_of(capsys, argv: list[str]) -> list[str]:
    assert main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_ids_and_pieces_match_tiktoken(capsys):
    text = "hello world 🤑"
    enc = tiktoken_gpt2()
    ids = enc.encode_ordinary(text)
    pieces = [enc.decode_single_token_bytes(i) for i in ids]
    assert pieces[-1] == b"\x91"  # the emoji's last token is not a whole character

    def shown(piece: bytes) -> str:
        try:
            return repr(piece.decode("utf-8"))
        except UnicodeDecodeError:
            return repr(piece)

    out = lines_of(capsys, ["tokenize", "--model", str(GPT2_DIR), text])
    assert out == [f"{i:>5}  {shown(p)}" for i, p in zip(ids, pieces, strict=True)] + [
        f"{len(ids)} tokens"
    ]
    assert out[:2] == ["31373  'hello'", "  995  ' world'"]  # tiktoken's 'hello world' case


def test_special_text_is_plain_unless_allowed(capsys):
    model = ["--model", str(GPT2_DIR)]
    plain = lines_of(capsys, ["tokenize", *model, "<|endoftext|>"])
    assert plain[-1] == f"{len(tiktoken_gpt2().encode_ordinary('<|endoftext|>'))} tokens"
    allowed = lines_of(capsys, ["tokenize", *model, "--allow-special", "<|endoftext|>"])
    assert allowed == ["50256  '<|endoftext|>'  (special)", "1 token"]


def test_default_model_is_smollm2(capsys):
    text, ids = next((t, i) for t, i in llama_cpp_vectors("smollm") if t == "Hello world")
    out = lines_of(capsys, ["tokenize", text])
    assert [int(line.split()[0]) for line in out[:-1]] == ids


def test_missing_model_is_one_line_error(capsys, tmp_path):
    assert main(["tokenize", "--model", str(tmp_path / "none.gguf"), "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.gguf" in err
