"""``rloo eval --judge``: every pair judged in both orders (judge.py, judge_run.py).

- the tally's arithmetic on hand-made answers, and a judge that always picks the first position: TRL's
  one-order protocol (reference first) would give the model 0, both orders give 1/2 and a position bias of 1;
- a reward-model judge trained to prefer the references over the tiny policy's own completions: the policy's
  win rate near 0, near 1 with the sides swapped; against itself all ties; --max_judgments caps the pairs;
- an endpoint judge against a loopback server that fails before it answers (retried) and a dead port (one line).
The endpoint judge against vLLM's own OpenAI-compatible server: tests/test_judge_vllm.py.
"""

from __future__ import annotations

import http.server
import json
import math
import subprocess
import sys
import threading

import pytest
from test_vllm import ENV

from rloo.judge import (
    TIE,
    EndpointJudge,
    JudgeError,
    check_template,
    judge_both_orders,
    read_answer,
    tally,
)
from rloo.judge_run import complete


def test_the_tally_counts_every_outcome_and_the_win_rate_with_its_standard_error():
    answers = [(0, 1), (1, 0), (0, 0), (1, 1), (TIE, TIE), (None, 0), (0, None)]
    r = tally(answers)
    assert (r["wins"], r["losses"], r["inconsistent"], r["ties"], r["unparseable"]) == (1, 1, 2, 1, 2)
    assert r["n"] == 5 and r["num_pairs"] == 7 and r["num_judgments"] == 14
    scores = [1, 0, 0.5, 0.5, 0.5]
    mean = sum(scores) / 5
    assert r["win_rate"] == pytest.approx(mean)
    assert r["win_rate_se"] == pytest.approx(math.sqrt(sum((s - mean) ** 2 for s in scores) / 4 / 5))
    assert r["position_bias_rate"] == pytest.approx(2 / 5)
    assert r["first_position_rate"] == pytest.approx(6 / 10)  # readable answers 0,1 1,0 0,0 1,1 0 0


def test_a_judge_that_always_picks_the_first_shown_is_a_coin_not_a_verdict():
    class FirstShown:
        def judge(self, prompts, firsts, seconds):
            return [0] * len(prompts)

    answers = judge_both_orders(FirstShown(), ["p"] * 10, ["ours"] * 10, ["reference"] * 10)
    one_order_win_rate = sum(theirs_first == 1 for _, theirs_first in answers) / 10  # TRL: the reference first
    r = tally(answers)
    assert one_order_win_rate == 0.0
    assert r["win_rate"] == 0.5 and r["inconsistent"] == 10 and r["position_bias_rate"] == 1.0
    assert r["first_position_rate"] == 1.0


def test_answers_are_read_not_guessed():
    assert [read_answer(a) for a in ("1", " 2.", "2\n", "12", "maybe", "", None, "0")] == [0, 1, 1, None, None, None, None, None]
    with pytest.raises(JudgeError, match=r"needs \{second\}"):
        check_template("{prompt} {first}", "--judge_template t.txt")


@pytest.fixture(scope="module")
def reference_lover(tiny_model_dir, tmp_path_factory):
    """A reward model trained to prefer each post's reference summary over the tiny policy's own greedy
    completion of it (train prompts only)."""
    from datasets import Dataset
    from test_reward_model import rm_config

    from rloo.data import BUNDLED_DATASETS
    from rloo.reward_stage import reward_model

    rows = [json.loads(line) for line in BUNDLED_DATASETS["rloo:tldr"]["train"].read_text().splitlines()[:160]]
    ours = complete(str(tiny_model_dir), [r["prompt"] for r in rows], 48)
    pairs = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["completion"], "rejected": c}
                               for r, c in zip(rows, ours)])
    out = tmp_path_factory.mktemp("judge-rm") / "rm"
    result = reward_model(rm_config(tiny_model_dir, out, max_steps=60, per_device_train_batch_size=8, max_length=1024,
                                    num_eval_samples=0, eval_on_start=False), train_dataset=pairs)
    return result.output_dir


def rloo_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rloo", "eval", *args], env=ENV, capture_output=True, text=True,
                          timeout=600)


def test_a_reward_model_judge_that_prefers_references_gives_near_0_and_near_1_reversed(reference_lover, tiny_model_dir,
                                                                                      tmp_path):
    out = rloo_eval("--model", str(tiny_model_dir), "--dataset", "rloo:tldr", "--num_samples", "40",
                    "--judge", f"reward-model:{reference_lover}", "--judge_output", str(tmp_path / "pairs.jsonl"))
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["num_pairs"] == 40 and r["n"] == 40 and r["unparseable"] == 0 and r["inconsistent"] == 0
    assert r["win_rate"] <= 0.1 and r["decoding"]["greedy"] and r["against"] == "references", r
    assert "win rate" in out.stderr and "position-bias rate" in out.stderr
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    from rloo.judge_run import build_judge

    judge = build_judge(f"reward-model:{reference_lover}", None, None, None, "OPENAI_API_KEY", 1, 0)
    reversed_ = tally(judge_both_orders(judge, [p["prompt"] for p in pairs], [p["against"] for p in pairs],
                                        [p["completion"] for p in pairs]))
    assert reversed_["win_rate"] >= 0.9 and reversed_["win_rate"] == pytest.approx(1 - r["win_rate"])

    itself = rloo_eval("--model", str(tiny_model_dir), "--dataset", "rloo:tldr", "--num_samples", "40",
                       "--max_judgments", "11", "--against", str(tiny_model_dir), "--judge", f"reward-model:{reference_lover}")
    assert itself.returncode == 0, itself.stderr[-2000:]
    r = json.loads(itself.stdout.splitlines()[-1])
    assert r["num_pairs"] == 5 and r["budget_limited"] and r["ties"] == 5 and r["win_rate"] == 0.5


class FlakyEndpoint(http.server.BaseHTTPRequestHandler):
    """Answers /chat/completions with a 503 first, then "2"; counts the requests."""

    calls = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls += 1
        if type(self).calls == 1:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        reply = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "length",
                                         "message": {"role": "assistant", "content": "2"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_an_endpoint_that_fails_is_retried_and_a_dead_one_is_one_line(tiny_model_dir):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judge = EndpointJudge(f"http://127.0.0.1:{server.server_address[1]}/v1", "m", parallel=1, retries=2)
        assert judge.judge(["post"], ["a"], ["b"]) == [1] and FlakyEndpoint.calls == 2
    finally:
        server.shutdown()
        server.server_close()  # the port refuses connections from here on
    dead = rloo_eval("--model", str(tiny_model_dir), "--dataset", "rloo:tldr", "--num_samples", "2",
                     "--judge_url", f"http://127.0.0.1:{server.server_address[1]}/v1", "--judge_model", "m",
                     "--judge_retries", "1")
    assert dead.returncode == 1
    last = dead.stderr.strip().splitlines()[-1]
    assert last.startswith("rloo eval: error: --judge_url http://127.0.0.1:") and "no answer after 1 retries" in last
    assert "Traceback" not in dead.stderr
