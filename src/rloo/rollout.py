"""The Rollout batch (shapes per field) and the phases that fill it: sample, score, reference, advantages.

A rollout holds P prompts once and their k completions each (B = P * k rows, the k rows of a prompt
adjacent), so every later pass can treat a prompt group as a unit. A slice of completion rows
(``rows``) that cuts through groups keeps each prompt once when its groups stay equal in size, else
one prompt per row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Iterator

import torch

from rloo import objective
from rloo.data import left_pad
from rloo.generation import Generator
from rloo.logprobs import completion_logprobs
from rloo.rewards import RewardSources, score_completions


@dataclass
class Rollout:
    prompts: list[str]  # P prompt texts as rendered for the policy
    columns: dict[str, list]  # dataset columns other than prompt, one value per prompt (P)
    prompt_ids_PL: torch.Tensor  # long, left padded
    prompt_mask_PL: torch.Tensor  # long
    completion_ids_BT: torch.Tensor  # long, right padded, up to and including the first EOS
    completion_mask_BT: torch.Tensor  # long, 1 on real completion tokens
    truncated_B: torch.Tensor  # bool, no EOS within max_completion_length
    completions: list[str]  # B decoded completions (EOS and padding removed)
    raw_prompts: list | None = None  # P dataset prompts as given: text, or chat messages (reward functions get these)
    rewards_BF: torch.Tensor | None = None  # float, per reward source; NaN = None / non-finite
    scores_B: torch.Tensor | None = None  # float, weighted sum minus missing-EOS penalty; NaN = unscorable
    ref_logprobs_BT: torch.Tensor | None = None  # float, reference policy; None when beta = 0
    old_logprobs_BT: torch.Tensor | None = None  # float, sampling policy; None when taken from the training forward
    kl_B: torch.Tensor | None = None  # float, sequence KL(old || ref)
    advantages_B: torch.Tensor | None = None  # float
    sampler_logprobs_BT: torch.Tensor | None = None  # float, the sampler's own (decode loop or vLLM); for a metric only

    @property
    def num_generations(self) -> int:
        return self.completion_ids_BT.shape[0] // self.prompt_ids_PL.shape[0]

    @property
    def conversational(self) -> bool:
        return bool(self.raw_prompts) and isinstance(self.raw_prompts[0], list)

    def micro_batches(self, num_prompts: int) -> Iterator["Rollout"]:
        """Consecutive slices of ``num_prompts`` whole prompt groups (padding trimmed per slice)."""
        k, total = self.num_generations, self.prompt_ids_PL.shape[0]
        for start in range(0, total, num_prompts):
            yield self.rows(start * k, min(start + num_prompts, total) * k)

    def row_batches(self, num_rows: int) -> Iterator["Rollout"]:
        """Consecutive slices of ``num_rows`` completions, which may cut through prompt groups."""
        for start in range(0, self.completion_ids_BT.shape[0], num_rows):
            yield self.rows(start, min(start + num_rows, self.completion_ids_BT.shape[0]))

    def rows(self, start: int, stop: int) -> "Rollout":
        """Completion rows [start, stop), padding trimmed: each prompt once when the slice holds the same
        number of completions of every prompt it touches (whole groups, or part of one group), else each
        row with its own copy of its prompt (k = 1)."""
        k = self.num_generations
        prompt_of_row = [row // k for row in range(start, stop)]
        distinct = sorted(set(prompt_of_row))
        equal = len({prompt_of_row.count(p) for p in distinct}) == 1
        index = distinct if equal else prompt_of_row
        index_P = torch.tensor(index, dtype=torch.long, device=self.prompt_ids_PL.device)
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                values[f.name] = None
            elif f.name in ("prompts", "raw_prompts"):
                values[f.name] = [value[i] for i in index]
            elif f.name == "columns":
                values[f.name] = {name: [column[i] for i in index] for name, column in value.items()}
            elif f.name in ("prompt_ids_PL", "prompt_mask_PL"):
                values[f.name] = value.index_select(0, index_P)
            else:  # one entry per completion row
                values[f.name] = value[start:stop]
        return replace(self, **values).trim_padding()

    def trim_padding(self) -> "Rollout":
        """Drop prompt columns that are padding in every row and completion columns past the longest."""
        prompt_width = int(self.prompt_mask_PL.sum(1).max())
        completion_width = max(int(self.completion_mask_BT.sum(1).max()), 1)
        out = replace(
            self,
            prompt_ids_PL=self.prompt_ids_PL[:, -prompt_width:],
            prompt_mask_PL=self.prompt_mask_PL[:, -prompt_width:],
            completion_ids_BT=self.completion_ids_BT[:, :completion_width],
            completion_mask_BT=self.completion_mask_BT[:, :completion_width],
        )
        for name in ("ref_logprobs_BT", "old_logprobs_BT", "sampler_logprobs_BT"):
            if getattr(out, name) is not None:
                setattr(out, name, getattr(out, name)[:, :completion_width])
        return out


def sample(generator: Generator, tokenizer, prompts: list[str], prompt_ids: list[list[int]],
           columns: dict[str, list], num_generations: int, device: torch.device,
           seeds: list[int] | None = None, raw_prompts: list | None = None) -> Rollout:
    """Phase 1: k completions for each prompt (``seeds``: one per prompt, see ``generation.prompt_seeds``;
    ``raw_prompts``: the dataset's prompts, text or chat messages, for the reward functions)."""
    completions = generator.generate(prompt_ids, num_generations, seeds)
    prompt_ids_PL, prompt_mask_PL = left_pad(prompt_ids, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(
        completions.completion_ids_BT.masked_fill(completions.completion_mask_BT == 0, tokenizer.pad_token_id),
        skip_special_tokens=True,
    )
    return Rollout(
        prompts=prompts,
        columns=columns,
        prompt_ids_PL=prompt_ids_PL.to(device),
        prompt_mask_PL=prompt_mask_PL.to(device),
        completion_ids_BT=completions.completion_ids_BT.to(device),
        completion_mask_BT=completions.completion_mask_BT.to(device),
        truncated_B=completions.truncated_B.to(device),
        completions=texts,
        raw_prompts=list(raw_prompts) if raw_prompts is not None else list(prompts),
        sampler_logprobs_BT=None if completions.sampler_logprobs_BT is None else completions.sampler_logprobs_BT.to(device),
    )


def score(rollout: Rollout, sources: RewardSources, missing_eos_penalty: float | None, on_error: str = "raise",
          errors: list[str] | None = None, shared: dict | None = None) -> Rollout:
    """Phase 2: every reward source on every completion, then the weighted score per completion
    (``on_error`` / ``errors``: what a reward function that raises does, see ``score_completions``;
    ``shared``: ``trainer_state``, ``log_metric``, ``log_extra``). As TRL, reward functions get the
    dataset's prompts and, for chat prompts, each completion as ``[{"role": "assistant", "content": ...}]``."""
    k = rollout.num_generations
    ids = [row[mask.bool()].tolist() for row, mask in zip(rollout.completion_ids_BT.cpu(), rollout.completion_mask_BT.cpu())]
    prompt_ids = [row[mask.bool()].tolist() for row, mask in zip(rollout.prompt_ids_PL.cpu(), rollout.prompt_mask_PL.cpu())]
    completions = rollout.completions
    if rollout.conversational:
        completions = [[{"role": "assistant", "content": text}] for text in completions]
    rollout.rewards_BF = score_completions(
        sources,
        [p for p in (rollout.raw_prompts or rollout.prompts) for _ in range(k)],
        completions,
        {name: [v for v in column for _ in range(k)] for name, column in rollout.columns.items()},
        on_error=on_error,
        errors=errors,
        shared=shared,
        prompt_ids=[p for p in prompt_ids for _ in range(k)],
        completion_ids=ids,
        truncated=rollout.truncated_B.tolist(),
    ).to(rollout.completion_ids_BT.device)
    weights_F = torch.tensor(sources.weights, dtype=torch.float32, device=rollout.rewards_BF.device)
    scores_B = objective.combine_rewards(rollout.rewards_BF, weights_F)
    rollout.scores_B = objective.apply_missing_eos_penalty(scores_B, rollout.truncated_B, missing_eos_penalty or 0.0)
    return rollout


@torch.no_grad()
def add_logprobs(rollout: Rollout, model, temperature: float, num_prompts_per_pass: int, field: str,
                 share_prompt: bool = True) -> Rollout:
    """Phase 3: no-grad log-probs of ``model`` (reference, or the sampling policy) in micro-batches."""
    chunks = []
    width = rollout.completion_ids_BT.shape[1]
    for mb in rollout.micro_batches(num_prompts_per_pass):
        logprobs_BT, _ = completion_logprobs(
            model, mb.prompt_ids_PL, mb.prompt_mask_PL, mb.completion_ids_BT, mb.completion_mask_BT, temperature,
            share_prompt=share_prompt,
        )
        chunks.append(torch.nn.functional.pad(logprobs_BT, (0, width - logprobs_BT.shape[1])))
    setattr(rollout, field, torch.cat(chunks))
    return rollout


def add_advantages(rollout: Rollout, old_logprobs_BT: torch.Tensor | None, beta: float, kl_estimator: str) -> Rollout:
    """Phase 4: r = score - beta * KL(old || ref), then the leave-one-out advantage per prompt group."""
    rewards_B = rollout.scores_B
    if rollout.ref_logprobs_BT is not None:
        rollout.kl_B = objective.kl_penalty(old_logprobs_BT, rollout.ref_logprobs_BT, rollout.completion_mask_BT,
                                            kl_estimator)
        rewards_B = rewards_B - beta * rollout.kl_B
    num_prompts = rollout.prompt_ids_PL.shape[0]
    rollout.advantages_B = objective.rloo_advantages(rewards_B.view(num_prompts, -1)).reshape(-1)
    return rollout
