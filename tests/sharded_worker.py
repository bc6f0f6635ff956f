"""Run by tests/test_sharding.py under torchrun (2 processes, gloo on CPU): rloo's FSDP2 pieces on real
``fully_shard`` units, or its ZeRO-3 pieces on real DeepSpeed partitions, each result compared with
the same model unsharded. Writes one JSON object of findings per process to ``OUT.<rank>``; the test
asserts on them.

    python -m torch.distributed.run --nproc_per_node 2 tests/sharded_worker.py fsdp|zero3 POLICY_DIR REWARD_DIR OUT
"""

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from rloo.distributed import _reshards_after_forward, all_processes_done, gathered, partition_frozen, shard_frozen
from rloo.generation.hf import HFGenerator
from rloo.logprobs import completion_logprobs
from rloo.models import load_policy
from rloo.rewards.model import RewardModel

PAD = 1
EOS_IDS = list(range(0, 512, 3))  # many ends, so rows finish at different steps


def prompts_for(rank: int) -> list[list[int]]:
    """Different prompts (and lengths) on each process: their completions end at different steps."""
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(2, 512, (n,), generator=g).tolist() for n in (5 + rank, 9, 3 + 2 * rank)]


def shard_like_accelerate(model):
    """The FSDP2 layout accelerate's fsdp2_prepare_model gives a GPTNeoX policy: each layer, the input
    embedding, the tail (final norm + output layer, kept gathered after forward) and the root."""
    for layer in model.gpt_neox.layers:
        fully_shard(layer)
    fully_shard(model.gpt_neox.embed_in)
    fully_shard([model.gpt_neox.final_layer_norm, model.get_output_embeddings()], reshard_after_forward=False)
    fully_shard(model)
    return model


def is_sharded(model) -> bool:
    """FSDP2: every parameter a DTensor; ZeRO-3: every parameter partitioned away (no elements here)."""
    return all(isinstance(p, DTensor) or p.numel() == 0 for p in model.parameters())


ZERO3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}


def generate(model, prompts, all_done=None):
    generator = HFGenerator(model, pad_token_id=PAD, eos_token_ids=EOS_IDS, max_new_tokens=24, temperature=0.9,
                            all_done=all_done)
    seeds = [1000 * dist.get_rank() + row for row in range(len(prompts))]
    return generator.generate(prompts, 2, seeds=seeds).completion_ids_BT.tolist()


def generation_checks(found: dict, policy, prompts, expected, kind: str) -> None:
    """Gathered once (then sharded again), and not gathered with the processes decoding in step."""
    with gathered(policy, kind):
        found["gathered_is_whole"] = not any(isinstance(p, DTensor) or p.numel() == 0 for p in policy.parameters())
        found["gathered_equal"] = generate(policy, prompts) == expected
    found["resharded_after"] = is_sharded(policy)
    # Not gathered: each forward all-gathers; the processes finish at different steps, so they must agree.
    # A process done early decodes padding until all are: the same completions, then padding columns.
    stepped = generate(policy, prompts, lambda done: all_processes_done(done, torch.device("cpu")))
    width = len(expected[0])
    found["lockstep_equal"] = ([row[:width] for row in stepped] == expected
                               and all(token == PAD for row in stepped for token in row[width:]))
    found["lockstep_steps"] = len(stepped[0])


def frozen_checks(found: dict, plain, reward_dir: str, prompts, batch, shard) -> None:
    """A reference and a reward model sharded by rloo: the unsharded model's log-probs and scores."""
    from transformers import AutoTokenizer

    reference = shard(copy.deepcopy(plain))
    found["reference_sharded"] = is_sharded(reference)
    with torch.no_grad():
        found["reference_diff"] = (completion_logprobs(reference, *batch)[0] - completion_logprobs(plain, *batch)[0]
                                   ).abs().max().item()
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    whole = RewardModel(reward_dir, policy_tokenizer=tokenizer)
    sharded = RewardModel(reward_dir, policy_tokenizer=tokenizer)
    sharded.model = shard(sharded.model)
    found["reward_sharded"] = is_sharded(sharded.model)
    ids = {"prompt_ids": [prompts[0]] * 2 + [prompts[1]] * 2, "completion_ids": [[5, 6, 0], [7, 0], [8, 9], [3, 0]],
           "truncated": [False, False, True, False]}
    texts = (["a b"] * 2 + ["c d e"] * 2, [" x", " y", " z w", " v"])
    found["reward_ids_diff"] = max(abs(a - b) for a, b in zip(sharded(*texts, **ids), whole(*texts, **ids)))
    found["reward_text_diff"] = max(abs(a - b) for a, b in zip(sharded(*texts), whole(*texts)))


BATCH = [torch.tensor([[PAD, PAD, 5, 6, 7], [8, 9, 10, 11, 12]]), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
         torch.tensor([[3, 4, 5], [6, 7, PAD], [9, 10, 11], [12, PAD, PAD]]),
         torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])]


def main(kind: str, policy_dir: str, reward_dir: str, out: str) -> None:
    if kind == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    plain = load_policy(policy_dir, torch_dtype="float32")
    plain.eval()
    prompts = prompts_for(rank)
    expected = generate(plain, prompts)
    found: dict = {"rank": rank, "decode_steps": len(expected[0])}  # differs between the processes
    if kind == "zero3":
        policy = partition_frozen(copy.deepcopy(plain), ZERO3)
        generation_checks(found, policy, prompts, expected, "zero3")
        frozen_checks(found, plain, reward_dir, prompts, BATCH, lambda model: partition_frozen(model, ZERO3))
    else:
        fsdp_checks(found, plain, prompts, expected)
        frozen_checks(found, plain, reward_dir, prompts, BATCH, lambda model: shard_frozen(model, torch.device("cpu")))
    with open(f"{out}.{rank}", "w") as f:
        f.write(json.dumps(found))
    dist.destroy_process_group()


def fsdp_checks(found: dict, plain, prompts, expected) -> None:
    """The policy in accelerate's FSDP2 layout: generation, and the training pass's log-probs and
    (averaged, gathered) gradients against the plain model's."""
    policy = shard_like_accelerate(copy.deepcopy(plain))
    units = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    policy(input_ids=torch.tensor([prompts[0]]))  # lazy init: the root's setting is final from here on
    policy.reshard()
    settings = [_reshards_after_forward(unit) for unit in units]
    generation_checks(found, policy, prompts, expected, "fsdp")
    found["settings_restored"] = [_reshards_after_forward(unit) for unit in units] == settings
    found["settings"] = settings
    policy.train()
    train_plain = copy.deepcopy(plain).train()
    logprobs_sharded, _ = completion_logprobs(policy, *BATCH, temperature=0.7)
    logprobs_plain, _ = completion_logprobs(train_plain, *BATCH, temperature=0.7)
    logprobs_sharded.sum().backward()
    logprobs_plain.sum().backward()
    found["logprob_diff"] = (logprobs_sharded - logprobs_plain).abs().max().item()
    found["grad_diff"] = max((p.grad.full_tensor() - q.grad).abs().max().item()
                             for p, q in zip(policy.parameters(), train_plain.parameters()))


if __name__ == "__main__":
    main(*sys.argv[1:5])
