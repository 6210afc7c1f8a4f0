"""Run by tests/test_train.py (alone or under torchrun): a few training steps of a tiny model on the
deterministic random-latent stream; rank 0 writes the loss history and final weights as JSON/safetensors."""

import json
import os
import sys

import torch
from safetensors.torch import save_file

from modelgrow.config import load_config
from modelgrow.train import RandomLatentLoader, Trainer


def main(out_dir: str, global_batch: int, steps: int, extra: list[str]) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cfg = load_config(None, [
        "--model.preset", "STDiT-tiny", "--model.input_size", "4,8,8", "--model.caption_channels", "32",
        "--model.model_max_length", "8", "--train.steps", str(steps), "--train.log_every", "1",
        "--train.output_dir", out_dir, "--train.compute_dtype", "float32", "--checkpoint.every_steps", "1000",
        "--optim.lr", "1e-3", *extra])
    loader = RandomLatentLoader(global_batch // world, (4, 4, 8, 8), (8, 32), seed=3, rank=rank, world_size=world)
    trainer = Trainer(cfg, loader=loader, log=lambda *_: None)
    history = trainer.fit()
    state = {}
    for name, p in trainer.model.named_parameters():
        state[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().contiguous()
    if rank == 0:
        with open(os.path.join(out_dir, "history.json"), "w") as f:
            json.dump([m["loss"] for m in history], f)
        save_file(state, os.path.join(out_dir, "final.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears gloo down while another still talks to it
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]))
