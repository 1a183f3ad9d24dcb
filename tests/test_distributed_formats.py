"""Tensor parallel on every weight format: each run on 2 or 3 gloo ranks against one process
loaded the same way (tests/ranks.py runs both).

- quantize="gguf": a GGUF file's own blocks (Q4_0, Q4_1, Q8_0; Q5_0, Q5_1 and the K-quants
  Q4_K, Q5_K, Q6_K), split by rows (column- and vocab-parallel) and by whole blocks of columns
  (row-parallel); a split that would cut a block is refused in one line.
- quantize="int8" and compile=True: each rank quantizes, or compiles, its own shard.
"""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import hf_gpt2, save_checkpoint, smollm2_gguf
from ranks import IDS, MASK, finish, launch, run_ranks, single_process
from test_gguf_model import write_gpt2_gguf

# GPT-2's matrices in the GGUF, by the block kind each is stored in: every kind in every
# split (attn_qkv: column-parallel, q, k and v apart; attn_output: row-parallel; ...).
KINDS = {
    "attn_qkv": gguf.GGMLQuantizationType.Q4_0,
    "ffn_up": gguf.GGMLQuantizationType.Q4_1,
    "attn_output": gguf.GGMLQuantizationType.Q8_0,
    "ffn_down": gguf.GGMLQuantizationType.Q4_0,
    "token_embd": gguf.GGMLQuantizationType.Q8_0,  # vocab-parallel, tied to lm_head
}


def quantized_gpt2_gguf(path, monkeypatch, **config) -> str:
    """A small GPT-2 GGUF, laid out as llama.cpp converts it, its matrices in KINDS' blocks."""
    add_tensor = gguf.GGUFWriter.add_tensor

    def quantizing(writer, name, data, **kwargs):
        kind = KINDS.get(name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0])
        if kind is None or data.ndim != 2:
            return add_tensor(writer, name, data, **kwargs)
        blocks = gguf.quants.quantize(data.astype(np.float32), kind)
        return add_tensor(writer, name, blocks, raw_dtype=kind)

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "add_tensor", quantizing)
        return str(write_gpt2_gguf(hf_gpt2(n_layer=2, **config), path))


def random_kquant_blocks(rows: int, cols: int, kind, rng: np.random.Generator) -> np.ndarray:
    """[rows, bytes] of K-quant blocks with random integers and small fp16 scales (gguf-py
    reads K-quants but cannot quantize to them): valid blocks, as a file would hold."""
    _, size = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    d = np.array([1e-4], dtype=np.float16).view(np.uint8)
    for at in (0, 2) if kind != gguf.GGMLQuantizationType.Q6_K else (size - 2,):  # d (dmin)
        raw[..., at : at + 2] = d
    return raw.reshape(rows, -1)


def assert_same_run(got: dict, want: dict, atol: float) -> None:
    torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=atol)
    assert got["greedy"] == want["greedy"]
    assert got["seeded"] == want["seeded"]  # rank 0 samples: the same draws from the same seed


def test_gguf_q4_0_q4_1_q8_0_blocks_on_two_ranks_equal_one_process(tmp_path, monkeypatch):
    path = quantized_gpt2_gguf(tmp_path / "gpt2.gguf", monkeypatch, n_embd=128, n_head=4)
    got = run_ranks(path, 2, tmp_path, quantize="gguf")
    want, _ = single_process(path, quantize="gguf")
    # The same blocks and the same int8 activations on each rank (a row-parallel split is
    # whole blocks); only the order of the row-parallel sums differs: float32 rounding.
    assert_same_run(got, want, atol=1e-5)


def test_q5_and_k_quant_blocks_on_two_ranks_equal_one_process(tmp_path, monkeypatch):
    # Width 256, so K-quants' 256-column super-blocks fit: ffn_down's 1024 columns split into
    # 2 x 512 (row-parallel), attn_output's 256 would cut one, so it holds Q5_0 (32 columns).
    kinds = {
        "attn_qkv": gguf.GGMLQuantizationType.Q4_K,
        "ffn_up": gguf.GGMLQuantizationType.Q5_K,
        "ffn_down": gguf.GGMLQuantizationType.Q6_K,
        "attn_output": gguf.GGMLQuantizationType.Q5_0,
        "token_embd": gguf.GGMLQuantizationType.Q5_1,
    }
    rng, add_tensor = np.random.default_rng(0), gguf.GGUFWriter.add_tensor

    def k_quants(writer, name, data, **kwargs):
        kind = kinds.get(name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0])
        if kind is None or data.ndim != 2:
            return add_tensor(writer, name, data, **kwargs)
        if kind.name.endswith("_K"):
            blocks = random_kquant_blocks(*data.shape, kind, rng)
        else:
            blocks = gguf.quants.quantize(data.astype(np.float32), kind)
        return add_tensor(writer, name, blocks, raw_dtype=kind)

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "add_tensor", k_quants)
        path = str(write_gpt2_gguf(hf_gpt2(n_layer=2, n_embd=256, n_head=4), tmp_path / "k.gguf"))
    got = run_ranks(path, 2, tmp_path, quantize="gguf")
    want, _ = single_process(path, quantize="gguf")
    # As Q4_0/Q4_1/Q8_0 above: the same blocks on each rank, the row-parallel sums re-ordered
    assert_same_run(got, want, atol=1e-5)


def test_smollm2_gguf_blocks_on_three_ranks_equal_one_process(tmp_path):
    # The real file: Q4_1 matrices, the Q8_0 embedding tied to lm_head, and llama.cpp's q/k
    # row order undone within each rank's heads. The weights each rank packs are the single
    # process's blocks bit for bit; the sums are not: a row-parallel layer adds 3 partial
    # sums, and this mode quantizes every matmul's input to int8, so a last-bit difference
    # flips an activation's rounding and grows through SmolLM2's large activations (0.83 at
    # |logit| 30, measured). The mode's own sensitivity is that large: nudging the single
    # process's residual by 1e-6 of itself after layer 0 moves its logits by 1.97 (float32
    # weights: by 1.8e-4). So: logits within 2.0, the same texts, and at every real position
    # the same top token unless the single process's two candidates are closer than the
    # logits moved there (a near tie: on the Intel Xeon, 0.16 apart where they moved 0.51).
    got = run_ranks(smollm2_gguf(), 3, tmp_path, quantize="gguf")
    want, _ = single_process(smollm2_gguf(), quantize="gguf")
    assert_same_run(got, want, atol=2.0)
    real = torch.tensor(MASK).bool()
    ours, theirs = got["logits"], want["logits"]
    top = theirs.argmax(-1, keepdim=True)
    gap = theirs.gather(-1, top) - theirs.gather(-1, ours.argmax(-1, keepdim=True))  # 0: same
    moved = (ours - theirs).abs().amax(-1, keepdim=True)
    assert (gap <= moved)[real].all(), (gap[real], moved[real])


def test_a_gguf_split_that_cuts_a_block_is_refused_in_one_line(tmp_path, monkeypatch):
    # n_embd 96 on 2 ranks: each rank's attn_output holds 48 input columns, 1.5 Q8_0 blocks
    path = quantized_gpt2_gguf(tmp_path / "gpt2.gguf", monkeypatch, n_embd=96, n_head=2)
    argv = ["-m", "tinyformers", "generate", "--model", path, "--quantize", "gguf", "Hi"]
    for code, out, err in finish(launch(2, argv), timeout=60):
        assert (code, out) == (1, "")
        assert err.strip().splitlines() == [
            "tinyformers: error: tensor parallel: quantize gguf: blk.0.attn_output.weight's 96 "
            "columns split 2 ways are not whole blocks of 32; run on a world size that gives "
            "each rank a multiple of 32 columns, or without quantize gguf"
        ]


@pytest.fixture(scope="module")
def small_gpt2(tmp_path_factory):
    """GPT-2 with 2 layers of width 128 (4 heads), the real vocabulary."""
    return save_checkpoint(hf_gpt2(n_layer=2, n_embd=128, n_head=4), tmp_path_factory.mktemp("g"))


def test_int8_on_two_ranks_equals_one_process(small_gpt2, tmp_path):
    got = run_ranks(small_gpt2, 2, tmp_path, quantize="int8")
    want, _ = single_process(small_gpt2, quantize="int8")
    # Each rank quantizes its own rows, or whole 32-column groups of its columns: the same
    # int8 values and scales as one process; only the row-parallel sums are re-ordered.
    assert_same_run(got, want, atol=1e-5)


# A compiled decode step's logits [B, V], after an eager prefill of IDS, saved to argv[2].
COMPILED_STEP = """
import json, sys, torch, tinyformers
IDS, MASK = json.loads(sys.argv[3]), json.loads(sys.argv[4])
tensor_parallel = len(sys.argv) > 5
model = tinyformers.load(sys.argv[1], threads=1, compile=True, tensor_parallel=tensor_parallel)
ids, mask = torch.tensor(IDS), torch.tensor([row + [1] for row in MASK])  # one slot more
with torch.inference_mode():
    cache = model.net.make_cache(2, 6)
    model.net(ids, mask, cache=cache, input_pos=torch.arange(5), last_only=True)
    step = model.decode(ids[:, -1:], mask, cache=cache, input_pos=torch.tensor([5]), last_only=True)
torch.save(step[:, -1], sys.argv[2])
"""


def test_compile_on_two_ranks_equals_one_process(tmp_path, monkeypatch):
    # 1 layer: torch.compile's work dominates this test's time. Inductor compiles in this
    # process, not in a pool of workers: 3 processes each starting a pool on 2 cores took
    # 146 s of wall time for the one-process half alone, cold, against 40 s without.
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")
    path = save_checkpoint(hf_gpt2(n_layer=1, n_embd=128, n_head=4), tmp_path / "gpt2")
    got, want = tmp_path / "got.pt", tmp_path / "want.pt"
    argv = ["-c", COMPILED_STEP, str(path), "", json.dumps(IDS), json.dumps(MASK)]
    argv[3] = str(got)
    ranks = launch(2, [*argv, "tensor parallel"])  # each rank compiles its shard
    argv[3] = str(want)
    subprocess.run([sys.executable, *argv], check=True, capture_output=True)
    for code, _, err in finish(ranks, timeout=240):
        assert code == 0, err[-2000:]
    got, want = torch.load(got), torch.load(want)
    # The compiled graphs of each rank's shard against the compiled whole model: the same
    # ops on float32, only the row-parallel sums re-ordered
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, atol=1e-5 * scale, rtol=0)
