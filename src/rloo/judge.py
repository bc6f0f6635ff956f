"""Pairwise judging for ``rloo eval --judge``: a model's completions against references (or a second model's),
every pair shown in both orders, so that a judge's taste for one position cancels instead of entering the
win rate (TRL's judge script always shows the reference first).

A judge answers ``judge(prompts, firsts, seconds) -> list[int | None]``: 0 when the first shown is better,
1 when the second is, ``TIE`` when it cannot tell them apart (a reward model giving equal scores), ``None``
when its answer could not be read (counted, never guessed). ``tally`` turns the two answers of each pair
into a win, a loss, a tie, an order-inconsistent pair or an unreadable one.
"""

from __future__ import annotations

import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor

from rloo.errors import RlooError

TIE = 2

# Our own TL;DR judging prompt: which of two summaries of the post is better, answered with one token.
DEFAULT_TEMPLATE = """You compare two summaries of the same Reddit post.

POST:
{prompt}

Summary 1:
{first}

Summary 2:
{second}

Which summary states the post's main points more accurately and concisely, without adding anything the post does not say? Answer with one character: 1 or 2."""


class JudgeError(RlooError):
    """A judge that cannot judge: a dead endpoint, a refused request, a template without its fields."""


def check_template(template: str, origin: str) -> str:
    missing = [field for field in ("{prompt}", "{first}", "{second}") if field not in template]
    if missing:
        raise JudgeError(f"{origin}: the judging template needs {', '.join(missing)} (it is filled with the prompt "
                         "and the two completions)")
    return template


def read_answer(text: str | None) -> int | None:
    """'1' -> 0 (the first shown), '2' -> 1; anything else None. The answer's first character decides, as a
    one-token answer has only that; spaces and a closing period are allowed."""
    match = re.fullmatch(r"\s*([12])\s*\.?\s*", text or "")
    return None if match is None else int(match.group(1)) - 1


class EndpointJudge:
    """An OpenAI-compatible chat endpoint (the OpenAI API, ``vllm serve``, ...): one user message (the
    template filled), ``max_tokens`` 1, temperature 0; requests in parallel, each retried with backoff by the
    openai client (connection errors, 408, 409, 429, 5xx). The key: the environment variable ``api_key_env``
    names (a keyless local server takes any). Each raw answer is kept in ``answers``."""

    def __init__(self, url: str, model: str, template: str = DEFAULT_TEMPLATE, api_key_env: str = "OPENAI_API_KEY",
                 parallel: int = 8, retries: int = 3, timeout: float = 60.0):
        try:
            import openai
        except ImportError:
            raise JudgeError("--judge_url needs the openai client: pip install 'rloo[judge]'") from None
        self.url, self.model, self.template, self.parallel = url, model, check_template(template, "judge"), parallel
        self.api_key_env, self.openai, self.answers = api_key_env, openai, []
        self.client = openai.OpenAI(base_url=url, api_key=os.environ.get(api_key_env) or "EMPTY",
                                    max_retries=retries, timeout=timeout)
        self.retries = retries
        for name in ("httpx", "httpx2"):  # the openai client's transport: a line per request otherwise
            logging.getLogger(name).setLevel(logging.WARNING)

    def _ask(self, item: tuple[str, str, str]) -> str | None:
        prompt, first, second = item
        content = self.template.format(prompt=prompt, first=first, second=second)
        try:
            reply = self.client.chat.completions.create(model=self.model, max_tokens=1, temperature=0.0,
                                                        messages=[{"role": "user", "content": content}])
        except self.openai.APIConnectionError as error:
            raise JudgeError(f"--judge_url {self.url}: no answer after {self.retries} retries ({error.__cause__ or error})") from None
        except self.openai.AuthenticationError:
            raise JudgeError(f"--judge_url {self.url}: the key was refused (set it in ${self.api_key_env})") from None
        except self.openai.APIStatusError as error:
            raise JudgeError(f"--judge_url {self.url}: HTTP {error.status_code} for --judge_model {self.model}: "
                             f"{str(error.message)[:200]}") from None
        return reply.choices[0].message.content if reply.choices else None

    def judge(self, prompts: list[str], firsts: list[str], seconds: list[str]) -> list[int | None]:
        pool = ThreadPoolExecutor(self.parallel)
        try:
            answers = list(pool.map(self._ask, zip(prompts, firsts, seconds)))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a failure cancels what has not been sent
        self.answers += answers
        return [read_answer(answer) for answer in answers]


class RewardModelJudge:
    """A reward model as judge: the higher score wins, equal scores tie. Scores do not depend on the order
    shown, so both orders agree by construction (no inconsistent pairs); every text is scored once."""

    def __init__(self, reward_model):
        self.reward_model, self.scores = reward_model, {}

    def _score(self, prompts: list[str], completions: list[str]) -> list[float]:
        todo = [(p, c) for p, c in dict.fromkeys(zip(prompts, completions)) if (p, c) not in self.scores]
        if todo:
            values = self.reward_model([p for p, _ in todo], [c for _, c in todo])
            self.scores.update(zip(todo, values))
        return [self.scores[(p, c)] for p, c in zip(prompts, completions)]

    def judge(self, prompts: list[str], firsts: list[str], seconds: list[str]) -> list[int | None]:
        a, b = self._score(prompts, firsts), self._score(prompts, seconds)
        return [None if not (math.isfinite(x) and math.isfinite(y)) else TIE if x == y else int(y > x)
                for x, y in zip(a, b)]


def judge_both_orders(judge, prompts: list[str], ours: list[str], theirs: list[str]) -> list[tuple]:
    """Each pair's two answers: (ours shown first, theirs shown first), in one call per order."""
    shown_first = judge.judge(prompts, ours, theirs)
    shown_second = judge.judge(prompts, theirs, ours)
    return list(zip(shown_first, shown_second))


def outcome(ours_first: int | None, theirs_first: int | None) -> str:
    """The pair's verdict from its two answers (0/1: the position preferred, TIE, None: unreadable)."""
    if ours_first is None or theirs_first is None:
        return "unparseable"
    if ours_first == TIE or theirs_first == TIE:
        return "tie" if ours_first == theirs_first else "inconsistent"
    ours_won = (ours_first == 0, theirs_first == 1)
    return "win" if all(ours_won) else "loss" if not any(ours_won) else "inconsistent"


def tally(answers: list[tuple]) -> dict:
    """Counts, the win rate over the readable pairs (win 1, loss 0, tie and inconsistent 1/2) with its
    standard error, the position-bias rate (readable pairs whose verdict followed the position) and the share
    of readable answers that chose the first position shown."""
    outcomes = [outcome(*pair) for pair in answers]
    counts = {name: outcomes.count(name) for name in ("win", "loss", "tie", "inconsistent", "unparseable")}
    value = {"win": 1.0, "loss": 0.0, "tie": 0.5, "inconsistent": 0.5}
    scored = [value[o] for o in outcomes if o in value]
    n = len(scored)
    mean = sum(scored) / n if n else math.nan
    se = math.sqrt(sum((s - mean) ** 2 for s in scored) / (n - 1) / n) if n > 1 else math.nan
    positions = [a for pair in answers for a in pair if a in (0, 1)]
    return {
        "num_pairs": len(answers), "num_judgments": 2 * len(answers), "n": n,
        "wins": counts["win"], "losses": counts["loss"], "ties": counts["tie"],
        "inconsistent": counts["inconsistent"], "unparseable": counts["unparseable"],
        "win_rate": mean, "win_rate_se": se,
        "position_bias_rate": counts["inconsistent"] / n if n else math.nan,
        "first_position_rate": positions.count(0) / len(positions) if positions else math.nan,
    }


def table(result: dict) -> str:
    """The tally as a few aligned lines, for people."""
    rows = [("win rate", f"{result['win_rate']:.3f} ± {result['win_rate_se']:.3f} (n={result['n']})"),
            ("wins / losses / ties", f"{result['wins']} / {result['losses']} / {result['ties']}"),
            ("order-inconsistent", str(result["inconsistent"])), ("unparseable", str(result["unparseable"])),
            ("position-bias rate", f"{result['position_bias_rate']:.3f}"),
            ("first position chosen", f"{result['first_position_rate']:.3f}"),
            ("pairs / judgments", f"{result['num_pairs']} / {result['num_judgments']}")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


JUDGE_OPTIONS = ("judge", "judge_url", "judge_model", "judge_api_key_env", "judge_template", "judge_parallel",
                 "judge_retries", "max_judgments", "against", "judge_output")


def add_judge_options(parser) -> None:
    """``rloo eval``'s judging options (the policy's decoding: ``--temperature``, 0 = greedy by default here,
    and ``--max_completion_length``)."""
    group = parser.add_argument_group("judging (a win rate instead of a reward)")
    group.add_argument("--judge", default=None, metavar="reward-model:PATH",
                       help="A reward model as judge: the higher score wins.")
    group.add_argument("--judge_url", default=None, help="An OpenAI-compatible endpoint as judge, e.g. "
                       "https://api.openai.com/v1 or http://127.0.0.1:8000/v1 (vllm serve).")
    group.add_argument("--judge_model", default=None, help="The model the endpoint serves, e.g. gpt-4o-mini.")
    group.add_argument("--judge_api_key_env", default="OPENAI_API_KEY", help="The environment variable holding "
                       "the endpoint's key (default: OPENAI_API_KEY; a keyless local server takes any).")
    group.add_argument("--judge_template", default=None, help="A text file with {prompt}, {first} and {second}, "
                       "asking for 1 or 2 (default: rloo's TL;DR judging prompt).")
    group.add_argument("--judge_parallel", type=int, default=8, help="Requests in flight at once (default: 8).")
    group.add_argument("--judge_retries", type=int, default=3, help="Retries of a failed request, with backoff (default: 3).")
    group.add_argument("--max_judgments", type=int, default=None, help="At most this many judgments (two per pair).")
    group.add_argument("--against", default=None, metavar="DIR", help="A second model to judge against "
                       "(default: the dataset's reference completions).")
    group.add_argument("--judge_output", default=None, help="A new JSONL file of every pair and both answers.")
