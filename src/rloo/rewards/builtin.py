"""Built-in summary rewards of the ``tldr-tiny`` preset.

These four cheap, rule-based scores stand in, on a CPU, for the human-preference reward model
(``cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr``) that the GPU preset uses: a tiny policy
cannot be judged by a 1B reward model in minutes, but it can learn to copy the reference summary's
words (``rouge_l``), stay on the post (``grounding``), stop repeating itself
(``no_repeated_bigrams``) and end at a summary's length (``summary_length``).

Each is a plain reward callable, ``fn(prompts, completions, **kwargs) -> list[float]`` (text, or
conversational messages), scoring
every completion in [0, 1]; they ignore keyword arguments they do not use. They run every training
step on 32-64 completions, so they stay light: a regex tokenizer, sets, and one cached ROUGE scorer.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from nltk.stem import porter
from rouge_score import rouge_scorer, tokenize, tokenizers

# Word counts (``_words``) of the 1,445 reference summaries in assets/tldr/tldr_train.jsonl:
# numpy.percentile(counts, [5, 95]) with its default linear interpolation gives 20.0 and 39.0
# (min 14, median 27, max 45). tests/test_rewards.py recomputes them from the file.
SUMMARY_LENGTH_LO = 20
SUMMARY_LENGTH_HI = 39

# Unicode letters and digits, no underscore: "Don't panic_now!" -> don, t, panic, now.
_WORD_RE = re.compile(r"[^\W_]+")


def as_text(value: str | list[dict]) -> str:
    """Text as it is; conversational messages (a prompt, or a completion ``[{"role": "assistant", ...}]``)
    as their contents, one per line."""
    return value if isinstance(value, str) else "\n".join(message["content"] for message in value)


def _words(text: str | list[dict]) -> list[str]:
    return _WORD_RE.findall(as_text(text).lower())


def _post(prompt: str | list[dict]) -> str:
    """The post of a TL;DR prompt: the text between "POST:" and the final "TL;DR:", when present."""
    prompt = as_text(prompt)
    start = prompt.find("POST:")
    start = 0 if start < 0 else start + len("POST:")
    end = prompt.rfind("TL;DR:")
    return prompt[start:end] if end >= start else prompt[start:]


class _StemCachingTokenizer(tokenizers.Tokenizer):
    """rouge_score's default tokenizer with ``use_stemmer=True``, its Porter stems memoized.

    Same tokens as ``RougeScorer(["rougeL"], use_stemmer=True)`` (a test checks), ~2.5x faster:
    stemming dominates the cost, and summaries reuse a small vocabulary.
    """

    def __init__(self) -> None:
        self.stem = functools.lru_cache(maxsize=1 << 16)(porter.PorterStemmer().stem)

    def tokenize(self, text: str) -> list[str]:
        return tokenize.tokenize(text, self)  # calls self.stem on words longer than 3 characters


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_StemCachingTokenizer())


def rouge_l(
    prompts: list[str], completions: list[str], completion: list[str] | None = None, **kwargs: Any
) -> list[float]:
    """ROUGE-L F1 of each completion against the row's reference summary (column ``completion``).

    Uses Google's ``rouge_score`` with the Porter stemmer, as summarization papers report it.

    >>> rouge_l(["p", "p"], [" the cat sat", " a dog ran"], completion=[" The cat sat.", " the cat sat"])
    [1.0, 0.0]
    """
    if completion is None:
        raise ValueError(
            "reward function 'rouge_l' needs the reference summaries: the dataset has no 'completion' column"
        )
    scorer = _rouge_scorer()
    return [float(scorer.score(as_text(ref), as_text(text))["rougeL"].fmeasure) for ref, text in zip(completion, completions)]


def grounding(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """Share of the completion's words that occur in the post; an empty completion scores 0.0.

    The post is the prompt's text between "POST:" and the final "TL;DR:" (the whole prompt when
    those markers are missing), so words copied from the title or subreddit line do not count.

    >>> prompt = "SUBREDDIT: r/cats\\n\\nTITLE: Help\\n\\nPOST: My cat hates the new sofa.\\n\\nTL;DR:"
    >>> grounding([prompt] * 3, [" cat hates sofa", " my dog loves sofa", ""])
    [1.0, 0.5, 0.0]
    """
    post_words: dict[str, set[str]] = {}  # the k completions of a prompt share its post
    scores = []
    for prompt, text in zip(prompts, completions):
        key = as_text(prompt)
        if key not in post_words:
            post_words[key] = set(_words(_post(key)))
        words = _words(text)
        vocabulary = post_words[key]
        scores.append(sum(w in vocabulary for w in words) / len(words) if words else 0.0)
    return scores


def no_repeated_bigrams(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """1 - (word bigrams repeating an earlier bigram of the completion) / (number of bigrams).

    Small policies under RL fall into loops ("i love her i love her ..."); this makes loops cost.
    Fewer than two words score 1.0.

    >>> no_repeated_bigrams(["p"] * 3, [" i love her i love her", " short and sweet", " hi"])
    [0.6, 1.0, 1.0]
    """
    scores = []
    for text in completions:
        words = _words(text)
        bigrams = list(zip(words, words[1:]))
        scores.append(1.0 - (len(bigrams) - len(set(bigrams))) / len(bigrams) if bigrams else 1.0)
    return scores


def summary_length(
    prompts: list[str], completions: list[str], truncated: list[bool] | None = None, **kwargs: Any
) -> list[float]:
    """1.0 for a completion that ended with EOS and has a reference summary's word count.

    With LO, HI = ``SUMMARY_LENGTH_LO``, ``SUMMARY_LENGTH_HI`` (20, 39 words): ``words / LO`` below
    LO, 1.0 in [LO, HI], then a linear decay to 0.0 at ``2 * HI``. A completion cut at the token
    limit without EOS (``truncated``) scores 0.0, whatever its length.

    >>> summary_length(["p"] * 4, [" w" * 10, " w" * 30, " w" * 58, " w" * 30], truncated=[False] * 3 + [True])
    [0.5, 1.0, 0.5128205128205128, 0.0]
    """
    if truncated is None:
        truncated = [False] * len(completions)
    scores = []
    for text, cut in zip(completions, truncated):
        num_words = len(_words(text))
        if cut:
            scores.append(0.0)
        elif num_words < SUMMARY_LENGTH_LO:
            scores.append(num_words / SUMMARY_LENGTH_LO)
        elif num_words <= SUMMARY_LENGTH_HI:
            scores.append(1.0)
        else:
            scores.append(max(0.0, 2.0 - num_words / SUMMARY_LENGTH_HI))
    return scores
