"""The math of learning (training/loss.py, optim.py) against torch's own, and the pieces of a
run (data, LoRA, the oneDNN matmuls) against what they stand for."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DATA

from tinyformers.kernels.train_linear import OneDNNLinear, _Linear, use_fast_matmuls
from tinyformers.training.data import Split, encode_record, load_dataset
from tinyformers.training.lora import LoRALinear, add_lora, merge_lora
from tinyformers.training.loss import IGNORE, cross_entropy
from tinyformers.training.optim import AdamW, clip_grad_norm, learning_rate, parameter_groups

SHAKESPEARE = DATA / "shakespeare" / "alls_well_that_ends_well.txt"


def test_written_out_loss_equals_torch_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (3, 7))
    targets[0, :3] = IGNORE  # prompt tokens of a chat: not scored
    ours = cross_entropy(logits, targets)
    reference = F.cross_entropy(logits.view(-1, 11), targets.view(-1), ignore_index=IGNORE)
    assert abs(ours.item() - reference.item()) < 1e-12  # the same formula, float64
    (ours_grad,) = torch.autograd.grad(ours, logits)
    (ref_grad,) = torch.autograd.grad(reference, logits)
    assert torch.allclose(ours_grad, ref_grad, atol=1e-12)  # softmax - one-hot, / count
    assert ours_grad[0, :3].abs().max() == 0  # ignored positions get no gradient


def test_uniform_logits_cost_log_vocab():
    # the loss a model starts near: log(65) for nanoGPT's 65 Shakespeare characters
    loss = cross_entropy(torch.zeros(2, 4, 65), torch.randint(0, 65, (2, 4)))
    assert abs(loss.item() - math.log(65)) < 1e-6


def test_adamw_equals_torch_adamw_with_decay_groups_and_clipping():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)
    )
    reference = torch.nn.Sequential(*[m for m in __import__("copy").deepcopy(net)])
    ours = AdamW(parameter_groups(net, 0.1), lr=1e-2, betas=(0.9, 0.99))
    theirs = torch.optim.AdamW(parameter_groups(reference, 0.1), lr=1e-2, betas=(0.9, 0.99))
    for step in range(12):
        x = torch.randn(5, 8)
        for model in (net, reference):
            model(x).pow(2).sum().backward()
        clip_grad_norm(ours, 1.0)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        lr = learning_rate(step, 1e-2, 1e-3, 3, 12)
        ours.lr = lr
        for group in theirs.param_groups:
            group["lr"] = lr
        ours.step()
        theirs.step()
        ours.zero_grad()
        theirs.zero_grad()
    for a, b in zip(net.parameters(), reference.parameters(), strict=True):
        assert (a - b).abs().max() < 1e-6  # torch.optim.AdamW, the reference; float32 rounding


def nanogpt_get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """nanoGPT's train.py `get_lr`, as written there (the reference schedule)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize("it", [0, 1, 99, 100, 101, 1000, 1999, 2000, 2001, 5000])
def test_schedule_is_nanogpts(it):
    assert learning_rate(it, 1e-3, 1e-4, 100, 2000) == nanogpt_get_lr(it, 1e-3, 1e-4, 100, 2000)


def test_clipping_bounds_the_joint_length_and_reports_it():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4, 1))
    optimizer = AdamW([{"params": [a, b], "weight_decay": 0.0}], lr=1.0)
    a.grad.fill_(3.0)  # a view of the optimizer's block: backward adds into it the same way
    b.grad.fill_(4.0)
    total = clip_grad_norm(optimizer, max_norm=1.0)
    assert abs(total.item() - math.sqrt(27 + 64)) < 1e-5  # before clipping
    assert abs(torch.cat([a.grad, b.grad.flatten()]).norm().item() - 1.0) < 1e-5  # after


def test_parameters_live_in_one_block_and_backward_fills_its_gradient():
    net = torch.nn.Linear(3, 2)
    optimizer = AdamW(parameter_groups(net, 0.0), lr=0.1)
    matrices, biases = optimizer.groups  # decayed, and not
    net(torch.full((1, 3), 2.0)).sum().backward()
    assert net.weight.data_ptr() == matrices.flat.data_ptr()  # the weight is the block
    assert torch.equal(matrices.grad, torch.full((6,), 2.0))  # d sum(W x + b) / d W = x
    assert torch.equal(biases.grad, torch.ones(2))  # ... / d b = 1
    optimizer.zero_grad()
    assert net.weight.grad.abs().sum() == 0
    assert net.weight.grad.data_ptr() == matrices.grad.data_ptr()  # still a view


def test_onednn_linear_equals_f_linear_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(4, 9, 24, requires_grad=True)
    w = torch.randn(40, 24, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    dy = torch.randn(4, 9, 40)
    ours = _Linear.apply(x, w, b)
    reference = F.linear(x, w, b)
    assert (ours - reference).abs().max() < 1e-4  # float32 GEMMs, different blocking
    for g_ours, g_ref in zip(
        torch.autograd.grad(ours, (x, w, b), dy),
        torch.autograd.grad(reference, (x, w, b), dy),
        strict=True,
    ):
        assert (g_ours - g_ref).abs().max() < 1e-4


def test_matmul_choice_can_be_forced_and_keeps_names(monkeypatch):
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    names = [n for n, _ in net.named_parameters()]
    monkeypatch.setenv("TINYFORMERS_TRAIN_MATMUL", "onednn")
    choices = use_fast_matmuls(net, rows=16)
    assert choices == {"8x8": "onednn", "8x4": "onednn"}
    assert all(type(m) is OneDNNLinear for m in net)
    assert [n for n, _ in net.named_parameters()] == names  # checkpoints see no difference
    # a resumed run takes the choices it started with, unmeasured
    net2 = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    monkeypatch.setenv("TINYFORMERS_TRAIN_MATMUL", "measure")
    use_fast_matmuls(net2, 16, {"8x8": "torch", "8x4": "onednn"})
    assert [type(m) for m in net2] == [torch.nn.Linear, OneDNNLinear]


def test_lora_starts_at_the_base_and_merges_into_it():
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("q_proj", torch.nn.Linear(12, 12))
    net.add_module("other", torch.nn.Linear(12, 6))
    x = torch.randn(3, 12)
    before = net(x)
    add_lora(net, r=4, alpha=8, targets=("q_proj",))
    assert isinstance(net.q_proj, LoRALinear) and not isinstance(net.other, LoRALinear)
    assert torch.equal(net(x), before)  # B = 0: the update starts at nothing
    assert [n for n, p in net.named_parameters() if p.requires_grad] == [
        "q_proj.lora_A",
        "q_proj.lora_B",
    ]
    with torch.no_grad():
        net.q_proj.lora_B.normal_()
    trained = net(x)
    merge_lora(net)
    assert type(net.q_proj) is torch.nn.Linear
    assert (net(x) - trained).abs().max() < 1e-5  # W + (alpha/r) B A gives the same outputs


def test_text_split_is_the_first_90_percent_and_batches_shift_by_one():
    from tinyformers.tokenizers.chars import CharTokenizer

    text = SHAKESPEARE.read_text()
    tok = CharTokenizer.from_text(text)
    data = load_dataset(SHAKESPEARE, text, tok, block_size=16)
    ids = tok.encode(text)
    n = int(len(ids) * 0.9)  # nanoGPT: train_data = data[:int(n*0.9)]
    assert data.train.ids.tolist() == ids[:n] and data.val.ids.tolist() == ids[n:]
    x, y = data.train.batch(5, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # each target is the next input


def test_record_windows_stop_at_their_record():
    split = Split(
        torch.arange(10),
        torch.tensor([True] * 10),
        starts=torch.tensor([0, 4]),
        ends=torch.tensor([4, 10]),
    )
    x, y = split.batch(8, 6, torch.Generator().manual_seed(1))
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        if row_x[0] == 0:  # the first record: tokens 0..3, so targets 1, 2, 3, then nothing
            assert row_y == [1, 2, 3, IGNORE, IGNORE, IGNORE]
        else:
            assert row_x == [4, 5, 6, 7, 8, 9] and row_y == [5, 6, 7, 8, 9, IGNORE]


def test_chat_is_scored_on_the_assistant_tokens_only():
    import tinyformers

    tok = tinyformers.load_tokenizer("smollm2")
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    ids, scored = encode_record(tok, {"messages": messages})
    from tinyformers.chat.template import encode_chat

    assert ids == encode_chat(tok, messages, add_generation_prompt=False)  # the whole chat
    spans, current = [], []
    for i, keep in zip(ids, scored, strict=True):
        if keep:
            current.append(i)
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    # what the assistant said, and the end of its turn: the rest is given, never learned
    assert spans == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]


@pytest.mark.parametrize("onednn", [False, True], ids=["torch", "onednn"])
def test_chunked_loss_and_its_gradients_equal_the_written_out_ones(monkeypatch, onednn):
    from tinyformers.training import chunked_loss

    monkeypatch.setattr(chunked_loss, "CHUNK_BYTES", 4 * 50 * 7)  # 7 rows a chunk: 4 chunks
    torch.manual_seed(0)
    head = torch.nn.Linear(24, 50, bias=False)
    hidden = torch.randn(2, 13, 24, requires_grad=True)
    targets = torch.randint(0, 50, (2, 13))
    targets[1, :5] = IGNORE
    reference = cross_entropy(head(hidden), targets)  # loss.py, with autograd's gradients
    ref_grads = torch.autograd.grad(reference, (hidden, head.weight))
    model = torch.nn.Module()
    model.lm_head = head
    deferred = chunked_loss.defer_head(model)
    deferred.onednn = onednn
    assert torch.equal(model.lm_head(hidden), hidden)  # the forward hands the states on
    ours = chunked_loss.linear_cross_entropy(hidden, deferred, targets)
    grads = torch.autograd.grad(ours * 3.0, (hidden, head.weight))  # a scaled loss too
    assert abs(ours.item() - reference.item()) < 1e-5  # float32, summed in another order
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g - 3.0 * r).abs().max() < 1e-5
