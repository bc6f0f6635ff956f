"""``rloo eval --judge``: a model's completions on held-out prompts against the dataset's reference
completions (or a second model's, ``against``), judged in both orders (judge.py), as a table and JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from rloo.judge import (
    DEFAULT_TEMPLATE,
    EndpointJudge,
    RewardModelJudge,
    check_template,
    judge_both_orders,
    tally,
)

REWARD_MODEL = "reward-model:"


def prompt_text(prompt) -> str:
    """What the judge reads as the prompt: the text, or a conversation's messages one after the other."""
    return prompt if isinstance(prompt, str) else "\n\n".join(str(m.get("content", "")) for m in prompt)


@torch.no_grad()
def complete(model_dir: str, prompts: list, max_new_tokens: int, temperature: float = 0.0, seed: int = 1234,
             batch_size: int = 16, trust_remote_code: bool = False, chat_template_kwargs: dict | None = None) -> list[str]:
    """One completion per prompt from ``model_dir``: greedy at temperature 0 (TRL's judge script decodes so),
    else sampled with ``seed``."""
    from rloo.data import render_prompt, tokenize_prompts
    from rloo.generation import prompt_seeds
    from rloo.generation.hf import HFGenerator
    from rloo.models import (
        eos_token_ids,
        load_policy,
        load_tokenizer,
        prompt_token_limit,
    )

    model = load_policy(model_dir, trust_remote_code=trust_remote_code)
    if torch.cuda.is_available():  # as the reward-model judge: on the GPU when there is one
        model = model.to("cuda")
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    generator = HFGenerator(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=eos_token_ids(model, tokenizer),
                            max_new_tokens=max_new_tokens, temperature=temperature or 1.0, do_sample=temperature > 0)
    limit = prompt_token_limit(model, None, max_new_tokens)
    texts_out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        texts = [render_prompt(p, tokenizer, chat_template_kwargs) for p in batch]
        ids = tokenize_prompts(texts, tokenizer, limit, warn=False).input_ids
        out = generator.generate(ids, 1, prompt_seeds(seed, 0, list(range(start, start + len(batch)))))
        texts_out += [tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
                      for row, mask in zip(out.completion_ids_BT, out.completion_mask_BT)]
    return texts_out


def build_judge(spec: str | None, url: str | None, model: str | None, template: str | None, api_key_env: str,
                parallel: int, retries: int):
    """``reward-model:PATH`` or an endpoint (``url`` and ``model``); exactly one of them."""
    if (spec is None) == (url is None):
        raise ValueError("--judge reward-model:PATH or --judge_url URL (with --judge_model): name one judge")
    if spec is not None:
        if not spec.startswith(REWARD_MODEL) or not spec[len(REWARD_MODEL):]:
            raise ValueError(f"--judge: expected reward-model:PATH (a reward model folder or hub id), got {spec!r}")
        from rloo.models import resolve_model_path
        from rloo.rewards.model import RewardModel

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return RewardModelJudge(RewardModel(resolve_model_path(spec[len(REWARD_MODEL):]), device=device))
    if not model:
        raise ValueError("--judge_model: name the model the endpoint serves (as its /v1/models lists it)")
    if parallel < 1 or retries < 0:
        raise ValueError(f"--judge_parallel must be >= 1 and --judge_retries >= 0, got {parallel} and {retries}")
    text = DEFAULT_TEMPLATE
    if template is not None:
        if not Path(template).is_file():
            raise ValueError(f"--judge_template: {template} is not a file")
        text = check_template(Path(template).read_text(), f"--judge_template {template}")
    return EndpointJudge(url, model, text, api_key_env, parallel, retries)


def judge_run(model_dir: str, dataset, judge, *, against: str | None = None, num_samples: int | None = None,
              max_judgments: int | None = None, max_new_tokens: int = 53, temperature: float = 0.0,
              seed: int = 1234, output: str | None = None, **complete_kwargs) -> dict:
    """The win rate of ``model_dir`` on the first prompts of ``dataset``: against its ``completion`` column
    (the references) or ``against``'s completions; at most ``max_judgments`` judgments (two per pair).
    ``output``: a new JSONL file of every pair (prompt, both completions, both answers)."""
    if max_judgments is not None and max_judgments < 2:
        raise ValueError(f"--max_judgments must be >= 2 (each pair is judged in both orders), got {max_judgments}")
    if output is not None and Path(output).exists():
        raise ValueError(f"--judge_output: {output} exists; name a new file (nothing is overwritten)")
    if against is None and "completion" not in dataset.column_names:
        raise ValueError(f"--dataset: no 'completion' column to judge against (columns: {', '.join(dataset.column_names)}); "
                         "name a second model with --against")
    n = min(num_samples or len(dataset), len(dataset))
    if max_judgments is not None:
        n = min(n, max_judgments // 2)
    rows = dataset.with_format(None)[:n]
    prompts = rows["prompt"]
    ours = complete(model_dir, prompts, max_new_tokens, temperature, seed, **complete_kwargs)
    if against is not None:
        theirs = complete(against, prompts, max_new_tokens, temperature, seed, **complete_kwargs)
    else:
        theirs = rows["completion"]
        bad = next((i for i, c in enumerate(theirs) if not isinstance(c, str)), None)
        if bad is not None:
            raise ValueError(f"--dataset: row {bad}: 'completion' must be text to judge against, got {type(theirs[bad]).__name__}")
    texts = [prompt_text(p) for p in prompts]
    answers = judge_both_orders(judge, texts, ours, theirs)
    result = tally(answers)
    result.update(model=model_dir, against=against or "references", judge=describe(judge),
                  decoding={"temperature": temperature, "greedy": temperature == 0, "max_new_tokens": max_new_tokens,
                            "seed": seed},
                  budget_limited=max_judgments is not None and n < min(num_samples or len(dataset), len(dataset)))
    if output is not None:
        raw = getattr(judge, "answers", None)
        with open(output, "x") as file:
            for i, (p, a, b, pair) in enumerate(zip(texts, ours, theirs, answers)):
                line = {"prompt": p, "completion": a, "against": b, "answer_ours_first": pair[0],
                        "answer_theirs_first": pair[1]}
                if raw:
                    line.update(raw_ours_first=raw[i], raw_theirs_first=raw[n + i])
                file.write(json.dumps(line) + "\n")
    return result


def describe(judge) -> str:
    if isinstance(judge, EndpointJudge):
        return f"{judge.model} at {judge.url}"
    return f"reward model {judge.reward_model.model.name_or_path}"


__all__ = ["build_judge", "cmd_judge", "complete", "judge_run"]


def cmd_judge(args, cfg) -> int:
    """``rloo eval --judge ...``: the table on stderr, the JSON on stdout."""
    import sys

    from rloo.data import load_prompt_dataset
    from rloo.judge import table
    from rloo.models import resolve_model_path

    if args.num_samples is not None and args.num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1 (held-out prompts to judge), got {args.num_samples}")
    if args.dataset is None and cfg.dataset_name is None:
        raise ValueError("--dataset: name the held-out prompts (this model's config names no dataset_name)")
    judge = build_judge(args.judge, args.judge_url, args.judge_model, args.judge_template, args.judge_api_key_env,
                        args.judge_parallel, args.judge_retries)
    dataset = load_prompt_dataset(args.dataset or cfg.dataset_name, cfg.dataset_eval_split)
    temperature = getattr(args, "temperature", 0.0)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    result = judge_run(cfg.model_name_or_path, dataset, judge,
                       against=resolve_model_path(args.against) if args.against else None,
                       num_samples=args.num_samples or cfg.num_eval_samples or None, max_judgments=args.max_judgments,
                       max_new_tokens=cfg.max_completion_length, temperature=temperature, seed=args.eval_seed,
                       output=args.judge_output, trust_remote_code=cfg.trust_remote_code,
                       chat_template_kwargs=cfg.chat_template_kwargs)
    print(table(result), file=sys.stderr)
    from rloo.run_folder import strict_json

    print(json.dumps(strict_json(result), allow_nan=False))
    return 0
