"""The distributed InfoNCE losses equal the single-process loss over the whole global batch, in value and
gradient: ClipLoss (the plain reference) and TiledClipLoss (blocks, O(B·tile) memory), at 2 and 3 ranks;
and, rank by rank, they equal open_clip's own distributed ClipLoss (local loss, gather with grad)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss

from clip_pipe.config import LossConfig
from clip_pipe.losses import (
    MAX_LOGIT_SCALE,
    ClipLoss,
    SigLipLoss,
    TiledClipLoss,
    WithImageSsl,
    build_loss,
)
from tests.conftest import run_ranks

NUM_LOCAL, DIM = 6, 16
# Tiles of 5 split 6 local rows 5 + 1 and 12 or 18 global columns 5 + 5 + 2 or 5 + 5 + 5 + 3: no block
# size divides the batch, so an off-by-one at a block edge shows.
TILE = 5


def global_batch(world_size: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(world_size * NUM_LOCAL, DIM, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(world_size * NUM_LOCAL, DIM, generator=g, dtype=torch.float64), dim=-1)
    return image.to(dtype), text.to(dtype), torch.tensor([12.5], dtype=torch.float64)


def aligned_batch(world_size: int, spread: float, dtype=torch.float64, seed: int = 0):
    """Features at CLIP's operating point, as a trained model gives them: each caption within a cosine of
    about 0.995 of its image. `spread` sets how alike the images are: at 0 they are random (cosines
    within about ±0.6 in 16 dimensions), at 10 they all lie near one direction (cosines above 0.97: hard
    negatives, and a loss of about 2). At the logit scale's ceiling of 100 the logits then reach 99,
    and exp(99) overflows fp32, whose largest number is about e^88.7: every log-sum-exp must subtract its
    maximum before it exponentiates."""
    g = torch.Generator().manual_seed(seed)
    num = world_size * NUM_LOCAL
    direction = torch.randn(DIM, generator=g, dtype=torch.float64)
    image = F.normalize(spread * direction + torch.randn(num, DIM, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(image + 0.02 * torch.randn(num, DIM, generator=g, dtype=torch.float64), dim=-1)
    return image.to(dtype), text.to(dtype)


AT_100 = torch.tensor([MAX_LOGIT_SCALE], dtype=torch.float64)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def assert_matches_float64(got: dict, reference: dict, dtype, rows=slice(None), world_size: int = 1) -> None:
    """`got`, from fp32 or bf16 features (the losses compute in fp32), against the float64 reference on the
    same numbers: the loss to fp32's rounding of logits near 100 (measured: 3e-6 relative); gradients to
    fp32's (2e-5 of the largest), or to bf16's (2^-8) where they come back in bf16. `world_size`: each
    rank's feature gradients are those of the sum of all ranks' losses, world_size times the mean's."""
    torch.testing.assert_close(got["loss"].double(), reference["loss"], rtol=2e-5, atol=0, msg="loss")
    tol = 1e-4 if dtype == torch.float32 else 2**-8
    for key in ("image_grad", "text_grad"):
        assert got[key].dtype == dtype, key
        expected = reference[key][rows] * world_size
        torch.testing.assert_close(
            got[key].double(), expected, rtol=tol, atol=tol * expected.abs().max().item(), msg=key
        )


def naive_clip_loss(image, text, scale):
    logits = scale * image @ text.T
    labels = torch.arange(len(image))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def loss_and_grads(loss_fn, image, text, scale, bias=None) -> dict:
    """The loss and its gradients with respect to every input, in one process."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (image, text, scale, bias) if t is not None]
    loss = loss_fn(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    names = ("image_grad", "text_grad", "scale_grad", "bias_grad")
    return {"loss": loss.detach(), **dict(zip(names, grads, strict=False))}


def test_single_process_matches_definition_and_open_clip():
    image, text, scale = global_batch(2)
    ours = ClipLoss()(image.float(), text.float(), scale.float())
    torch.testing.assert_close(ours.double(), naive_clip_loss(image, text, scale), rtol=1e-6, atol=0)
    theirs = OpenClipLoss()(image.float(), text.float(), scale.float().squeeze())
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("tile", [1, TILE, 12, 1000])
def test_tiled_equals_clip_loss_in_one_process(tile):
    image, text, scale = global_batch(2)
    expected = loss_and_grads(ClipLoss(), image, text, scale)
    got = loss_and_grads(TiledClipLoss(tile_size=tile), image, text, scale)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-12, msg=key)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("loss_name", ["clip", "tiled"])
def test_clip_operating_point_matches_float64(loss_name, precision):
    """Logit scale 100, aligned features, fp32 and bf16: the point a trained CLIP runs at."""
    dtype = PRECISIONS[precision]
    image, text = aligned_batch(2, spread=10.0, dtype=dtype)
    reference = loss_and_grads(naive_clip_loss, image.double(), text.double(), AT_100)
    assert 1 < reference["loss"].item() < 3  # hard negatives: the loss is not lost in the logits' rounding
    got = loss_and_grads(LOSSES[loss_name](0, 1), image, text, AT_100.float())
    assert_matches_float64(got, reference, dtype)


@pytest.mark.parametrize("loss_name", ["clip", "tiled"])
def test_logit_scale_is_clamped_at_100(loss_name):
    image, text = aligned_batch(2, spread=10.0)
    big = torch.tensor([250.0], requires_grad=True)
    loss = LOSSES[loss_name](0, 1)(image.float(), text.float(), big)
    # Against the definition at 100 in float64, not against the loss itself at 100 (inf == inf).
    expected = naive_clip_loss(image, text, AT_100)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=0)
    loss.backward()
    assert big.grad.item() == 0.0  # as autograd gives through clamp: nothing to learn above the ceiling


def test_a_shared_bias_changes_nothing_in_infonce():
    image, text, scale = global_batch(2)
    bias = torch.tensor([-3.0], dtype=torch.float64)
    plain = loss_and_grads(TiledClipLoss(tile_size=TILE), image, text, scale)
    biased = loss_and_grads(TiledClipLoss(tile_size=TILE), image, text, scale, bias)
    reference = loss_and_grads(ClipLoss(), image, text, scale, bias)
    for key in plain:
        torch.testing.assert_close(biased[key], plain[key], rtol=1e-12, atol=1e-15)
    assert biased["bias_grad"].shape == (1,) and reference["bias_grad"].abs().item() < 1e-12
    assert biased["bias_grad"].item() == 0.0


def test_build_loss_picks_the_configured_class():
    assert type(build_loss(LossConfig())) is TiledClipLoss
    loss_fn = build_loss(LossConfig(kind="siglip", tile_size=7), rank=1, world_size=3)
    assert type(loss_fn) is SigLipLoss and (loss_fn.rank, loss_fn.world_size, loss_fn.tile_size) == (1, 3, 7)
    loss_fn = build_loss(LossConfig(kind="siglip", image_ssl_weight=0.25), rank=1, world_size=3)
    assert type(loss_fn) is WithImageSsl and loss_fn.weight == 0.25
    assert type(loss_fn.image_text_loss) is SigLipLoss and loss_fn.image_ssl_loss.world_size == 3
    with pytest.raises(ValueError, match=r"loss\.kind"):
        LossConfig(kind="softmax")
    with pytest.raises(ValueError, match=r"loss\.tile_size"):
        LossConfig(tile_size=0)


def open_clip_loss(rank: int, world_size: int):
    """open_clip's ClipLoss as open_clip_train runs it with --local-loss --gather-with-grad; its gather is
    torch.distributed.nn.all_gather, a different collective from ours, so the two check each other."""
    theirs = OpenClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    return lambda image, text, scale: theirs(image, text, scale.squeeze(0))  # its logit_scale is 0-dim


LOSSES = {
    "clip": lambda r, w: ClipLoss(r, w),
    "tiled": lambda r, w: TiledClipLoss(r, w, tile_size=TILE),
    "open_clip": open_clip_loss,
}


def distributed_results(rank: int, world_size: int, make_loss, image, text, scale, bias=None) -> dict:
    """Run the loss on this rank's rows; return what the single-process reference must reproduce."""
    rows = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
    result = loss_and_grads(make_loss(rank, world_size), image[rows], text[rows], scale, bias)
    # This rank's own share, before averaging: what another implementation must give on the same rows.
    result.update(
        {f"rank_{key}": result[key] for key in ("loss", "scale_grad", "bias_grad") if key in result}
    )
    # The reference is the mean of the ranks' losses, which DeepSpeed's gradient averaging realises:
    # average the loss and the shared parameters' gradients (scale, bias) over ranks, as it does.
    for key in ("loss", "scale_grad", "bias_grad"):
        if key in result:
            value = result[key].clone()
            dist.all_reduce(value)
            result[key] = value / world_size
    return result


def _distributed_losses(rank: int, world_size: int, out_path: str) -> None:
    dist.init_process_group("gloo")
    results = {}
    # float64 end to end, so any difference from the reference is the algorithm's, not rounding's.
    image, text, scale = global_batch(world_size)
    for name, make_loss in LOSSES.items():
        results[name] = distributed_results(rank, world_size, make_loss, image, text, scale)
    # bf16 features, as the towers produce under run.precision=bf16.
    image16, text16, _ = global_batch(world_size, dtype=torch.bfloat16)
    results["tiled_bf16"] = distributed_results(rank, world_size, LOSSES["tiled"], image16, text16, scale)
    # At CLIP's operating point the ranks' partial column log-sum-exps are near 100: their combination
    # across ranks (gather.all_reduce_logsumexp) must shift by the max too.
    for precision, dtype in PRECISIONS.items():
        image100, text100 = aligned_batch(world_size, spread=10.0, dtype=dtype)
        results[f"tiled_at_100_{precision}"] = distributed_results(
            rank, world_size, LOSSES["tiled"], image100, text100, AT_100.float()
        )
    torch.save(results, f"{out_path}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_losses_equal_single_process_loss_and_gradients(tmp_path, world_size):
    out = str(tmp_path / "grads")
    run_ranks(_distributed_losses, world_size, out)
    image, text, scale = global_batch(world_size)
    reference = loss_and_grads(ClipLoss(), image, text, scale)
    torch.testing.assert_close(reference["loss"], naive_clip_loss(image, text, scale), rtol=1e-12, atol=0)
    image16, text16, _ = global_batch(world_size, dtype=torch.bfloat16)
    # The reference for bf16 inputs: the same bf16 numbers, in float64.
    reference16 = loss_and_grads(ClipLoss(), image16.double(), text16.double(), scale)
    references_at_100 = {}
    for precision, dtype in PRECISIONS.items():
        image100, text100 = aligned_batch(world_size, spread=10.0, dtype=dtype)
        references_at_100[precision] = loss_and_grads(
            naive_clip_loss, image100.double(), text100.double(), AT_100
        )

    for rank in range(world_size):
        results = torch.load(f"{out}.{rank}", weights_only=True)
        rows = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
        for name in LOSSES:
            got = results[name]
            torch.testing.assert_close(got["loss"], reference["loss"], rtol=1e-6, atol=0, msg=name)
            # Each rank's features get the gradient of the sum of all ranks' losses; the reference is
            # their mean, so the distributed gradient is world_size times the reference slice.
            for key in ("image_grad", "text_grad"):
                torch.testing.assert_close(
                    got[key] / world_size, reference[key][rows], rtol=1e-6, atol=0, msg=f"{name} {key}"
                )
            torch.testing.assert_close(got["scale_grad"], reference["scale_grad"], rtol=1e-6, atol=0)
        # bf16 in, fp32 accumulation: the loss is as exact as fp32 (1e-5 here, ~1e-2 if summed in bf16);
        # gradients come back in bf16, so they match to bf16's rounding (2^-8 relative).
        got = results["tiled_bf16"]
        assert got["image_grad"].dtype == torch.bfloat16
        torch.testing.assert_close(got["loss"].double(), reference16["loss"], rtol=1e-5, atol=0)
        for key in ("image_grad", "text_grad"):
            expected = reference16[key][rows] * world_size
            torch.testing.assert_close(
                got[key].double(), expected, rtol=2**-8, atol=2**-8 * expected.abs().max().item(), msg=key
            )
        torch.testing.assert_close(got["scale_grad"], reference16["scale_grad"], rtol=1e-5, atol=0)
        for precision, dtype in PRECISIONS.items():
            assert_matches_float64(
                results[f"tiled_at_100_{precision}"], references_at_100[precision], dtype, rows, world_size
            )

        # Rank by rank, open_clip's own distributed loss on the same rows: the same local loss and the
        # same feature gradients (each rank's features get every rank's loss's gradient through either
        # gather). ClipLoss splits the scale's gradient as open_clip does; TiledClipLoss splits it by
        # the blocks each rank computed, so only their mean over ranks (checked above) must agree.
        theirs = results["open_clip"]
        for name in ("clip", "tiled"):
            got = results[name]
            torch.testing.assert_close(got["rank_loss"], theirs["rank_loss"], rtol=1e-12, atol=0, msg=name)
            for key in ("image_grad", "text_grad"):
                torch.testing.assert_close(got[key], theirs[key], rtol=1e-10, atol=1e-15, msg=f"{name} {key}")
        torch.testing.assert_close(
            results["clip"]["rank_scale_grad"], theirs["rank_scale_grad"], rtol=1e-10, atol=0
        )

    # Negatives really crossed ranks: a loss over local rows only would differ.
    local_only = [
        ClipLoss()(
            image[r * NUM_LOCAL : (r + 1) * NUM_LOCAL], text[r * NUM_LOCAL : (r + 1) * NUM_LOCAL], scale
        )
        for r in range(world_size)
    ]
    assert abs(sum(local_only).item() / world_size - reference["loss"].item()) > 1e-3
