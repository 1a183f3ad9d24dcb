"""The bundled `shakespeare` model (tinyformers/data/shakespeare): a GPT-2 that our `train`
made, loadable by name offline, read by Hugging Face with our logits, and a model that did
learn its text."""

from __future__ import annotations

import json

import torch
from conftest import DATA

import tinyformers
from tinyformers.loading.hub import BUNDLED
from tinyformers.training.loss import cross_entropy

FOLDER = BUNDLED["shakespeare"]


def test_it_loads_by_name_with_its_record_beside_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tinyformers.load("shakespeare")
    assert model.source == FOLDER and type(model.net).__name__ == "GPT2"
    assert model.config.n_layer == 4 and model.tokenizer.vocab_size == 77
    records = [json.loads(line) for line in (FOLDER / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["iter"] == 5000 and records[-1]["val_loss"] < 1.65  # as TRAINING.md says
    assert "tinyformers train --data shakespeare.txt" in (FOLDER / "TRAINING.md").read_text()


def test_hf_reads_it_with_our_logits_and_it_knows_its_text():
    from transformers import AutoModelForCausalLM

    text = (DATA / "shakespeare" / "alls_well_that_ends_well.txt").read_text()[5000:5257]
    model = tinyformers.load("shakespeare")
    ids = torch.tensor([model.tokenizer.encode(text)])  # 257 characters: 256 in, 256 targets
    ours = model(ids[:, :-1])
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(FOLDER)(ids[:, :-1]).logits
    assert (ours - reference).abs().max() < 1e-4  # HF transformers, fp32
    # a text it trained on (All's Well is the first play): far below log(77) = 4.34
    assert cross_entropy(ours, ids[:, 1:]).item() < 1.8
