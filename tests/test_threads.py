"""Threads: one per physical core by default, OMP_NUM_THREADS honoured, threads= in load."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import tinyformers
from tinyformers import lm


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_hyperthreads_of_one_core_count_once(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    siblings = {0: "0,2", 2: "0,2", 1: "1,3", 3: "1,3"}  # 2 cores, 2 hyperthreads each
    real_read_text = Path.read_text

    def read_text(path: Path, *args, **kwargs) -> str:
        if path.name == "thread_siblings_list":
            return siblings[int(path.parent.parent.name.removeprefix("cpu"))] + "\n"
        return real_read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert lm.default_threads() == 2


def test_only_the_cpus_this_process_may_use_count(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1})
    assert lm.default_threads() == 1


def test_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert lm.default_threads() == 3


def test_load_sets_threads_and_info_reports_them(gpt2_small_dir, restore_threads):
    model = tinyformers.load(gpt2_small_dir, threads=1)
    assert torch.get_num_threads() == 1 and model.info()["threads"] == 1
    tinyformers.load(gpt2_small_dir)  # the default again
    assert torch.get_num_threads() == lm.default_threads()


@pytest.mark.parametrize("threads", [0, -2, 1.5, True])
def test_load_refuses_a_bad_thread_count(gpt2_small_dir, threads):
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        tinyformers.load(gpt2_small_dir, threads=threads)
