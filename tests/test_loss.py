"""The distributed loss equals the single-process loss over the whole global batch, in value and gradient."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss

from clip_pipe.loss import ClipLoss
from tests.conftest import run_ranks

NUM_LOCAL, DIM, WORLD = 6, 16, 2


def global_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(WORLD * NUM_LOCAL, DIM, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(WORLD * NUM_LOCAL, DIM, generator=g, dtype=torch.float64), dim=-1)
    return image, text, torch.tensor([12.5], dtype=torch.float64)


def naive_clip_loss(image, text, scale):
    logits = scale * image @ text.T
    labels = torch.arange(len(image))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_single_process_matches_definition_and_open_clip():
    image, text, scale = global_batch()
    ours = ClipLoss()(image.float(), text.float(), scale.float())
    torch.testing.assert_close(ours.double(), naive_clip_loss(image, text, scale), rtol=1e-6, atol=0)
    theirs = OpenClipLoss()(image.float(), text.float(), scale.float().squeeze())
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_logit_scale_is_clamped_at_100():
    image, text, _ = global_batch()
    big = torch.tensor([250.0], requires_grad=True)
    loss = ClipLoss()(image.float(), text.float(), big)
    torch.testing.assert_close(loss, ClipLoss()(image.float(), text.float(), torch.tensor([100.0])))
    loss.backward()
    assert big.grad.item() == 0.0


def _distributed_loss(rank: int, world_size: int, out_path: str) -> None:
    dist.init_process_group("gloo")
    image, text, scale = global_batch()
    rows = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
    # float64 end to end, so any difference from the reference is the algorithm's, not rounding's.
    local_image = image[rows].clone().requires_grad_(True)
    local_text = text[rows].clone().requires_grad_(True)
    local_scale = scale.clone().requires_grad_(True)
    loss = ClipLoss(rank, world_size)(local_image, local_text, local_scale)
    loss.backward()
    # DeepSpeed averages parameter gradients over ranks; do the same to the scale's gradient.
    mean_loss, scale_grad = loss.detach().clone(), local_scale.grad.clone()
    dist.all_reduce(mean_loss)
    dist.all_reduce(scale_grad)
    torch.save(
        {"loss": mean_loss / world_size, "image_grad": local_image.grad, "text_grad": local_text.grad,
         "scale_grad": scale_grad / world_size},
        f"{out_path}.{rank}",
    )  # fmt: skip
    dist.destroy_process_group()


def test_two_ranks_equal_single_process_loss_and_gradients(tmp_path):
    out = str(tmp_path / "grads")
    run_ranks(_distributed_loss, WORLD, out)

    image, text, scale = (t.requires_grad_(True) for t in global_batch())
    reference = ClipLoss()(image, text, scale)
    reference.backward()

    results = [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]
    for rank, result in enumerate(results):
        rows = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
        torch.testing.assert_close(result["loss"], reference.detach(), rtol=1e-6, atol=0)
        # Each rank's features get the gradient of the sum of all ranks' losses; the reference is
        # their mean, so the distributed gradient is world_size times the reference slice.
        torch.testing.assert_close(result["image_grad"] / WORLD, image.grad[rows], rtol=1e-6, atol=0)
        torch.testing.assert_close(result["text_grad"] / WORLD, text.grad[rows], rtol=1e-6, atol=0)
        torch.testing.assert_close(result["scale_grad"], scale.grad, rtol=1e-6, atol=0)
    # Negatives really crossed ranks: a loss over local rows only would differ.
    local_only = [
        ClipLoss()(
            image[r * NUM_LOCAL : (r + 1) * NUM_LOCAL], text[r * NUM_LOCAL : (r + 1) * NUM_LOCAL], scale
        )
        for r in range(WORLD)
    ]
    assert abs(sum(local_only).item() / WORLD - reference.item()) > 1e-3
