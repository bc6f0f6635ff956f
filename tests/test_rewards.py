"""Reward sources: built-in values by hand, spec loading, score validation, the reward model."""

import json
import math
import os
from importlib.resources import files

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from rloo.hub import HubUnreachableError
from rloo.rewards import (
    BUILTIN_REWARDS,
    RewardFunctionError,
    RewardModel,
    RewardSources,
    build_rewards,
    load_reward_fn,
    score_completions,
)
from rloo.rewards import builtin
from rloo.rewards.builtin import grounding, no_repeated_bigrams, rouge_l, summary_length

PROMPT = "SUBREDDIT: r/cats\n\nTITLE: Sofa war\n\nPOST: My cat scratches the new leather sofa every night.\n\nTL;DR:"


# ---------------------------------------------------------------- built-in rewards, by hand


def _bundled_rows():
    path = files("rloo") / "assets" / "tldr" / "tldr_train.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_rouge_l_identical_disjoint_and_partial():
    refs = [" my cat scratches the sofa", " my cat scratches the sofa", " a b c d"]
    scores = rouge_l([PROMPT] * 3, [" My cat scratches the sofa!", " dogs bark loudly", " a b x y"], completion=refs)
    assert scores[0] == 1.0 and scores[1] == 0.0
    assert scores[2] == pytest.approx(0.5)  # LCS 2 of 4 and 4 words: P = R = F1 = 1/2


def test_rouge_l_matches_rouge_score_with_stemmer():
    from rouge_score.rouge_scorer import RougeScorer

    rows = _bundled_rows()[:300]
    refs, completions = [r["completion"] for r in rows], [r["completion"] for r in rows[1:] + rows[:1]]
    completions[0] = refs[0]
    plain = RougeScorer(["rougeL"], use_stemmer=True)
    expected = [plain.score(ref, text)["rougeL"].fmeasure for ref, text in zip(refs, completions)]
    assert rouge_l([""] * len(refs), completions, completion=refs) == expected


def test_rouge_l_without_references_names_the_column():
    with pytest.raises(ValueError, match="'rouge_l'.*'completion' column"):
        rouge_l([PROMPT], [" x"])


def test_grounding_counts_post_words_only():
    completions = [
        " cat scratches sofa",  # all in the post
        " cat loves war",  # "war" is only in the title, "loves" nowhere: 1/3
        " dogs bark",  # nothing from the post
        "",
        " ... !",  # no words at all
    ]
    assert grounding([PROMPT] * 5, completions) == pytest.approx([1.0, 1 / 3, 0.0, 0.0, 0.0])
    # Without the markers, the whole prompt is the post.
    assert grounding(["war and peace"], [" war peace novel"]) == pytest.approx([2 / 3])


def test_no_repeated_bigrams():
    completions = [" a b a b a b", " a b c", " a", "", " the the the"]
    # " a b a b a b": 5 bigrams, unique (a b), (b a): 3 repeats -> 1 - 3/5; " the the the": 1 - 1/2
    assert no_repeated_bigrams(["p"] * 5, completions) == pytest.approx([0.4, 1.0, 1.0, 1.0, 0.5])


def test_summary_length_edges_and_truncation():
    lo, hi = builtin.SUMMARY_LENGTH_LO, builtin.SUMMARY_LENGTH_HI
    counts = [0, lo - 1, lo, hi, hi + 1, 2 * hi, 3 * hi]
    completions = [" word" * n for n in counts]
    expected = [0.0, (lo - 1) / lo, 1.0, 1.0, 1 - 1 / hi, 0.0, 0.0]
    assert summary_length(["p"] * len(counts), completions) == pytest.approx(expected)
    assert summary_length(["p"] * 2, [" word" * lo] * 2, truncated=[True, False]) == [0.0, 1.0]


def test_summary_length_constants_match_the_bundled_references():
    counts = [len(builtin._words(row["completion"])) for row in _bundled_rows()]
    lo, hi = np.percentile(counts, [5, 95])
    assert (lo, hi) == (builtin.SUMMARY_LENGTH_LO, builtin.SUMMARY_LENGTH_HI)


@pytest.mark.parametrize("name", sorted(BUILTIN_REWARDS))
def test_builtins_in_unit_range_and_ignore_unknown_kwargs(name):
    completions = [" my cat scratches the sofa", " word" * 90, "", " cat cat cat cat"]
    scores = BUILTIN_REWARDS[name](
        [PROMPT] * 4, completions, completion=[" my cat scratches"] * 4,
        completion_ids=[[1, 2]] * 4, truncated=[False, True, False, False], some_column=[0] * 4,
    )
    assert len(scores) == 4 and all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)


# ---------------------------------------------------------------- load_reward_fn


def test_load_builtin_dotted_and_file(tmp_path):
    assert load_reward_fn("grounding") is grounding
    assert load_reward_fn("rloo.rewards.builtin:no_repeated_bigrams") is no_repeated_bigrams
    path = tmp_path / "my_rewards.py"
    path.write_text("def shout(prompts, completions, **kwargs):\n    return [float('!' in c) for c in completions]\n")
    fn = load_reward_fn(f"{path}:shout")
    assert fn(["p", "p"], ["hi!", "hi"]) == [1.0, 0.0]
    assert load_reward_fn(f"{path}:shout") is fn  # loaded once


@pytest.mark.parametrize(
    "make_spec, message",
    [
        (lambda d: "foo", "reward function 'foo': expected a built-in name .* 'package.module:function'"),
        (lambda d: "rloo.rewards.builtin:", "expected a built-in name"),
        (lambda d: f"{d}/bad.py:bar", r"reward function '.*bad.py:bar': file has no function 'bar'"),
        (lambda d: f"{d}/missing.py:bar", r"file '.*missing.py' not found"),
        (lambda d: f"{d}/broken.py:bar", r"running '.*broken.py' failed: ZeroDivisionError"),
        (lambda d: f"{d}/bad.py:NOT_FN", "'NOT_FN' is a int, not a function"),
        (lambda d: "no_such_pkg.mod:fn", "reward function 'no_such_pkg.mod:fn': no module named 'no_such_pkg.mod'"),
        (lambda d: "rloo.rewards.builtin:nope", "module 'rloo.rewards.builtin' has no function 'nope'"),
    ],
)
def test_load_reward_fn_errors_are_one_line(tmp_path, make_spec, message):
    (tmp_path / "bad.py").write_text("NOT_FN = 3\n")
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    with pytest.raises(ValueError, match=message) as info:
        load_reward_fn(make_spec(tmp_path))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- build_rewards


def test_build_rewards_names_weights_and_errors():
    def tone(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    sources = build_rewards(["grounding", tone, "rloo.rewards.builtin:grounding", tone])
    assert sources.names == ["grounding", "tone", "grounding_2", "tone_2"]
    assert sources.weights == [1.0] * 4
    with pytest.raises(ValueError, match="reward_weights has 1 values but there are 2 reward sources"):
        build_rewards(["grounding", "rouge_l"], [1.0])
    with pytest.raises(ValueError, match="no reward source"):
        build_rewards()
    with pytest.raises(ValueError, match="'_strict' must accept \\*\\*kwargs"):
        build_rewards([_strict])


def _strict(prompts, completions):
    return [1.0] * len(completions)


# ---------------------------------------------------------------- score_completions


def _sources(*fns):
    return RewardSources(names=[f.__name__ for f in fns], fns=list(fns), weights=[1.0] * len(fns))


def test_score_completions_nan_for_none_nan_inf_and_passes_columns():
    seen = {}

    def odd(prompts, completions, **kwargs):
        seen.update(kwargs)
        return [None, math.nan, math.inf, -math.inf, 2, np.float32(0.5)]

    def tensor_out(prompts, completions, **kwargs):
        return torch.arange(6.0)

    prompts, completions = ["p"] * 6, ["c"] * 6
    rewards_NF = score_completions(
        _sources(odd, tensor_out), prompts, completions, {"completion": ["ref"] * 6},
        completion_ids=[[1]] * 6, truncated=[False] * 6,
    )
    assert rewards_NF.dtype == torch.float32 and rewards_NF.shape == (6, 2)
    assert torch.isnan(rewards_NF[:4, 0]).all()
    assert rewards_NF[4:, 0].tolist() == [2.0, 0.5]
    assert rewards_NF[:, 1].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert set(seen) == {"completion", "completion_ids", "truncated"}


@pytest.mark.parametrize(
    "returned, error, message",
    [
        (0.5, TypeError, "'bad' returned float; expected a list"),
        ({"a": 1}, TypeError, "'bad' returned dict"),
        (torch.zeros(2, 1), TypeError, r"'bad' returned a Tensor of shape \(2, 1\)"),
        ([1.0], ValueError, "'bad' returned 1 values for 2 completions"),
        ([1.0, "x"], TypeError, "'bad' returned str at index 1"),
        ([True, 1.0], TypeError, "'bad' returned bool at index 0"),
        ([1.0, 1j], TypeError, "'bad' returned complex at index 1"),
    ],
)
def test_score_completions_rejects_bad_returns(returned, error, message):
    def bad(prompts, completions, **kwargs):
        return returned

    with pytest.raises(error, match=message) as info:
        score_completions(_sources(bad), ["p", "p"], ["c", "c"], {})
    assert "\n" not in str(info.value)


def test_reward_function_that_raises_is_named_with_its_sample_or_isolated():
    def picky(prompts, completions, **kwargs):
        if any("bad" in c for c in completions):
            raise KeyError("cannot score it")
        return [1.0] * len(completions)

    completions = ["fine", "a bad one", "also fine", "bad again"]
    with pytest.raises(RewardFunctionError) as info:
        score_completions(_sources(picky), ["p"] * 4, completions, {})
    message = str(info.value)
    assert "'picky'" in message and "KeyError" in message and "sample 1 " in message and "a bad one" in message
    assert "\n" not in message

    errors = []
    rewards = score_completions(_sources(picky), ["p"] * 4, completions, {}, on_error="isolate", errors=errors)
    assert rewards[:, 0].tolist()[0::2] == [1.0, 1.0] and torch.isnan(rewards[1::2, 0]).all()
    assert len(errors) == 2 and "sample 3 " in errors[1]

    def batch_only(prompts, completions, **kwargs):
        if len(completions) > 1:
            raise RuntimeError("only one at a time")
        return [0.5]

    with pytest.raises(RewardFunctionError, match="none of them alone"):
        score_completions(_sources(batch_only), ["p", "p"], ["x", "y"], {})
    assert score_completions(_sources(batch_only), ["p", "p"], ["x", "y"], {}, on_error="isolate")[:, 0].tolist() == [0.5, 0.5]


# ---------------------------------------------------------------- RewardModel on a tiny local model

TEXTS = ["my cat scratches the sofa", "the dog sleeps", "a cat and a dog share the new sofa every night"]


@pytest.fixture(scope="module")
def tiny_reward_model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification, PreTrainedTokenizerFast

    tokenizer_model = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer_model.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"])
    tokenizer_model.train_from_iterator(TEXTS + ["TL;DR: POST: summary of it"], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer_model, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=tokenizer_model.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=1,
    )
    path = tmp_path_factory.mktemp("tiny_rm")
    GPTNeoXForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _direct_score(rm, text):
    ids = rm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return _direct_score_ids(rm, ids)


def _direct_score_ids(rm, ids):
    # One unpadded sequence through the model's own pooling; without a pad id it reads the last
    # token (with pad = EOS it would skip a final EOS, which is why RewardModel pools by mask).
    pad_token_id, rm.model.config.pad_token_id = rm.model.config.pad_token_id, None
    try:
        with torch.no_grad():
            return rm.model(input_ids=ids).logits[0, 0].item()
    finally:
        rm.model.config.pad_token_id = pad_token_id


def test_reward_model_scores_do_not_depend_on_padding_or_batch_size(tiny_reward_model_dir):
    rm = RewardModel(str(tiny_reward_model_dir), batch_size=3)
    assert rm.__name__ == "reward_model" and rm.tokenizer.pad_token == "<eos>"
    assert rm.model.config.pad_token_id == rm.tokenizer.eos_token_id
    prompts, completions = ["POST: " + t + " TL;DR:" for t in TEXTS], [" summary"] * 3
    scores = rm(prompts, completions, completion_ids=[[1]] * 3, truncated=[False] * 3)
    direct = [_direct_score(rm, p + c) for p, c in zip(prompts, completions)]
    assert scores == pytest.approx(direct, abs=1e-5)
    rm.batch_size = 1
    assert rm(prompts, completions) == pytest.approx(scores, abs=1e-5)
    assert rm([], []) == []


def test_reward_model_left_truncation_and_append_eos(tiny_reward_model_dir):
    rm = RewardModel(str(tiny_reward_model_dir), max_length=3, append_eos=True)
    ids = rm.tokenizer(TEXTS[2], add_special_tokens=False)["input_ids"]
    eos = rm.tokenizer.eos_token_id
    scores = rm([TEXTS[2], TEXTS[2]], ["", ""], truncated=[False, True])
    assert scores[0] == pytest.approx(_direct_score_ids(rm, torch.tensor([ids[-2:] + [eos]])), abs=1e-5)
    assert scores[1] == pytest.approx(_direct_score_ids(rm, torch.tensor([ids[-3:]])), abs=1e-5)


def test_reward_model_from_objects_and_build_rewards(tiny_reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model_dir)
    with pytest.raises(ValueError, match="pass the reward model's tokenizer"):
        RewardModel(model)
    rm = RewardModel(model, tokenizer)
    assert rm(["the dog"], [" sleeps"]) == pytest.approx([_direct_score(rm, "the dog sleeps")], abs=1e-5)
    # TRL's order (its trl rloo script): the reward model first, then the functions; weights follow it.
    sources = build_rewards(
        ["grounding"], [0.5, 1.0], str(tiny_reward_model_dir), reward_model_kwargs={"batch_size": 2}
    )
    assert sources.names == ["reward_model", "grounding"] and sources.weights == [0.5, 1.0]
    rewards_NF = score_completions(sources, ["POST: the dog TL;DR:"] * 2, [" the dog", " cat"], {})
    assert rewards_NF.shape == (2, 2) and torch.isfinite(rewards_NF).all()
    assert rewards_NF[:, 0].tolist() == pytest.approx(rm(["POST: the dog TL;DR:"] * 2, [" the dog", " cat"]), abs=1e-5)
    # A model object among reward_funcs (TRL's reward_funcs=[model]) with its tokenizer (reward_processing_classes),
    # and a folder named as a string: both reward models, scored as RewardModel scores them.
    sources = build_rewards([model, str(tiny_reward_model_dir), "grounding"], reward_processing_classes=[tokenizer, None, None])
    assert sources.names == ["reward_model", "reward_model_2", "grounding"]
    both = score_completions(sources, ["the dog"], [" sleeps"], {})
    assert both[0, 0].item() == pytest.approx(both[0, 1].item(), abs=1e-5) == pytest.approx(rm(["the dog"], [" sleeps"])[0])
    with pytest.raises(ValueError, match="reward_processing_classes has 1 entries for 3"):
        build_rewards([model, "grounding", "rouge_l"], reward_processing_classes=[tokenizer])


@pytest.mark.parametrize("append_eos", [True, False])
def test_reward_model_on_policy_token_ids_shared_prompt_equals_repeated_and_text(tiny_reward_model_dir, append_eos):
    """Technique 5 (DESIGN.md §3): with the policy's vocabulary, the reward model scores the policy's ids;
    each prompt runs once per group with its KV cache shared. Scores equal (1e-5) the repeated computation,
    one unpadded sequence at a time, and the text path where the texts tokenize to the same ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model_dir)
    eos = tokenizer.eos_token_id
    prompts = ["POST: my cat scratches the sofa TL;DR:", "POST: the dog sleeps TL;DR:"]
    completions = [" the cat", " cat and a dog share the new sofa every night", "", " sofa", " the dog sleeps", " dog"]
    truncated = [False, True, False, False, False, True]  # row 2: an EOS-only completion
    prompt_texts = [p for p in prompts for _ in range(3)]  # two groups of k = 3, prompts of different lengths
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompt_texts]
    completion_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + ([] if cut else [eos])
                      for c, cut in zip(completions, truncated)]
    for p, c, pi, ci, cut in zip(prompt_texts, completions, prompt_ids, completion_ids, truncated):
        assert tokenizer(p + c, add_special_tokens=False)["input_ids"] == pi + (ci if cut else ci[:-1])
    ids = dict(prompt_ids=prompt_ids, completion_ids=completion_ids, truncated=truncated)

    results = {}
    for share in (True, False):
        for batch_size in (2, 16):  # 2: groups of 3 still go whole, one per forward
            rm = RewardModel(str(tiny_reward_model_dir), batch_size=batch_size, append_eos=append_eos,
                             policy_tokenizer=tokenizer, share_prompt=share)
            assert rm.scores_token_ids and rm.share_prompt is share
            results[share, batch_size] = rm(prompt_texts, completions, **ids)
    expected = [_direct_score_ids(rm, torch.tensor([pi + (ci if cut else ci[:-1] + ([eos] if append_eos else []))]))
                for pi, ci, cut in zip(prompt_ids, completion_ids, truncated)]
    for scores in results.values():
        assert scores == pytest.approx(expected, abs=1e-5)
    text_path = RewardModel(str(tiny_reward_model_dir), append_eos=append_eos)
    assert not text_path.scores_token_ids
    assert text_path(prompt_texts, completions, **ids) == pytest.approx(expected, abs=1e-5)
    assert len(set(round(x, 4) for x in expected)) == len(expected)  # distinct scores: rows are not mixed up


def test_reward_model_policy_ids_need_the_same_vocabulary(tiny_reward_model_dir, tiny_tokenizer):
    rm = RewardModel(str(tiny_reward_model_dir), policy_tokenizer=tiny_tokenizer)
    assert not rm.scores_token_ids  # another vocabulary: texts are re-tokenized
    assert rm(["the dog"], [" sleeps"], prompt_ids=[[5, 6]], completion_ids=[[7]], truncated=[True]) == pytest.approx(
        [_direct_score(rm, "the dog sleeps")], abs=1e-5)


def test_reward_model_missing_hub_id_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError) as info:
        RewardModel("nonexistent-org/nonexistent-model")
    message = str(info.value)
    assert "nonexistent-org/nonexistent-model" in message and "reward model" in message and "\n" not in message
