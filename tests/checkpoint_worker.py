"""Run by tests/test_sharding.py under torchrun (2 processes, gloo on CPU): rloo's checkpoints of a policy
whose optimizer state the processes share out (shards.py), for each layout: FSDP2 in accelerate's unit
layout (and a tied-embedding Llama), DeepSpeed ZeRO-2 and ZeRO-3 engines, each with its reference sharded (or whole) as the trainer
has it.

    python -m torch.distributed.run --nproc_per_node 2 tests/checkpoint_worker.py save|resume POLICY_DIR OUT

``save``: two optimizer steps, a checkpoint into ``OUT/<layout>`` through ``shards.save_sharded``, then
one more step; this process's parameters and optimizer state are kept at the save and after the extra
step (``OUT/<layout>/expected-rank<r>.safetensors``). ``resume``: fresh processes build everything again
(the reference from other weights), load the checkpoint as ``rloo.resume`` does, compare, take the same
extra step and compare again; one JSON object of findings per process in ``OUT/found.<rank>``.
"""

import copy
import json
import resource
import signal
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from rloo.checkpoint import read_checkpoint, step_folder
from rloo.distributed import partition_frozen, shard_frozen
from rloo.errors import CheckpointError
from rloo.models import load_policy
from rloo.shards import load_reference, read_parts, save_sharded
from rloo.train_state import TrainState, capture_rng
from sharded_worker import shard_like_accelerate

# run name -> layout; "fsdp_tied": a Llama-architecture policy whose output layer is its input embedding
LAYOUTS = {"fsdp": "fsdp", "fsdp_tied": "fsdp", "zero2": "zero2", "zero3": "zero3"}


def tied_policy():
    """A tiny random Llama with tied embeddings (as Qwen's and Gemma's small models), dropout off."""
    from transformers import AutoModelForCausalLM

    from architectures import tiny_config

    config = tiny_config("llama")
    config.tie_word_embeddings, config.attention_dropout = True, 0.0
    model = AutoModelForCausalLM.from_config(config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model


def shard_llama(model):
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)  # the tied embedding and output layer in one unit, as FSDP2 needs them
    return model
CPU = torch.device("cpu")


def start_model(name: str, policy_dir: str):
    torch.manual_seed(0)
    return (tied_policy() if name == "fsdp_tied" else load_policy(policy_dir, torch_dtype="float32")).train()


def build(name: str, policy_dir: str, reference_noise: float = 0.0):
    """(policy or engine, torch optimizer, scheduler, reference) as the trainer holds them under ``layout``."""
    layout = LAYOUTS[name]
    plain = start_model(name, policy_dir)
    reference = copy.deepcopy(plain).eval().requires_grad_(False)
    with torch.no_grad():
        for p in reference.parameters():  # a resumed run's reference must come from the checkpoint
            p.add_(reference_noise)
    if layout == "fsdp":
        policy = shard_llama(plain) if name == "fsdp_tied" else shard_like_accelerate(plain)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return policy, optimizer, scheduler, shard_frozen(reference, CPU)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": int(layout[-1])}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=plain, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    if layout == "zero3":
        reference = partition_frozen(reference, {key: value for key, value in config.items() if key != "optimizer"})
    return engine, optimizer, scheduler, reference


def step(layout: str, policy, optimizer, scheduler, n: int) -> None:
    """One optimizer step on this process's batch (different on each process, so the gradients average)."""
    ids = torch.randint(2, 250, (2, 9), generator=torch.Generator().manual_seed(100 * dist.get_rank() + n))
    loss = policy(input_ids=ids, labels=ids).loss
    if layout == "fsdp":
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    else:
        policy.backward(loss)
        policy.step()  # the engine steps the optimizer and the scheduler


def inner_optimizer(layout: str, policy, optimizer):
    """The torch optimizer that holds this process's state: DeepSpeed's ZeRO optimizer wraps one over its partitions."""
    return optimizer if layout == "fsdp" else policy.optimizer.optimizer


def local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone().contiguous()


def held_here(layout: str, policy, optimizer, scheduler) -> dict[str, torch.Tensor]:
    """This process's view: the whole parameters, and its own optimizer state and master-weight partitions."""
    module = policy if layout == "fsdp" else policy.module
    gather = deepspeed.zero.GatheredParameters(list(module.parameters())) if layout == "zero3" else nullcontext()
    with gather:
        found = {f"param.{n}": (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                 for n, p in module.named_parameters()}
    inner = inner_optimizer(layout, policy, optimizer)
    for g, group in enumerate(inner.param_groups):
        found[f"lr.{g}"] = torch.tensor(float(group["lr"]), dtype=torch.float64)
        for i, p in enumerate(group["params"]):
            found[f"master.{g}.{i}"] = local(p)
            found.update({f"state.{g}.{i}.{name}": local(v) for name, v in inner.state[p].items()
                          if isinstance(v, torch.Tensor)})
    found["scheduler_step"] = torch.tensor(scheduler.state_dict()["last_epoch"])
    return found


def reference_weights(layout: str, reference) -> dict[str, torch.Tensor]:
    gather = deepspeed.zero.GatheredParameters(list(reference.parameters())) if layout == "zero3" else nullcontext()
    with gather:
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                for n, p in reference.named_parameters()}


def differences(a: dict, b: dict) -> float | str:
    if a.keys() != b.keys():
        return f"keys differ: {sorted(a.keys() ^ b.keys())[:4]}"
    return max((x.double() - b[k].double()).abs().max().item() if x.numel() else 0.0 for k, x in a.items())


def gathered_states(step: int, scheduler) -> list[TrainState]:
    """Every process's TrainState, as rloo.resume.save gathers them."""
    state = TrainState(step=step, sampler={"epoch": 0}, counters={"steps": step}, rng=capture_rng(),
                       scheduler=scheduler.state_dict())
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def save(name: str, policy_dir: str, out: Path) -> None:
    layout = LAYOUTS[name]
    policy, optimizer, scheduler, reference = build(name, policy_dir)
    if name == "fsdp":  # a save before the first step (a stop during the first evaluation) leaves the run as it was
        save_sharded(layout, out, gathered_states(0, scheduler), policy, optimizer, reference, scheduler, {}, {}, None,
                     CPU)
        (out / f"state_after_step0_save.{dist.get_rank()}").write_text(str(len(optimizer.state)))
    for n in (1, 2):
        step(layout, policy, optimizer, scheduler, n)
    states = gathered_states(2, scheduler)
    save_sharded(layout, out, states, policy, optimizer, reference, scheduler, {"layout": layout}, {}, None, CPU)
    at_save = held_here(layout, policy, optimizer, scheduler)
    step(layout, policy, optimizer, scheduler, 3)
    after = {f"after.{k}": v for k, v in held_here(layout, policy, optimizer, scheduler).items()}
    save_file({**at_save, **after}, str(out / f"expected-rank{dist.get_rank()}.safetensors"))
    if name in ("fsdp", "zero2"):  # a save whose part fails on process 1 only: every process stops, nothing half there
        states = [TrainState(**{**vars(s), "step": 3}) for s in states]
        raised = None
        with file_size_limit(4096 if dist.get_rank() == 1 else None):  # its shard file cannot be written whole
            try:
                save_sharded(layout, out, states, policy, optimizer, reference, scheduler, {}, {}, None, CPU)
            except CheckpointError as err:
                raised = str(err)
        (out / f"failed.{dist.get_rank()}").write_text(json.dumps(raised))


@contextmanager
def file_size_limit(size: int | None):
    """Writes past ``size`` bytes fail in this process (EFBIG, as a full disk's ENOSPC would), not elsewhere."""
    if size is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def resume(name: str, policy_dir: str, out: Path) -> dict:
    layout = LAYOUTS[name]
    policy, optimizer, scheduler, reference = build(name, policy_dir, reference_noise=0.5)
    path = step_folder(out, 2)
    meta, _ = read_checkpoint(path)
    read_parts(layout, path, policy, optimizer, meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    load_reference(layout, reference, path.parent / "reference")
    expected = load_file(str(out / f"expected-rank{dist.get_rank()}.safetensors"))
    at_save = {k: v for k, v in expected.items() if not k.startswith("after.")}
    after = {k[len("after."):]: v for k, v in expected.items() if k.startswith("after.")}
    found = {"layout": meta["layout"], "state_diff": differences(held_here(layout, policy, optimizer, scheduler), at_save)}
    start, weights = start_model(name, policy_dir).state_dict(), reference_weights(layout, reference)
    # (shard_frozen makes a tied output layer a unit of its own: the reference then holds it under both names)
    found["reference_diff"] = differences(weights, {key: start[key] for key in weights if key in start})
    step(layout, policy, optimizer, scheduler, 3)
    found["after_step_diff"] = differences(held_here(layout, policy, optimizer, scheduler), after)
    found["moved"] = differences(*({k: v for k, v in d.items() if k.startswith("param.")} for d in (after, at_save)))
    return found


def main(mode: str, policy_dir: str, out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    found = {}
    for name in LAYOUTS:
        folder = Path(out) / name
        if mode == "save":
            save(name, policy_dir, folder)
        else:
            found[name] = resume(name, policy_dir, folder)
    if mode == "resume":
        (Path(out) / f"found.{dist.get_rank()}").write_text(json.dumps(found))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
