"""`tinyformers train` end to end, on tiny models and a piece of Shakespeare (tests/data):
the loss falls, the out dir is a checkpoint Hugging Face loads with our logits, a resumed or
interrupted run equals an uninterrupted one bit for bit, two gloo ranks equal one process
accumulating twice as many micro-batches, a LoRA adapter loads in PEFT with our logits, and
each bad input gets its one line."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA, GPT2_DATA, hf_gpt2, save_tokenizer_files
from safetensors.torch import load_file

import tinyformers
from tinyformers.cli import main

ROOT = Path(__file__).resolve().parent.parent
TEXT = DATA / "shakespeare" / "alls_well_that_ends_well.txt"
# A small GPT in seconds: 2 blocks of width 32, 32 characters of context.
TINY = [
    *("--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32"),
    *("--batch-size", "8", "--eval-iters", "2", "--sample-tokens", "0", "--threads", "1"),
]


def train(tmp_path: Path, *args: str, out: str = "out") -> tuple[int, Path]:
    folder = tmp_path / out
    code = main(["train", "--data", str(TEXT), "--out", str(folder), *TINY, *args])
    return code, folder


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "checkpoint" / "weights.safetensors")


def test_loss_falls_and_hf_loads_the_folder_with_our_logits(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, out = train(tmp_path, "--max-iters", "150", "--eval-interval", "50")
    assert code == 0
    records = metrics(out)
    assert [r["iter"] for r in records] == [0, 50, 100, 150]
    # from log(vocab) = 4.3 towards a character model: well down within 150 steps
    assert records[0]["val_loss"] > 4.0 and records[-1]["val_loss"] < records[0]["val_loss"] - 1.0
    assert {"train_loss", "lr", "elapsed_s", "tokens_per_s", "grad_norm_by_layer"} <= set(
        records[-1]
    )
    assert set(records[-1]["grad_norm_by_layer"]) == {"wte", "wpe", "h.0", "h.1", "ln_f"}
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = "ROMEO. And what"
    ours = tinyformers.load(out)
    ids = ours.tokenizer.encode(text)
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == ids  # HF reads our chars
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits
    assert (ours(torch.tensor([ids])) - reference).abs().max() < 1e-4  # HF transformers, fp32
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--temp", "0", "-n", "8", "ROMEO."]) == 0
    assert len(capsys.readouterr().out) >= 8  # 8 characters continue the prompt


def test_llama_from_scratch_with_a_models_tokenizer_loads_in_hf(tmp_path):
    from transformers import AutoModelForCausalLM

    code, out = train(
        tmp_path, "--arch", "llama", "--tokenizer", str(GPT2_DATA), "--max-iters", "20",
        "--eval-interval", "20",
    )  # fmt: skip
    assert code == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    ids = torch.tensor([tinyformers.load_tokenizer(out).encode("To be, or not to be")])
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        reference = hf(ids).logits
    assert (tinyformers.load(out)(ids) - reference).abs().max() < 1e-4  # HF, fp32


@pytest.fixture
def same_kernels(monkeypatch):
    """Two runs compared bit for bit compute with the same matmuls (the choice is measured,
    and a measurement can differ between two runs; a resumed run reuses its own)."""
    monkeypatch.setenv("TINYFORMERS_TRAIN_MATMUL", "onednn")


def test_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path, same_kernels):
    schedule = ["--eval-interval", "10", "--lr-decay-iters", "30", "--dropout", "0.1"]
    assert train(tmp_path, "--max-iters", "30", *schedule, out="whole")[0] == 0
    assert train(tmp_path, "--max-iters", "10", *schedule, out="parts")[0] == 0
    assert train(tmp_path, "--max-iters", "30", "--resume", *schedule, out="parts")[0] == 0
    whole, parts = checkpoint_weights(tmp_path / "whole"), checkpoint_weights(tmp_path / "parts")
    assert all(torch.equal(whole[k], parts[k]) for k in whole)  # bit for bit
    losses = [(r["iter"], r["train_loss"], r["val_loss"]) for r in metrics(tmp_path / "whole")]
    assert losses == [
        (r["iter"], r["train_loss"], r["val_loss"]) for r in metrics(tmp_path / "parts")
    ]


def test_ctrl_c_saves_a_checkpoint_that_resumes_to_the_same_weights(tmp_path, same_kernels):
    args = [*TINY, "--max-iters", "400", "--eval-interval", "100", "--lr-decay-iters", "400"]
    run = [sys.executable, "-m", "tinyformers", "train", "--data", str(TEXT), *args]
    proc = subprocess.Popen(
        [*run, "--out", str(tmp_path / "parts")],
        cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    for line in proc.stderr:
        if line.startswith("training "):  # the loop is about to start: Ctrl-C is caught now
            proc.send_signal(signal.SIGINT)
            break
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, err
    assert "interrupted at iter" in err and "--resume" in err and "Traceback" not in err
    stopped = json.loads((tmp_path / "parts" / "checkpoint" / "state.json").read_text())["iter"]
    assert 0 < stopped < 400
    assert main(["train", "--data", str(TEXT), "--out", str(tmp_path / "parts"), *args,
                 "--resume"]) == 0  # fmt: skip
    assert main(["train", "--data", str(TEXT), "--out", str(tmp_path / "whole"), *args]) == 0
    whole, parts = checkpoint_weights(tmp_path / "whole"), checkpoint_weights(tmp_path / "parts")
    assert all(torch.equal(whole[k], parts[k]) for k in whole)  # bit for bit


def test_ddp_on_two_gloo_ranks_equals_one_process_accumulating(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYFORMERS_TRAIN_MATMUL", "torch")
    args = [*TINY, "--max-iters", "6", "--eval-interval", "6", "--gradient-accumulation-steps", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "tinyformers", "train", "--data", str(TEXT), "--out", str(tmp_path / "ddp"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 processes" in done.stderr
    assert main(["train", "--data", str(TEXT), "--out", str(tmp_path / "one"), *args]) == 0
    ddp, one = checkpoint_weights(tmp_path / "ddp"), checkpoint_weights(tmp_path / "one")
    moved = checkpoint_weights(tmp_path / "one")["wte.weight"].std()
    assert moved > 0.01  # the weights did train
    for name in one:  # the same mean gradient, summed in another order: float32 rounding
        assert (ddp[name] - one[name]).abs().max() < 1e-5, name


def hf_llama(folder: Path) -> Path:
    """A random HF Llama (grouped-query, untied) with GPT-2's tokenizer files, saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    save_tokenizer_files(folder)
    return folder


def hf_gpt2_folder(folder: Path) -> Path:
    hf_gpt2(n_layer=2, n_embd=32, n_head=2).save_pretrained(folder)
    save_tokenizer_files(folder)
    return folder


@pytest.mark.parametrize("make_base", [hf_llama, hf_gpt2_folder], ids=["llama", "gpt2"])
def test_lora_adapter_loads_in_peft_with_our_logits(tmp_path, make_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = make_base(tmp_path / "base")
    lora = ["--model", str(base), "--lora", "4", "--learning-rate", "1e-2", "--max-iters", "4"]
    code, out = train(tmp_path, *lora, "--eval-interval", "4", "--block-size", "16")
    assert code == 0
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".png") == [
        "adapter_config.json", "adapter_model.safetensors", "checkpoint", "metrics.jsonl",
    ]  # fmt: skip
    ids = torch.tensor([[464, 3139, 286, 4881, 318, 6342, 11, 290]])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    with torch.no_grad():
        reference = peft(ids).logits
        before = AutoModelForCausalLM.from_pretrained(base)(ids).logits
    ours = tinyformers.load(base, adapter=out)(ids)
    assert (ours - reference).abs().max() < 1e-4  # PEFT on HF transformers, fp32
    assert (reference - before).abs().max() > 1e-3  # the adapter does change the model
    code, merged = train(tmp_path, *lora, "--eval-interval", "4", "--merge", out="merged")
    assert code == 0
    hf_merged = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        assert (hf_merged(ids).logits - tinyformers.load(merged)(ids)).abs().max() < 1e-4


@pytest.mark.slow
def test_smollm2_chat_lora_runs_and_its_adapter_loads_everywhere(tmp_path, capsys):
    chats = tmp_path / "chats.jsonl"
    record = {
        "messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]
    }
    chats.write_text("\n".join(json.dumps(record) for _ in range(4)) + "\n")
    common = ["--model", "smollm2", "--block-size", "32", "--batch-size", "2", "--eval-iters", "1"]
    code = main(["train", "--data", str(chats), "--out", str(tmp_path / "lora"), *common,
                 "--lora", "4", "--max-iters", "3", "--eval-interval", "3", "--sample-tokens", "0",
                 "--learning-rate", "1e-2"])  # fmt: skip
    assert code == 0
    records = metrics(tmp_path / "lora")
    assert records[-1]["train_loss"] < records[0]["train_loss"]  # "Hi!" is learnt
    model = tinyformers.load("smollm2", adapter=tmp_path / "lora")
    expected = model.generate("Hello", max_new_tokens=3, temperature=0)
    ids = torch.tensor([model.tokenizer.encode("Say hi")])
    assert (model(ids) - tinyformers.load("smollm2")(ids)).abs().max() > 1e-3  # merged in
    capsys.readouterr()
    argv = ["--model", "smollm2", "--adapter", str(tmp_path / "lora"), "--temp", "0", "-n", "3"]
    assert main(["generate", *argv, "Hello"]) == 0
    assert capsys.readouterr().out == expected  # --adapter: the same model as load(adapter=)


def test_a_terminal_shows_one_live_line(tmp_path):
    import pexpect

    argv = ["-m", "tinyformers", "train", "--data", str(TEXT), "--out", str(tmp_path / "out"),
            *TINY, "--max-iters", "200", "--eval-interval", "200"]  # fmt: skip
    child = pexpect.spawn(sys.executable, argv, cwd=str(ROOT), encoding="utf-8", timeout=120)
    # rewritten in place (carriage return, then erase to the end of the line)
    child.expect(r"\riter \d+/200  loss \d+\.\d{4}  [\d,]+ tok/s  ETA \dm\d\ds\x1b\[K")
    child.expect("iter 200: train loss")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinyformers", "train", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs,
    )  # fmt: skip


def one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 1 and one error line, the last on stderr (progress lines may come before it)."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert [line for line in lines if line.startswith("tinyformers:")] == lines[-1:]
    assert lines[-1].startswith("tinyformers: error: ")
    for word in words:
        assert word in lines[-1], lines[-1]


@pytest.mark.parametrize(
    ("content", "name", "words"),
    [
        (b"", "empty.txt", ["the file is empty"]),
        (b"To be, or not to be.\n" * 3, "short.txt", ["too short for --block-size 32"]),
        (b"caf\xe9 au lait\n" * 100, "latin1.txt", ["not UTF-8", "0xe9", "line 1"]),
        (b'{"text": "a"}\n{"text": "b"}\n[1, 2]\n', "bad.jsonl", ["line 3", '"messages"']),
        (b'{"text": "a"}\n{"text": \n', "broken.jsonl", ["line 2 is not JSON"]),
    ],
    ids=["empty", "shorter-than-a-block", "not-utf8", "jsonl-not-an-object", "jsonl-not-json"],
)
def test_bad_data_gets_one_line_and_writes_nothing(tmp_path, content, name, words):
    data = tmp_path / name
    data.write_bytes(content)
    done = run_cli("--data", str(data), "--out", str(tmp_path / "out"), *TINY)
    one_line_error(done, str(data), *words)
    assert len(done.stderr.strip().splitlines()) == 1  # found before anything runs
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_out_dir_with_a_run_is_refused_unless_resume_or_overwrite(tmp_path):
    assert train(tmp_path, "--max-iters", "2", "--eval-interval", "2")[0] == 0
    mine = tmp_path / "out" / "notes.txt"
    mine.write_text("the user's own file")
    done = run_cli("--data", str(TEXT), "--out", str(tmp_path / "out"), *TINY)
    one_line_error(done, "holds a training run already", "--resume", "--overwrite")
    assert train(tmp_path, "--max-iters", "2", "--eval-interval", "2", "--overwrite")[0] == 0
    assert mine.read_text() == "the user's own file"  # --overwrite removes only a run's files


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "out"
    done = run_cli("--data", str(TEXT), "--out", str(out), *TINY, "--learning-rate", "1e30",
                   "--warmup-iters", "0", "--eval-interval", "1000")  # fmt: skip
    one_line_error(done, "the loss became nan at iter", "(iter 0) is kept")
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["iter"] == 0
    assert all(torch.isfinite(w).all() for w in checkpoint_weights(out).values())


def test_a_failed_save_keeps_the_previous_checkpoint_whole(tmp_path):
    assert train(tmp_path, "--max-iters", "4", "--eval-interval", "2")[0] == 0
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    limit = (out / "checkpoint" / "weights.safetensors").stat().st_size // 2

    def small_disk() -> None:  # files may grow to `limit` bytes; then write() fails (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = run_cli("--data", str(TEXT), "--out", str(out), *TINY, "--max-iters", "8",
                   "--eval-interval", "2", "--resume", preexec_fn=small_disk)  # fmt: skip
    one_line_error(done, "could not save at iter 6", "the checkpoint of iter 4 is kept")
    assert {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()} == before
    assert not [p for p in out.iterdir() if "tmp" in p.name or p.name == "checkpoint.old"]
    assert train(tmp_path, "--max-iters", "6", "--eval-interval", "2", "--resume")[0] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_autocast_trains(tmp_path):
    code, out = train(tmp_path, "--device", "cuda", "--max-iters", "40", "--eval-interval", "20")
    assert code == 0
    records = metrics(out)
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.3
