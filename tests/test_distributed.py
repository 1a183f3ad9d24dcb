"""Tensor parallel (tinyformers/parallel): ranks are processes on 127.0.0.1 talking over gloo,
started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), one thread each.

The references are single-process runs in this process. GPT-2 (random weights, the real widths,
2 layers; 12 heads) runs on 2 ranks, SmolLM2-135M (9 heads, 3 KV heads) on 3: 2 does not
divide 9, which is an error that names both numbers.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import smollm2_gguf
from ranks import PROMPT, finish, launch, run_ranks, single_process

import tinyformers
from tinyformers.loading.gguf import read_gguf
from tinyformers.models.llama import LlamaConfig
from tinyformers.parallel import Shard


def check_memory(out: Path, world: int, weight_bytes: int) -> None:
    """Each rank's peak RSS grew by at most 1/world of the weights plus 200 MB (the runtime's
    working memory, one tensor being converted, the file pages read): no rank held the model."""
    for rank in range(world):
        memory = json.loads((out / f"memory{rank}.json").read_text())
        grew = memory["peak"] - memory["before"]
        print(f"rank {rank}: peak RSS grew {grew / 2**20:.0f} MB at load and run")
        assert grew < weight_bytes / world + 200 * 2**20


def test_gpt2_on_two_ranks_equals_one_process(gpt2_small_dir, tmp_path, monkeypatch):
    # The byte count below is of the shards: a dense copy that a process keeps for prefill where
    # torch's matmul measured faster (kernels/choose.py) is chosen per process, so it would
    # count on one side only (on Zen 3's AVX2 build rank 0 kept 5 MB more than half).
    monkeypatch.setenv("TINYFORMERS_PREFILL", "ours")
    got = run_ranks(gpt2_small_dir, 2, tmp_path)
    want, weights = single_process(gpt2_small_dir)
    torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=1e-5)
    assert got["greedy"] == want["greedy"]
    assert got["seeded"] == want["seeded"]  # rank 0 samples: the same draws from the same seed
    # Rank 0 holds half the matrices and half the vocabulary, the norms and positions whole.
    assert weights / 2 < got["weight_bytes"] < weights / 2 + 4 * 1024 * 768 + 2**20
    check_memory(tmp_path, 2, weights)


def test_smollm2_gguf_on_three_ranks_equals_one_process(tmp_path):
    # The written-out path (torch's matmuls). Tolerance 1e-5 of the logits' scale (|logit| up
    # to 29 here), 3e-4: a row-parallel layer sums its partial products in another order than
    # one matmul does, and over 30 layers that moves a logit by ~4e-5 (measured), as much as
    # the single process moves between 1 and 2 threads (5e-5).
    got = run_ranks(smollm2_gguf(), 3, tmp_path, fast=False)
    want, weights = single_process(smollm2_gguf(), fast=False)
    scale = want["logits"].abs().max().item()
    torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=1e-5 * scale)
    assert got["greedy"] == want["greedy"]
    assert got["seeded"] == want["seeded"]
    check_memory(tmp_path, 3, weights)


def test_heads_that_do_not_divide_by_the_world_size_are_an_error():
    argv = ["-m", "tinyformers", "generate", "--model", str(smollm2_gguf()), "-n", "1", "Hi"]
    for code, _, err in finish(launch(2, argv), timeout=60):
        assert code == 1
        assert err.strip().splitlines()[-1] == (
            "tinyformers: error: tensor parallel: num_attention_heads 9 does not divide by the "
            "world size 2; run on a world size that divides it"
        )
    shard = Shard(2, 3).local_config(LlamaConfig(49152, 576, 1536, 30, 9, 3))
    assert (shard.num_attention_heads, shard.num_key_value_heads, shard.head_dim) == (3, 1, 64)


def test_gguf_tensor_part_reads_the_rows_and_columns_of_the_whole_tensor():
    with read_gguf(smollm2_gguf()) as f:
        for name in ("blk.0.attn_output.weight", "token_embd.weight"):  # Q4_1, Q8_0
            whole = f.tensor(name)
            assert torch.equal(f.tensor_part(name, 0, 100, 300), whole[100:300])
            assert torch.equal(f.tensor_part(name, 1, 40, 300), whole[:, 40:300])  # mid-block


# A script as a user writes it, under torchrun: what follows the generation is `ending`.
USER_SCRIPT = """
import sys, torch.distributed as dist, tinyformers
model = tinyformers.load(sys.argv[1], threads=1, tensor_parallel=True)
print(model.generate("Hello", max_new_tokens=4, temperature=0))
"""
ENDINGS = {  # ending with nothing: every other test here
    # PyTorch asks scripts to destroy the group; our model's own group outlives it
    "destroy": "dist.destroy_process_group()",
    # close() (here through `with`) releases the others at once; the model refuses calls after
    "close, then destroy": """
with model:
    pass
try:
    model.generate("Hello", max_new_tokens=1)
except tinyformers.TinyformersError as e:
    print(e)
dist.destroy_process_group()
""",
}


@pytest.mark.parametrize("ending", ENDINGS)
def test_every_rank_exits_0_however_the_script_ends(gpt2_small_dir, ending):
    procs = launch(2, ["-c", USER_SCRIPT + ENDINGS[ending], str(gpt2_small_dir)])
    results = finish(procs, timeout=60)
    for code, _, err in results:
        assert (code, err) == (0, "")
    want = tinyformers.load(gpt2_small_dir, threads=1).generate(
        "Hello", max_new_tokens=4, temperature=0
    )
    lines = results[0][1].splitlines()
    assert lines[0] == want
    if ending.startswith("close"):
        assert lines[1:] == ["tensor parallel: this model was closed (its other ranks have exited)"]


def test_a_dead_rank_makes_the_others_exit_with_one_error_line(gpt2_small_dir):
    argv = ["-m", "tinyformers", "generate", "--model", str(gpt2_small_dir), "-n", "1000"]
    procs = launch(3, [*argv, "--temp", "0", "-t", "1", PROMPT], timeout=10)
    assert procs[0].stdout.read(1)  # a token arrived: every rank has loaded and runs
    procs[1].send_signal(signal.SIGKILL)
    start = time.monotonic()
    results = finish(procs, timeout=30)
    assert time.monotonic() - start < 15
    for rank in (0, 2):
        code, _, err = results[rank]
        assert code == 1
        lines = err.strip().splitlines()
        assert lines[-1].startswith("tinyformers: error: tensor parallel: rank"), err[-2000:]


def test_a_hung_rank_0_makes_the_others_exit_within_the_timeout(gpt2_small_dir):
    argv = ["-m", "tinyformers", "generate", "--model", str(gpt2_small_dir), "-n", "1000"]
    procs = launch(2, [*argv, "--temp", "0", "-t", "1", PROMPT], timeout=3)
    assert procs[0].stdout.read(1)
    procs[0].send_signal(signal.SIGSTOP)  # alive, holding its sockets open, silent
    start = time.monotonic()
    code, _, err = finish(procs[1:], timeout=30)[0]
    assert time.monotonic() - start < 10
    procs[0].kill()
    assert code == 1
    assert "did not answer within 3 s" in err.strip().splitlines()[-1]
