"""A Hugging Face sequence-classification reward model as one more reward callable.

``RewardModel(name)(prompts, completions) -> list[float]`` scores each ``prompt + completion``
with the model's first logit at the last real token, the way the TL;DR reward model
``cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr`` was trained and is read by TRL.

Two inputs: the texts, re-tokenized with the reward model's own tokenizer (any policy vocabulary);
or, when the reward model's tokenizer has the policy's vocabulary (``policy_tokenizer``), the
policy's own token ids (keywords ``prompt_ids``, ``completion_ids``, ``truncated``), with each
prompt run once per group of completions and its KV cache shared by them (DESIGN.md §3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import inspect

import torch

from rloo.architecture import repeat_cache
from rloo.data import left_pad, right_pad
from rloo.hub import from_pretrained

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class RewardModel:
    """Score completions with a sequence-classification reward model (``num_labels >= 1``).

    The model keeps its OWN tokenizer: the text is re-tokenized, so the policy and the reward model
    may use different vocabularies. Sequences are scored in batches of ``batch_size`` with right
    padding; the score is ``logits[:, 0]`` at the last token of the attention mask, so padding never
    changes a score. Sequences longer than ``max_length`` tokens keep their end (the completion).

    ``append_eos=True`` appends the EOS token to every completion that ended with EOS (keyword
    ``truncated`` False or absent): the cleanrl TL;DR reward model was trained on responses ending in
    ``<|endoftext|>`` and read there, as TRL 0.x RLOOTrainer fed it the generated EOS token.

    ``policy_tokenizer``: when its vocabulary equals the reward model's, calls that pass
    ``prompt_ids``, ``completion_ids`` and ``truncated`` (the trainer does) are scored on those ids,
    with no decode and re-tokenize: the sequence the policy produced, as TRL 0.x did. The policy's
    final EOS is replaced by the reward model's (``append_eos``) or dropped, as in the text path.
    Consecutive rows with the same prompt form a group: ``share_prompt=True`` runs the prompt once
    and repeats its KV cache for the group's completions (where the backbone takes ``past_key_values``
    and ``position_ids``, and no sequence exceeds ``max_length``), which scores exactly what the
    repeated computation scores (a test).

    Example (needs the Hub; tests/test_rewards.py runs a tiny local model)::

        rm = RewardModel("cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr", device="cuda")
        rm(["POST: ... TL;DR:"], [" a summary"], truncated=[False])  # -> [score]
    """

    def __init__(
        self,
        model_name_or_path: str | PreTrainedModel,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        *,
        device: str | torch.device = "cpu",
        torch_dtype: str | torch.dtype | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        append_eos: bool = False,
        policy_tokenizer: PreTrainedTokenizerBase | None = None,
        share_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
        model_kwargs: dict | None = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"RewardModel: batch_size must be >= 1, got {batch_size}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"RewardModel: max_length must be >= 1 or None, got {max_length}")
        if isinstance(model_name_or_path, str):
            kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": trust_remote_code,
                                      **(model_kwargs or {})}
            if torch_dtype is not None:
                kwargs["dtype"] = torch_dtype
            model, info = from_pretrained(
                AutoModelForSequenceClassification, model_name_or_path, "reward model", output_loading_info=True,
                **kwargs
            )
            refuse_untrained_head(model, info, model_name_or_path)
            tokenizer = model_name_or_path if tokenizer is None else tokenizer
        else:
            model = model_name_or_path
            if tokenizer is None:
                raise ValueError("RewardModel: pass the reward model's tokenizer along with a model object")
        if isinstance(tokenizer, str):
            tokenizer = from_pretrained(
                AutoTokenizer, tokenizer, "reward model tokenizer", trust_remote_code=trust_remote_code
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if append_eos and tokenizer.eos_token_id is None:
            raise ValueError("RewardModel: append_eos=True but the reward model's tokenizer has no EOS token")
        # The pad id only fills the padding (scores are read through the attention mask), but a
        # model without one refuses batches larger than 1.
        model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.append_eos = append_eos
        self.chat_template_kwargs = chat_template_kwargs or {}
        self.scores_token_ids = policy_tokenizer is not None and policy_tokenizer.get_vocab() == tokenizer.get_vocab()
        forward_args = inspect.signature(self._backbone().forward).parameters
        self.share_prompt = share_prompt and {"past_key_values", "position_ids"} <= set(forward_args)
        self.__name__ = "reward_model"

    def __call__(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        if not completions:
            return []
        ids_given = all(kwargs.get(key) is not None for key in ("prompt_ids", "completion_ids", "truncated"))
        # Chat prompts go through the reward model's own template (with its end-of-turn suffix), as TRL scores
        # them; the policy's ids lack that suffix.
        if self.scores_token_ids and ids_given and isinstance(prompts[0], str):
            prompt_ids, completion_ids = self._from_policy_ids(kwargs["prompt_ids"], kwargs["completion_ids"],
                                                               kwargs["truncated"])
            fits = self.max_length is None or all(len(p) + len(c) <= self.max_length
                                                  for p, c in zip(prompt_ids, completion_ids))
            if self.share_prompt and fits:
                return self._score_groups(prompt_ids, completion_ids)
            ids_per_sequence = self._clip([p + c for p, c in zip(prompt_ids, completion_ids)])
        else:
            ids_per_sequence = self._tokenize(prompts, completions, kwargs.get("truncated"))
        # Longest first, so each batch pads to similar lengths; scores go back to input order.
        order = sorted(range(len(ids_per_sequence)), key=lambda i: -len(ids_per_sequence[i]))
        scores = [0.0] * len(ids_per_sequence)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for i, score in zip(batch, self._score([ids_per_sequence[i] for i in batch])):
                scores[i] = score
        return scores

    def _from_policy_ids(self, prompt_ids, completion_ids, truncated) -> tuple[list[list[int]], list[list[int]]]:
        """The policy's ids as the text path would tokenize them: the final EOS of an ended completion
        dropped, then the reward model's EOS appended to it when ``append_eos``."""
        if not len(prompt_ids) == len(completion_ids) == len(truncated):
            raise ValueError(f"RewardModel: {len(prompt_ids)} prompt_ids, {len(completion_ids)} completion_ids and "
                             f"{len(truncated)} truncated flags; expected one each per completion")
        prompts = [list(ids) for ids in prompt_ids]
        eos = [self.tokenizer.eos_token_id] if self.append_eos else []
        completions = [list(ids) if cut else list(ids[:-1]) + eos for ids, cut in zip(completion_ids, truncated)]
        return prompts, completions

    def _clip(self, ids_per_sequence: list[list[int]]) -> list[list[int]]:
        """Keep the last ``max_length`` tokens (the completion); refuse empty sequences."""
        if self.max_length is not None:
            ids_per_sequence = [ids[-self.max_length :] for ids in ids_per_sequence]
        if any(len(ids) == 0 for ids in ids_per_sequence):
            raise ValueError("RewardModel: a prompt + completion has no tokens to score")
        return ids_per_sequence

    def _score_groups(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[float]:
        """Score runs of rows sharing a prompt, whole groups per batch (at least one, at most about
        ``batch_size`` rows)."""
        starts = [i for i in range(len(prompt_ids)) if i == 0 or prompt_ids[i] != prompt_ids[i - 1]]
        if any(not prompt_ids[i] for i in starts):
            raise ValueError("RewardModel: a prompt has no tokens; the shared-prompt path needs at least one")
        bounds = list(zip(starts, starts[1:] + [len(prompt_ids)]))
        scores: list[float] = []
        batch: list[tuple[int, int]] = []
        for group in bounds + [None]:
            rows = sum(stop - start for start, stop in batch)
            if batch and (group is None or rows + group[1] - group[0] > self.batch_size):
                scores += self._score_shared([prompt_ids[start] for start, _ in batch],
                                             [stop - start for start, stop in batch],
                                             completion_ids[batch[0][0] : batch[-1][1]])
                batch = []
            if group is not None:
                batch.append(group)
        return scores

    @torch.inference_mode()
    def _score_shared(self, group_prompts: list[list[int]], group_sizes: list[int],
                      completions: list[list[int]]) -> list[float]:
        """Each prompt once (left padded), its KV cache repeated for its completions (right padded)."""
        backbone, pad = self._backbone(), self.tokenizer.pad_token_id
        prompt_ids_GL, prompt_mask_GL = (t.to(self.device) for t in left_pad(group_prompts, pad))
        prefill = backbone(input_ids=prompt_ids_GL, attention_mask=prompt_mask_GL,
                           position_ids=(prompt_mask_GL.cumsum(1) - 1).clamp(min=0), use_cache=True)
        group_B = torch.repeat_interleave(torch.arange(len(group_sizes), device=self.device),
                                          torch.tensor(group_sizes, device=self.device))
        hidden_BD = prefill.last_hidden_state[:, -1][group_B]  # a completion with no token: the prompt's last
        lengths_B = torch.tensor([len(c) for c in completions], device=self.device)
        if int(lengths_B.max()) > 0:
            completion_ids_BT, completion_mask_BT = (t.to(self.device) for t in right_pad(completions, pad))
            cache = prefill.past_key_values
            repeat_cache(cache, group_B)  # every kind of layer state (architecture.py)
            prompt_mask_BL = prompt_mask_GL[group_B]
            positions_BT = prompt_mask_BL.sum(1, keepdim=True) + torch.arange(completion_ids_BT.shape[1], device=self.device)
            out = backbone(input_ids=completion_ids_BT, attention_mask=torch.cat([prompt_mask_BL, completion_mask_BT], 1),
                           position_ids=positions_BT, past_key_values=cache, use_cache=True).last_hidden_state
            last_B = (lengths_B - 1).clamp(min=0)
            hidden_BD = torch.where((lengths_B > 0)[:, None], out[torch.arange(len(completions)), last_B], hidden_BD)
        return self._head()(hidden_BD)[:, 0].float().tolist()

    def _tokenize(self, prompts: list, completions: list, truncated: list[bool] | None) -> list[list[int]]:
        texts = [self._text(prompt, completion) for prompt, completion in zip(prompts, completions, strict=True)]
        # No special tokens, as TRL does: a chat-templated prompt already carries its BOS text.
        ids_per_sequence = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        if self.append_eos:
            ended = [True] * len(texts) if truncated is None else [not cut for cut in truncated]
            eos = self.tokenizer.eos_token_id
            ids_per_sequence = [ids + [eos] if end else ids for ids, end in zip(ids_per_sequence, ended)]
        return self._clip(ids_per_sequence)

    def _text(self, prompt, completion) -> str:
        """prompt + completion as the reward model reads them: text concatenated, or conversational messages
        through the reward model's own chat template (TRL's reward-model input)."""
        if isinstance(prompt, str) and isinstance(completion, str):
            return prompt + completion
        messages = (prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}])
        messages = messages + (completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}])
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("RewardModel: conversational prompts need a reward-model tokenizer with a chat template")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **self.chat_template_kwargs)

    @torch.inference_mode()
    def _score(self, ids_per_sequence: list[list[int]]) -> list[float]:
        num_sequences, max_len = len(ids_per_sequence), max(len(ids) for ids in ids_per_sequence)
        input_ids_BT = torch.full((num_sequences, max_len), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask_BT = torch.zeros((num_sequences, max_len), dtype=torch.long)
        for row, ids in enumerate(ids_per_sequence):
            input_ids_BT[row, : len(ids)] = torch.tensor(ids)
            attention_mask_BT[row, : len(ids)] = 1
        input_ids_BT, attention_mask_BT = input_ids_BT.to(self.device), attention_mask_BT.to(self.device)
        backbone = self._backbone()
        hidden_BTD = backbone(
            input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False
        ).last_hidden_state
        last_B = attention_mask_BT.sum(dim=1) - 1  # right padding: real tokens are 0..len-1
        hidden_BD = hidden_BTD[torch.arange(num_sequences, device=hidden_BTD.device), last_B]
        return self._head()(hidden_BD)[:, 0].float().tolist()

    # Backbone + score head, as TRL's get_reward: the model's own pooling finds the last token by
    # comparing ids with pad_token_id, which is wrong when pad = EOS and EOS was scored.
    def _backbone(self) -> torch.nn.Module:
        return getattr(self.model, self.model.base_model_prefix)

    def _head(self) -> torch.nn.Module:
        head = getattr(self.model, "score", None)
        if head is None:
            raise ValueError(
                f"RewardModel: {type(self.model).__name__} has no 'score' head; expected a causal-LM "
                "sequence classifier (AutoModelForSequenceClassification of a decoder model)"
            )
        return head


def refuse_untrained_head(model, info: dict, name: str) -> None:
    """A reward model's score head must come from its checkpoint: a causal LM, or any checkpoint without the
    head, would get a randomly initialised one (transformers only warns) and train the policy on noise."""
    prefix = model.base_model_prefix + "."
    head = {n for n, _ in model.named_parameters() if not n.startswith(prefix)}
    missing = sorted(set(info.get("missing_keys") or ()) & head)
    if missing:
        kinds = ", ".join(model.config.architectures or []) or "unknown architecture"
        raise ValueError(f"reward model '{name}' ({kinds}) has no trained score head: its checkpoint lacks "
                         f"{', '.join(missing[:3])}, which would start random; give a sequence-classification reward "
                         "model (trained with a reward head, e.g. by TRL's RewardTrainer)")
