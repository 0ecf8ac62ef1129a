"""DeepSpeed ZeRO-2 sums gradients of different parameters when the ranks' backward passes reach them in a
different order: a plain-PyTorch reproduction (no gapkern code), 2 CPU ranks over gloo.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 2 scripts/zero2_hook_order_repro.py

Two parameters ``w (4,)`` and ``b (4,)``; the loss is the same function on both ranks, but rank 1 builds
its graph so that autograd accumulates ``b`` before ``w`` (as gapkern's latent loss did for the head's
weight and bias on a batch without latent slots). ZeRO-2 copies each gradient into its reduce bucket in
the order its post-accumulate hook fires (deepspeed/runtime/zero/stage_1_and_2.py,
``reduce_independent_p_g_buckets_and_remove_grads``, 0.19.8 lines 1414-1470) and then reduces the bucket
elementwise across ranks (``average_tensor``, lines 1590-1720), so rank 0's ``w`` gradient is averaged
with rank 1's ``b`` gradient. DDP (and ZeRO-1, which reduces after the backward in parameter order) give
the true average. Prints both and exits 1 when they differ; with ``--same-order`` both ranks build the
same graph and ZeRO-2 is right.
"""
import sys

import deepspeed
import torch
import torch.distributed as dist


class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))
        self.b = torch.nn.Parameter(torch.zeros(4))

    def forward(self, x, swap: bool):
        if swap:  # the last-created node is run first by autograd: b's gradient accumulates first
            return (x * self.w).sum() + (2 * self.b).sum()
        return (2 * self.b).sum() + (x * self.w).sum()


def main():
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.arange(4.0) + 10 * rank
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "SGD", "params": {"lr": 1.0}},
              "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
    model = Two()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    order = []
    for name, p in engine.module.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: order.append(name))
    loss = engine(x, swap=rank == 1 and "--same-order" not in sys.argv)
    engine.backward(loss)
    engine.step()
    got = {name: (1.0 if name == "w" else 0.0) - p.detach() for name, p in engine.module.named_parameters()}
    xs = [torch.arange(4.0) + 10 * r for r in range(world)]
    want = {"w": sum(xs) / world, "b": torch.full((4,), 2.0)}  # SGD lr 1: the step is the mean gradient
    same = all(torch.allclose(got[k], want[k]) for k in want)
    if rank == 0:
        print(f"rank 0 hook order {order}; the mean gradients {({k: v.tolist() for k, v in want.items()})}")
        print(f"ZeRO-2 stepped by {({k: v.tolist() for k, v in got.items()})}: {'equal' if same else 'WRONG'}")
    dist.barrier()
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
