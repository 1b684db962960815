"""Writes real DeepSpeed checkpoints with DeepSpeed itself (a fixture generator for tests/test_deepspeed.py;
DeepSpeed is a test dependency only, the library never imports it).

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/deepspeed_app.py OUT_DIR CONFIG [CONFIG ...]

CONFIG is ``<stage>-<dtype>`` (stage 0..3, dtype fp32 / bf16 / fp16), e.g. ``2-fp32``. Each config trains
the same small model (odd sizes, so partitions are padded; two parameter groups; a frozen parameter; a
float and an integer buffer; an embedding tied to the output head) for STEPS steps with AdamW and calls
``save_checkpoint(OUT_DIR/CONFIG)``, so OUT_DIR/CONFIG holds ``latest`` and ``global_step<STEPS>/``.
Rank 0 also writes OUT_DIR/CONFIG/batches.pt: the batches every rank trains on after the checkpoint
(for the resume tests) and, with ``--continue K``, OUT_DIR/CONFIG/after.pt: the fp32 weights after K more steps.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

VOCAB, WIDTH = 13, 7
STEPS = 3
MICRO_BATCH = 4


class TiedNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, WIDTH)
        self.body = torch.nn.Linear(WIDTH, WIDTH)
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.frozen = torch.nn.Linear(WIDTH, WIDTH)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.emb.weight  # tied (shared) parameter
        self.register_buffer("scale", torch.linspace(0.5, 1.5, WIDTH))
        self.register_buffer("count", torch.tensor(7, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        return self.head(self.norm(self.body(h)) * self.scale.to(h.dtype) + self.frozen(h))


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    big = int(os.environ.get("DS_APP_BIG_MIB", "0"))  # bench/bench_deepspeed.py: layers of 4 MiB instead
    if big:
        return torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(max(1, big // 4))])
    return TiedNet()


def param_groups(model: torch.nn.Module) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight") and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not any(p is q for q in decay)]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0, "lr": 0.02}]


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model), lr=0.01, betas=(0.9, 0.99), eps=1e-6)


def batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    if os.environ.get("DS_APP_BIG_MIB"):
        return torch.randn(MICRO_BATCH, 1024, generator=g)
    return torch.randint(0, VOCAB, (MICRO_BATCH, 5), generator=g)


def loss_of(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if os.environ.get("DS_APP_BIG_MIB"):
        return out.float().pow(2).mean()
    return torch.nn.functional.cross_entropy(out.float().reshape(-1, VOCAB), x.roll(1, 1).reshape(-1))


def run(out: str, config: str, more: int) -> None:
    import deepspeed

    stage, dtype = config.split("-")
    world = dist.get_world_size()
    ds_config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": int(stage)}, "zero_allow_untested_optimizer": True,
                 "steps_per_print": 10 ** 6, "wall_clock_breakdown": False, "gradient_clipping": 0.0,
                 "bf16": {"enabled": dtype == "bf16"}, "fp16": {"enabled": dtype == "fp16", "initial_scale_power": 8}}
    model = make_model()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model), config=ds_config)
    rank = dist.get_rank()
    for step in range(STEPS):
        x = batch(step, rank).to(engine.device)
        engine.backward(loss_of(engine(x), x))
        engine.step()
    folder = os.path.join(out, config)
    engine.save_checkpoint(folder)
    if rank == 0:
        torch.save({"world": world, "steps": STEPS,
                    "batches": [[batch(STEPS + k, r) for r in range(world)] for k in range(max(more, 2))]},
                   os.path.join(folder, "batches.pt"))
    if more:
        for step in range(STEPS, STEPS + more):
            x = batch(step, rank).to(engine.device)
            engine.backward(loss_of(engine(x), x))
            engine.step()
        engine.save_checkpoint(os.path.join(out, config + "-after"))
    dist.barrier()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--continue", dest="more", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import deepspeed
    import deepspeed.ops

    # DeepSpeed's CPU accelerator JIT-builds a shared-memory all-reduce with g++ on first use (minutes on
    # 2 cores); gloo does the same reductions, so the fixtures skip the build.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed("gloo")
    for cfg in args.configs:
        run(args.out, cfg, args.more)
