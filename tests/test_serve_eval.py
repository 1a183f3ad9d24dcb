"""Completions for evaluation: `echo` with `logprobs` gives the prompt's own log-probabilities
(the model's log-softmax), `max_tokens: 0` scores a prompt alone, a generated EOS keeps its
entry, and lm-evaluation-harness's `local-completions` against our server (a real subprocess)
scores a multiple-choice task as lm-eval's `hf` model does on the same checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from conftest import DATA
from test_serve import free_port, running_server, wait_ready

import tinyformers
from tinyformers.loading.hub import BUNDLED


@pytest.fixture(scope="module")
def model(gpt2_small_dir):
    return tinyformers.load(gpt2_small_dir)


@pytest.fixture(scope="module")
def client(gpt2_small_dir):
    served = tinyformers.load(gpt2_small_dir)
    with running_server(lambda: served, max_batch=4, context=128) as (url, _):
        wait_ready(url)
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)


def test_echo_logprobs_are_the_models_log_softmax(client, model):
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    answer = client.completions.create(
        model="x", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=3
    )
    choice, lp = answer.choices[0], answer.choices[0].logprobs
    expected = model(torch.tensor([ids]))[0].log_softmax(-1)  # (T, V), no cache
    assert len(lp.tokens) == len(lp.token_logprobs) == len(ids) + 1  # the prompt, one new token
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before it
    for i in range(1, len(ids)):  # position i - 1 predicts token i
        best = expected[i - 1].max().item()
        assert lp.token_logprobs[i] == pytest.approx(expected[i - 1, ids[i]].item(), abs=1e-4)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(best, abs=1e-4)
        assert len(lp.top_logprobs[i]) <= 3
    assert lp.token_logprobs[-1] == pytest.approx(expected[-1].max().item(), abs=1e-4)  # greedy
    prompt_text = model.tokenizer.decode(ids)
    assert choice.text == prompt_text + model.tokenizer.decode([int(expected[-1].argmax())])
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [len(model.tokenizer.decode(ids[:i])) for i in range(len(ids) + 1)]
    assert answer.usage.prompt_tokens_details.cached_tokens == 0  # scoring reads no cache


def test_max_tokens_0_with_echo_scores_the_prompt_alone(client, model):
    prompt = "Score this sentence, please"
    ids = model.tokenizer.encode(prompt)
    answer = client.completions.create(
        model="x", prompt=[prompt, prompt], max_tokens=0, echo=True, logprobs=0
    )
    expected = model(torch.tensor([ids]))[0].log_softmax(-1)
    for choice in answer.choices:
        assert choice.text == prompt and choice.finish_reason == "length"
        scores = choice.logprobs.token_logprobs
        assert len(scores) == len(ids) and scores[0] is None
        want = [expected[i - 1, ids[i]].item() for i in range(1, len(ids))]
        assert scores[1:] == pytest.approx(want, abs=1e-4)
        assert choice.logprobs.top_logprobs[1:] == [{}] * (len(ids) - 1)  # logprobs 0: none
    assert answer.usage.completion_tokens == 0


def test_echo_without_logprobs_sends_the_prompt_first_and_uses_the_cache(client, model):
    prompt = "A prompt long enough to fill a whole block of the prompt cache, and then more"
    scored = client.completions.create(
        model="x", prompt=prompt, max_tokens=0, echo=True, logprobs=1
    )  # fills the cache with its blocks (but never reads it)
    assert scored.usage.prompt_tokens_details.cached_tokens == 0
    stream = client.completions.create(
        model="x",
        prompt=prompt,
        max_tokens=4,
        temperature=0,
        echo=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].text == prompt
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == prompt + model.generate(prompt, 4, temperature=0)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 16


def test_a_generated_eos_keeps_its_logprob_entry(gpt2_small_dir):
    served = tinyformers.load(gpt2_small_dir)
    ids = served.tokenizer.encode("Hello there")
    first = int(served(torch.tensor([ids]))[0, -1].argmax())
    served.eos_ids = {first}  # the greedy first token now ends the answer
    with running_server(lambda: served, context=64) as (url, _):
        wait_ready(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        answer = client.completions.create(
            model="x", prompt=ids, max_tokens=5, temperature=0, echo=True, logprobs=1
        )
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and answer.usage.completion_tokens == 1
    # lm-eval reads token_logprobs[ctxlen:-1]: without this entry it would cut a prompt token
    assert len(choice.logprobs.tokens) == len(ids) + 1
    assert choice.logprobs.tokens[-1] == served.tokenizer.id_to_text(first)
    assert choice.text == served.tokenizer.decode(ids)  # an EOS adds no text


# -- lm-evaluation-harness against the server ------------------------------------------------

SHAKESPEARE = BUNDLED["shakespeare"]  # a GPT-2 HF folder: HF loads it, lm-eval's hf model too


def write_task(folder) -> None:
    """Ten questions from All's Well (the shakespeare model's first play): 100 characters, then
    which 20 characters come next, the true ones or those after another question's context."""
    text = (DATA / "shakespeare" / "alls_well_that_ends_well.txt").read_text()
    starts = [3000 + 4000 * i for i in range(10)]
    with open(folder / "questions.jsonl", "w") as f:
        for i, start in enumerate(starts):
            endings = [text[s + 100 : s + 120] for s in (starts[i:] + starts[:i])[:4]]
            answer = i % 4  # the true ending (endings[0]) moved to a different place each time
            endings[0], endings[answer] = endings[answer], endings[0]
            doc = {"context": text[start : start + 100], "endings": endings, "answer": answer}
            f.write(json.dumps(doc) + "\n")
    (folder / "next_line.yaml").write_text(
        "task: shakespeare_next_line\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {folder / 'questions.jsonl'}}}}}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{endings}}"\n'
        'doc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\n'
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n"
    )


@pytest.fixture
def server_process():
    """`tinyformers serve` on the shakespeare folder, in its own process, on a free port."""
    port = free_port()
    command = [sys.executable, "-m", "tinyformers", "serve", "--model", str(SHAKESPEARE)]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen(command + ["--port", str(port)], **quiet)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(30)


def test_lm_eval_local_completions_scores_as_hf_and_our_model(
    server_process, tmp_path, monkeypatch
):
    """Each choice's loglikelihood through our server equals our model's log-softmax summed over
    the choice's tokens (1e-4), and lm-eval's hf model on the same folder agrees on every
    loglikelihood and on the accuracy."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # the task is a local file
        monkeypatch.setenv(name, "1")
    import datasets
    import huggingface_hub
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # if imported before the env
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    write_task(tmp_path)
    tasks = TaskManager(include_path=str(tmp_path))

    def evaluate(kind: str, **model_args) -> tuple[float, list[list[tuple[float, bool]]]]:
        run = lm_eval.simple_evaluate(
            model=kind, model_args=model_args, tasks=["shakespeare_next_line"],
            task_manager=tasks, log_samples=True,
        )  # fmt: skip
        samples = run["samples"]["shakespeare_next_line"]
        scores = [[tuple(r[0]) for r in s["resps"]] for s in samples]
        return run["results"]["shakespeare_next_line"]["acc,none"], scores, samples

    ours_acc, ours, samples = evaluate(
        "local-completions",
        model="shakespeare",
        base_url=f"{server_process}/v1/completions",
        tokenizer_backend="huggingface",  # not probed from /tokenize: the same tokens either way
        tokenizer=str(SHAKESPEARE),
        batch_size=4,  # four prompts a request, as [[ids], [ids], ...]
        max_length=256,
    )
    # the model has no BOS or EOS: lm-eval's hf model wants a token for an empty context
    hf_acc, hf, _ = evaluate(
        "hf", pretrained=str(SHAKESPEARE), dtype="float32", device="cpu", prefix_token_id=0
    )
    assert ours_acc == hf_acc >= 0.5  # it knows its play: 4 choices, chance is 0.25
    for mine, theirs in zip(ours, hf, strict=True):
        assert [g for _, g in mine] == [g for _, g in theirs]  # is_greedy
        assert [s for s, _ in mine] == pytest.approx([s for s, _ in theirs], abs=1e-4)
    model = tinyformers.load(SHAKESPEARE)
    for sample, scores in zip(samples, ours, strict=True):
        for (context, ending), (score, _) in zip(sample["arguments"], scores, strict=True):
            # lm-eval moves a context's trailing spaces to the continuation, then splits the ids
            cut = len(context.rstrip())
            n = len(model.tokenizer.encode(context[:cut]))
            ids = model.tokenizer.encode(context + ending)
            logp = model(torch.tensor([ids]))[0].log_softmax(-1)  # (T, V)
            expected = sum(logp[i - 1, ids[i]].item() for i in range(n, len(ids)))
            assert score == pytest.approx(expected, abs=1e-4)
