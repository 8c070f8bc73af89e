import torch

from usp_fast import dist


def test_single_process_world_and_collectives():
    rank, world, device = dist.init(use_deepspeed=False)
    assert (rank, world, device.type) == (0, 1, "cpu") and dist.is_main()
    t = torch.tensor([1.0, 3.0])
    assert torch.equal(dist.mean_across_ranks(t), t)
    dist.barrier()  # a world of one: returns at once
