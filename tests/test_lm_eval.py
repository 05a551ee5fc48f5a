"""lm-evaluation-harness scores the shipped model through the server (`local-completions`) as its `hf`
backend scores the same folder with transformers: multiple choice, rolling loglikelihood and
generate_until, on local task files (nothing downloaded), with batches of 4 prompts a request.

Settings that make the two backends score the same tokens: lm-eval's API models cut rolling windows
2 tokens shorter than `hf` does for the same max_length (one for "generation", one for context), so
the server run gets max_length + 2; `hf` adds BOS as the tokenizer declares it, so the
huggingface-tokenizer runs pass the same add_bos_token, and the remote-tokenizer run (lm-eval's default
when /tokenizer_info answers, BOS never added) is compared with `hf` at add_bos_token=False.
"""

from __future__ import annotations

import json
import logging
import os

import pytest

from conftest import EVAL_TEXT, SHIPPED_MODEL
from test_server import MODEL, running_server

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")    # local task files: the datasets library must not look online
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

MAX_LENGTH = 256
MULTIPLE_CHOICE = [
    {"question": "x = [1, 2, 3]\nprint(len(x))  # prints", "choices": ["3", "2", "1", "[1, 2, 3]"], "answer": 0},
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None", " print(a)"], "answer": 0},
    {"question": "import numpy as", "choices": [" np", " pd", " plt", " os"], "answer": 0},
    {"question": "for i in range(10):\n   ", "choices": [" print(i)", " return", " import", " class"], "answer": 0},
    {"question": "class Graph:\n    def __init__(self", "choices": ["):", ", nodes):", " self", "]:"], "answer": 1},
    {"question": "if __name__ ==", "choices": [" \"__main__\":", " 'main':", " True:", " 0:"], "answer": 0},
]
GENERATE = [{"prompt": "def fibonacci(n):\n", "target": "    if n < 2:"},
            {"prompt": "import numpy as np\nimport", "target": " pandas as pd"},
            {"prompt": "class Stack:\n    def __init__(self):\n", "target": "        self.items = []"}]
TASKS = {
    "moe_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
               "doc_to_target": "answer", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
    "moe_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                    "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]},
    "moe_generate": {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
                     "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 24, "do_sample": False},
                     "metric_list": [{"metric": "exact_match"}]},
}


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    """The three tasks as lm-eval YAML (JSON is YAML) over JSONL files: held-out code for the rolling task,
    3000 characters a document, so each is several windows of MAX_LENGTH tokens."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    text = EVAL_TEXT.read_text()
    docs = {"moe_mc": MULTIPLE_CHOICE, "moe_rolling": [{"text": text[i * 3000:(i + 1) * 3000]} for i in range(3)],
            "moe_generate": GENERATE}
    for task, config in TASKS.items():
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs[task]))
        spec = {"task": task, "dataset_path": "json", "test_split": "test",
                "dataset_kwargs": {"data_files": {"test": str(folder / f"{task}.jsonl")}}, **config}
        (folder / f"{task}.yaml").write_text(json.dumps(spec))
    return folder


@pytest.fixture(scope="module")
def server():
    with running_server() as s:
        yield s


def evaluate(task_folder, model: str, model_args: str, batch_size: int = 1) -> dict:
    """{task: (metrics, per-document responses)}."""
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), batch_size=batch_size,
                                  task_manager=TaskManager(include_path=str(task_folder)), log_samples=True)
    return {task: ({k: v for k, v in out["results"][task].items() if "," in k and "stderr" not in k},
                   [sample["resps"] for sample in out["samples"][task]]) for task in TASKS}


@pytest.fixture(scope="module")
def hf_scores(task_folder):
    args = f"pretrained={SHIPPED_MODEL},dtype=float32,device=cpu,max_length={MAX_LENGTH}"
    return {bos: evaluate(task_folder, "hf", f"{args},add_bos_token={bos}") for bos in (True, False)}


def assert_same_scores(ours: dict, theirs: dict, tasks=tuple(TASKS)):
    for task in tasks:
        (our_metrics, our_responses), (their_metrics, their_responses) = ours[task], theirs[task]
        assert our_metrics == pytest.approx(their_metrics, rel=1e-5), task
        if task == "moe_mc":     # [[(loglikelihood, is_greedy)] per choice] per document
            for ours_doc, theirs_doc in zip(our_responses, their_responses):
                assert [r[0][0] for r in ours_doc] == pytest.approx([r[0][0] for r in theirs_doc], abs=1e-4)
                assert [r[0][1] for r in ours_doc] == [r[0][1] for r in theirs_doc]
        elif task == "moe_rolling":   # one loglikelihood per document, a sum over ~1200 tokens: 1e-4 a token
            ours_sums, theirs_sums = ([r[0][0] for r in responses] for responses in (our_responses, their_responses))
            assert ours_sums == pytest.approx(theirs_sums, abs=1e-4 * 1200)
        else:
            assert our_responses == their_responses


def server_args(server, extra: str) -> str:
    return f"base_url={server.url}/v1/completions,model={MODEL},max_length={MAX_LENGTH + 2},{extra}"


def test_tokenized_requests_score_as_the_hf_backend(server, task_folder, hf_scores):
    """lm-eval's default mode: token-id prompts, four a request."""
    args = server_args(server, f"tokenizer_backend=huggingface,tokenizer={SHIPPED_MODEL},add_bos_token=True")
    assert_same_scores(evaluate(task_folder, "local-completions", args, batch_size=4), hf_scores[True])


@pytest.mark.slow      # lm-eval's other request modes: the default run has the tokenized one above
def test_the_remote_tokenizer_found_through_tokenizer_info_scores_as_the_hf_backend(server, task_folder, hf_scores):
    """Without `tokenizer=`, lm-eval finds /tokenizer_info and /tokenize and tokenizes through the server."""
    assert_same_scores(evaluate(task_folder, "local-completions", server_args(server, "num_concurrent=2"), batch_size=4),
                       hf_scores[False])


@pytest.mark.slow
@pytest.mark.parametrize("bos", [True, False])
def test_text_requests_score_as_the_hf_backend(server, task_folder, hf_scores, bos):
    """tokenized_requests=False: lm-eval decodes its tokens and sends text (BOS written as text where it counted
    one), which the server tokenizes again; scored text gets no BOS of the server's, so rolling windows cut from
    the middle of a document score as `hf` scores them. Generation adds BOS (as vLLM does), as `hf` does only
    with add_bos_token=True."""
    args = server_args(server, f"tokenizer_backend=huggingface,tokenizer={SHIPPED_MODEL},add_bos_token={bos},"
                               "tokenized_requests=False")
    tasks = TASKS if bos else ("moe_mc", "moe_rolling")
    assert_same_scores(evaluate(task_folder, "local-completions", args, batch_size=4), hf_scores[bos], tasks)
