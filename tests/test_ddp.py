"""DDP (gloo, CPU) with find_unused_parameters=False, as nnU-Net wraps the network: no unused trainable params."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from nnunet_dino.network import DinoUNet

    torch.manual_seed(0)
    net = DinoUNet(1, 2, backbone="dinov3_test_tiny")  # (SyncBatchNorm needs CUDA; nnU-Net converts on GPU)
    ddp = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=False)
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    ddp.train()
    for step in range(3):  # DDP reports unused parameters on the second iteration
        torch.manual_seed(rank * 10 + step)
        loss = ddp(torch.randn(2, 1, 64, 64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    results[rank] = float(sum(p.sum() for p in net.decoder.parameters()))
    dist.destroy_process_group()


def test_ddp_two_processes_no_unused_parameters():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(port, results), nprocs=2, join=True)
    assert abs(results[0] - results[1]) < 1e-4  # ranks stayed in sync
