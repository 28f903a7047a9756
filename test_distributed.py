"""What several ranks need, on 2 CPU ranks with gloo: the rate controller sees the global rate, the
all-gather of the contrastive loss returns each block's gradient to its rank, augmentations and
dropout masks differ between ranks and repeat with the seed, ranks that do not share a folder are
stopped, and the process group a GPU run gets. Run: python -m pytest -q test_distributed.py

Each 2-rank case runs this file under torchrun (the worker at the bottom)."""
import datetime
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def torchrun(case, tmp_path, check=True):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             __file__, case, str(tmp_path)], capture_output=True, text=True, timeout=180, cwd=HERE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_rate_controller_moves_alike_on_every_rank_with_the_global_rate(tmp_path):
    torchrun("rate", tmp_path)
    offsets = [json.loads((tmp_path / f"rate{r}.json").read_text()) for r in range(2)]
    assert offsets[0]["offset"] == offsets[1]["offset"]
    mean_rate = (offsets[0]["rate"] + offsets[1]["rate"]) / 2
    assert offsets[0]["rate"] != offsets[1]["rate"]
    assert offsets[0]["offset"] == pytest.approx(1.0 * (0.25 - mean_rate), abs=1e-6)  # rate_gain * (target - global rate)


def test_gather_with_grad_returns_each_blocks_gradient_to_its_rank(tmp_path):
    """A loss over the gathered batch, computed on every rank: each rank's gradient equals the sum over
    ranks of that loss's gradient for its rows, as a single process over the whole batch gives."""
    torchrun("gather", tmp_path)
    results = [torch.load(tmp_path / f"gather{r}.pt") for r in range(2)]
    full = torch.cat([r["x"] for r in results]).requires_grad_(True)
    loss = sum(((full * full.roll(1, 0)).sum() * (1 + r) for r in range(2)))  # rank r's loss, summed over ranks
    loss.backward()
    for r, result in enumerate(results):
        torch.testing.assert_close(result["gathered"], full.detach())
        torch.testing.assert_close(result["grad"], full.grad[4 * r:4 * (r + 1)])


def test_ranks_that_do_not_share_the_folder_are_stopped_with_one_line(tmp_path):
    torchrun("shared", tmp_path)  # the same folder: passes
    result = torchrun("not_shared", tmp_path, check=False)
    assert result.returncode != 0
    assert "rank(s) 1 do not see what rank 0 writes there" in result.stderr + result.stdout
    assert not any(name.startswith(".shared-check") for name in os.listdir(tmp_path / "rank0"))


def test_augmentations_and_dropout_differ_between_ranks_and_repeat(tmp_path):
    """train_imagenet.py's ImageFolder batches (data.folder_batches) of a folder holding one picture
    many times, and LoRA dropout after common.seed_per_rank: the two ranks draw different crops,
    flips and masks; the same seed draws the same again; the adapters themselves are alike."""
    torchrun("streams", tmp_path)
    ranks = [torch.load(tmp_path / f"streams{r}.pt") for r in range(2)]
    for r in ranks:
        torch.testing.assert_close(r["crops"], r["crops_again"], rtol=0, atol=0)
        torch.testing.assert_close(r["dropped"], r["dropped_again"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["lora_A"], ranks[1]["lora_A"], rtol=0, atol=0)
    for workers in (0, 1):  # the first batch of each rank, loaded without and with a worker process
        crops = [r["crops"][workers] for r in ranks]
        assert not torch.equal(crops[0], crops[1])
        assert not torch.equal(crops[0][0], crops[0][1])  # and they differ within a rank's batch
    assert not torch.equal(ranks[0]["dropped"], ranks[1]["dropped"])


def test_gpu_process_group_has_a_cpu_backend_and_a_long_timeout(monkeypatch):
    """On GPUs: gloo for CPU tensors (FSDP's CPU offload), NCCL for CUDA ones, the device given, and a
    timeout over NCCL's 10 minutes. The CUDA calls are stood in for: no GPU is needed."""
    import common
    calls = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(common.dist, "init_process_group", lambda backend, **kwargs: calls.update(backend=backend, **kwargs))
    monkeypatch.setattr(common.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(common.dist, "get_world_size", lambda: 1)
    assert common.setup_distributed() == (0, 1, torch.device("cuda", 0))
    assert set(calls["backend"].split(",")) == {"cpu:gloo", "cuda:nccl"} and calls["device_id"] == torch.device("cuda", 0)
    assert calls["timeout"] >= datetime.timedelta(minutes=30)


# ----------------------------------------------------------------------------- the worker, one case per torchrun

def worker(case, folder):
    import torch.distributed as dist

    from common import check_shared_folder, gather_with_grad, mean_over_ranks, setup_distributed
    from model import VisionTransformer, make_config
    rank, world, _ = setup_distributed()
    if case == "rate":
        torch.manual_seed(0)  # the same tower on both ranks, as DDP keeps it
        visual = VisionTransformer(make_config("tiny", compress=4))
        torch.manual_seed(rank)
        rate = visual(torch.randn(8, 3, 48, 48) * (1 + 3 * rank)).boundary_rate  # differs between the ranks
        visual.track_rate(mean_over_ranks(rate))
        with open(os.path.join(folder, f"rate{rank}.json"), "w") as f:
            json.dump({"rate": rate.item(), "offset": visual.boundary_predictor.rate_offset.item()}, f)
    elif case == "gather":
        torch.manual_seed(rank)
        x = torch.randn(4, 3, requires_grad=True)
        gathered = gather_with_grad(x)
        ((gathered * gathered.roll(1, 0)).sum() * (1 + rank)).backward()
        torch.save({"x": x.detach(), "gathered": torch.tensor(gathered.tolist()), "grad": x.grad},
                   os.path.join(folder, f"gather{rank}.pt"))
    elif case == "streams":
        import torchvision.transforms as T
        from PIL import Image
        from torchvision.datasets import ImageFolder

        from common import seed_per_rank
        from data import folder_batches
        from llama import LLAMA_CONFIGS, Llama, LoRALinear, add_lora
        if rank == 0:  # one picture, 8 times, in a folder both ranks read
            os.makedirs(os.path.join(folder, "images", "a"))
            picture = Image.fromarray(torch.arange(64 * 64 * 3, dtype=torch.uint8).view(64, 64, 3).numpy())
            for i in range(8):
                picture.save(os.path.join(folder, "images", "a", f"{i}.png"))
        dist.barrier()
        crops = T.Compose([T.RandomResizedCrop(16), T.RandomHorizontalFlip(), T.PILToTensor()])
        dataset = ImageFolder(os.path.join(folder, "images"), transform=crops)
        first, again = [], []
        for workers in (0, 1):  # without workers the transforms draw from torch's RNG, seeded as the scripts do
            for draws in (first, again):
                seed_per_rank(0)
                draws.append(next(iter(folder_batches(dataset, 4, seed=0, epoch=0, workers=workers)))[0])
        torch.manual_seed(0)  # as train_llava.py builds its model: alike on every rank
        llm = Llama(LLAMA_CONFIGS["tiny"])
        add_lora(llm, 4, 8.0, 0.5)
        lora = next(m for m in llm.modules() if isinstance(m, LoRALinear))
        torch.nn.init.ones_(lora.lora_B)  # B starts at zero: made non-zero so the output shows the masks
        llm.train()
        x = torch.ones(2, 8, lora.lora_A.shape[1])
        seed_per_rank(0)
        dropped = lora(x)
        seed_per_rank(0)
        torch.save({"crops": torch.stack(first), "crops_again": torch.stack(again), "dropped": dropped.detach(),
                    "dropped_again": lora(x).detach(), "lora_A": lora.lora_A.detach()},
                   os.path.join(folder, f"streams{rank}.pt"))
    elif case in ("shared", "not_shared"):
        check_shared_folder(os.path.join(folder, "rank0" if case == "shared" or rank == 0 else "rank1"), "--out_dir")
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    worker(*sys.argv[1:])
