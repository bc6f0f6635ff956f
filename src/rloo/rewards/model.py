"""A Hugging Face sequence-classification reward model as one more reward callable.

``RewardModel(name)(prompts, completions) -> list[float]`` scores each ``prompt + completion``
text with the model's first logit at the last real token, the way the TL;DR reward model
``cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr`` was trained and is read by TRL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

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
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"RewardModel: batch_size must be >= 1, got {batch_size}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"RewardModel: max_length must be >= 1 or None, got {max_length}")
        if isinstance(model_name_or_path, str):
            kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": trust_remote_code}
            if torch_dtype is not None:
                kwargs["dtype"] = torch_dtype
            model = from_pretrained(
                AutoModelForSequenceClassification, model_name_or_path, "reward model", **kwargs
            )
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
        self.__name__ = "reward_model"

    def __call__(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        if not completions:
            return []
        ids_per_sequence = self._tokenize(prompts, completions, kwargs.get("truncated"))
        # Longest first, so each batch pads to similar lengths; scores go back to input order.
        order = sorted(range(len(ids_per_sequence)), key=lambda i: -len(ids_per_sequence[i]))
        scores = [0.0] * len(ids_per_sequence)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for i, score in zip(batch, self._score([ids_per_sequence[i] for i in batch])):
                scores[i] = score
        return scores

    def _tokenize(self, prompts: list[str], completions: list[str], truncated: list[bool] | None) -> list[list[int]]:
        texts = [prompt + completion for prompt, completion in zip(prompts, completions, strict=True)]
        # No special tokens, as TRL does: a chat-templated prompt already carries its BOS text.
        ids_per_sequence = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        if self.append_eos:
            ended = [True] * len(texts) if truncated is None else [not cut for cut in truncated]
            eos = self.tokenizer.eos_token_id
            ids_per_sequence = [ids + [eos] if end else ids for ids, end in zip(ids_per_sequence, ended)]
        if self.max_length is not None:
            ids_per_sequence = [ids[-self.max_length :] for ids in ids_per_sequence]
        if any(len(ids) == 0 for ids in ids_per_sequence):
            raise ValueError("RewardModel: a prompt + completion text has no tokens to score")
        return ids_per_sequence

    @torch.inference_mode()
    def _score(self, ids_per_sequence: list[list[int]]) -> list[float]:
        num_sequences, max_len = len(ids_per_sequence), max(len(ids) for ids in ids_per_sequence)
        input_ids_BT = torch.full((num_sequences, max_len), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask_BT = torch.zeros((num_sequences, max_len), dtype=torch.long)
        for row, ids in enumerate(ids_per_sequence):
            input_ids_BT[row, : len(ids)] = torch.tensor(ids)
            attention_mask_BT[row, : len(ids)] = 1
        input_ids_BT, attention_mask_BT = input_ids_BT.to(self.device), attention_mask_BT.to(self.device)
        # Backbone + score head, as TRL's get_reward: the model's own pooling finds the last token
        # by comparing ids with pad_token_id, which is wrong when pad = EOS and EOS was scored.
        head = getattr(self.model, "score", None)
        if head is None:
            raise ValueError(
                f"RewardModel: {type(self.model).__name__} has no 'score' head; expected a causal-LM "
                "sequence classifier (AutoModelForSequenceClassification of a decoder model)"
            )
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden_BTD = backbone(
            input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False
        ).last_hidden_state
        last_B = attention_mask_BT.sum(dim=1) - 1  # right padding: real tokens are 0..len-1
        hidden_BD = hidden_BTD[torch.arange(num_sequences, device=hidden_BTD.device), last_B]
        return head(hidden_BD)[:, 0].float().tolist()
