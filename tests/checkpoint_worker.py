"""Run by tests/test_sharding.py under torchrun (2 processes, gloo on CPU): rloo's checkpoints of a policy
whose optimizer state the processes share out (shards.py), for each layout: FSDP2 in accelerate's unit
layout, DeepSpeed ZeRO-2 and ZeRO-3 engines, each with its reference sharded (or whole) as the trainer
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
from torch.distributed.tensor import DTensor

from rloo.checkpoint import read_checkpoint, step_folder
from rloo.distributed import partition_frozen, shard_frozen
from rloo.errors import CheckpointError
from rloo.models import load_policy
from rloo.shards import load_reference, read_parts, save_sharded
from rloo.train_state import TrainState, capture_rng
from sharded_worker import shard_like_accelerate

LAYOUTS = ("fsdp", "zero2", "zero3")
CPU = torch.device("cpu")


def build(layout: str, policy_dir: str, reference_noise: float = 0.0):
    """(policy or engine, torch optimizer, scheduler, reference) as the trainer holds them under ``layout``."""
    torch.manual_seed(0)
    plain = load_policy(policy_dir, torch_dtype="float32").train()
    reference = copy.deepcopy(plain).eval().requires_grad_(False)
    with torch.no_grad():
        for p in reference.parameters():  # a resumed run's reference must come from the checkpoint
            p.add_(reference_noise)
    if layout == "fsdp":
        policy = shard_like_accelerate(plain)
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
    ids = torch.randint(2, 512, (2, 9), generator=torch.Generator().manual_seed(100 * dist.get_rank() + n))
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


def save(layout: str, policy_dir: str, out: Path) -> None:
    policy, optimizer, scheduler, reference = build(layout, policy_dir)
    for n in (1, 2):
        step(layout, policy, optimizer, scheduler, n)
    state = TrainState(step=2, sampler={"epoch": 0}, counters={"steps": 2}, rng=capture_rng(),
                       scheduler=scheduler.state_dict())
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    save_sharded(layout, out, states, policy, optimizer, reference, scheduler, {"layout": layout}, {}, None, CPU)
    at_save = held_here(layout, policy, optimizer, scheduler)
    step(layout, policy, optimizer, scheduler, 3)
    after = {f"after.{k}": v for k, v in held_here(layout, policy, optimizer, scheduler).items()}
    save_file({**at_save, **after}, str(out / f"expected-rank{dist.get_rank()}.safetensors"))
    if layout == "fsdp":  # a save whose part fails on process 1 only: every process stops, nothing is half there
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


def resume(layout: str, policy_dir: str, out: Path) -> dict:
    policy, optimizer, scheduler, reference = build(layout, policy_dir, reference_noise=0.5)
    path = step_folder(out, 2)
    meta, _ = read_checkpoint(path)
    read_parts(layout, path, policy, optimizer, meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    load_reference(layout, reference, path.parent / "reference")
    expected = load_file(str(out / f"expected-rank{dist.get_rank()}.safetensors"))
    at_save = {k: v for k, v in expected.items() if not k.startswith("after.")}
    after = {k[len("after."):]: v for k, v in expected.items() if k.startswith("after.")}
    found = {"layout": meta["layout"], "state_diff": differences(held_here(layout, policy, optimizer, scheduler), at_save)}
    start = load_policy(policy_dir, torch_dtype="float32")
    found["reference_diff"] = differences(reference_weights(layout, reference), dict(start.named_parameters()))
    step(layout, policy, optimizer, scheduler, 3)
    found["after_step_diff"] = differences(held_here(layout, policy, optimizer, scheduler), after)
    found["moved"] = differences(*({k: v for k, v in d.items() if k.startswith("param.")} for d in (after, at_save)))
    return found


def main(mode: str, policy_dir: str, out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    found = {}
    for layout in LAYOUTS:
        folder = Path(out) / layout
        if mode == "save":
            save(layout, policy_dir, folder)
        else:
            found[layout] = resume(layout, policy_dir, folder)
    if mode == "resume":
        (Path(out) / f"found.{dist.get_rank()}").write_text(json.dumps(found))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
