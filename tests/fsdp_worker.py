"""Run by tests/test_fsdp.py under torchrun (2 ranks, gloo, CPU): the project's ``parallelize()`` (activation
checkpointing -> FSDP2 fully_shard per block then root, MixedPrecisionPolicy) around STDiT on the fused
custom ops, against the plain model. Both ranks see the same batch, so the averaged FSDP gradients must equal
the plain model's; rank 0 prints the worst difference and what parallelize() applied."""

import json
import os
import sys

import torch
import torch.distributed as dist

from modelgrow.config import ParallelConfig
from modelgrow.models import create_model
from modelgrow.train.parallelize import parallelize


def main(policy: str) -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = create_model("STDiT-tiny", class_dropout_prob=0.0)
    m = create_model("STDiT-tiny", class_dropout_prob=0.0)
    m.load_state_dict(ref.state_dict())
    done = parallelize(m, ParallelConfig(activation_checkpointing=policy), world_size=world, compute_dtype="float32")
    from torch.distributed.fsdp import FSDPModule

    assert isinstance(m, FSDPModule) and all(isinstance(b, FSDPModule) for b in m.blocks), "FSDP2 not applied"
    assert [i for i, b in enumerate(m.blocks) if b.grad_checkpointing] == done["activation_checkpointing"]
    g = torch.Generator().manual_seed(1)  # the same batch on every rank
    x, t, y = torch.randn(2, 4, 4, 8, 8, generator=g), torch.tensor([1.0, 500.0]), torch.randn(2, 1, 8, 32, generator=g)
    mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5])
    for model in (m, ref):
        model(x, t, y, mask).square().mean().backward()
    worst = 0.0
    ref_grads = dict(ref.named_parameters())
    for name, p in m.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        worst = max(worst, (grad - ref_grads[name].grad).abs().max().item())
    if rank == 0:
        print(json.dumps({"max_grad_diff": worst, "applied": done}), flush=True)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    code = main(sys.argv[1] if len(sys.argv) > 1 else "full")
    sys.stdout.flush()
    # skip interpreter teardown: a gloo thread still joinable at static destruction aborted rank 1 once in CI
    # ("terminate called without an active exception", SIGABRT) after the ranks had compared their gradients
    os._exit(code)
