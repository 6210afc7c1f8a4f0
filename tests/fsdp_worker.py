"""Run by tests/test_fsdp.py in a fresh process: FSDP2 (fully_shard per block, then root) + activation
checkpointing around STDiT blocks on the fused custom ops, against the plain model (gloo, CPU)."""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import fully_shard

from modelgrow.models import create_model


def main() -> int:
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    ref = create_model("STDiT-tiny", class_dropout_prob=0.0)
    m = create_model("STDiT-tiny", class_dropout_prob=0.0)
    m.load_state_dict(ref.state_dict())
    for i, b in enumerate(m.blocks):
        m.blocks[i] = checkpoint_wrapper(b)
        fully_shard(m.blocks[i])
    fully_shard(m)
    x, t, y = torch.randn(2, 4, 4, 8, 8), torch.tensor([1.0, 500.0]), torch.randn(2, 1, 8, 32)
    mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5])
    for model in (m, ref):
        model(x, t, y, mask).square().mean().backward()
    worst = 0.0
    ref_grads = dict(ref.named_parameters())
    for name, p in m.named_parameters():
        key = name.replace("_checkpoint_wrapped_module.", "")
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        worst = max(worst, (g - ref_grads[key].grad).abs().max().item())
    dist.destroy_process_group()
    print(f"max grad diff {worst:.3e}")
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    sys.exit(main())
