"""The image–image term: NT-Xent against its definition and across real gloo ranks; the production
objectives with it (tiled InfoNCE or SigLIP, plus the term) across ranks against a float64 reference; the
views the loader makes; the projection head's place in the model and its absence from the open_clip export."""

from __future__ import annotations

import itertools
import random

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from clip_pipe.config import ImageSslConfig, LossConfig, ModelConfig, load_config
from clip_pipe.data.augment import TrainAugment
from clip_pipe.data.views import TwoViews
from clip_pipe.losses import ClipLoss, build_loss
from clip_pipe.losses.ssl import NtXentLoss, WithImageSsl
from clip_pipe.model import add_image_ssl_head, build_model, export_state_dict, save_export
from tests.conftest import run_ranks

NUM_LOCAL, DIM = 5, 8


def naive_nt_xent(view_features: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent written out: z = [first views; second views], the positive of i is i ± N."""
    z = F.normalize(torch.cat([view_features[:, 0], view_features[:, 1]]), dim=-1)  # (2N, P)
    num = view_features.shape[0]
    losses = []
    for i in range(2 * num):
        similarity = (z[i] * z).sum(-1) / temperature  # (2N,)
        others = torch.cat([similarity[:i], similarity[i + 1 :]])
        positive = similarity[(i + num) % (2 * num)]
        losses.append(-(positive - torch.logsumexp(others, dim=0)))
    return torch.stack(losses).mean()


def global_views(world_size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    views = torch.randn(world_size * NUM_LOCAL, 1, DIM, generator=g, dtype=torch.float64)
    # Second views near the first, so positives are not chance and the loss is far from log(2N - 1).
    return torch.cat([views, views + 0.5 * torch.randn(views.shape, generator=g, dtype=torch.float64)], 1)


def test_single_process_matches_the_definition():
    views = global_views(3)
    for temperature in (0.1, 0.5):
        ours = NtXentLoss(temperature=temperature)(views)
        torch.testing.assert_close(ours, naive_nt_xent(views, temperature), rtol=1e-10, atol=0)
    assert ours < torch.log(torch.tensor(2.0 * len(views) - 1)) - 0.5  # the positives are found


def _distributed_nt_xent(rank: int, world_size: int, out_path: str) -> None:
    dist.init_process_group("gloo")
    views = global_views(world_size)
    rows = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
    local = views[rows].clone().requires_grad_(True)  # float64 end to end
    loss = NtXentLoss(rank, world_size, temperature=0.2)(local)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.save({"loss": mean_loss / world_size, "grad": local.grad}, f"{out_path}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_equal_single_process_loss_and_gradients(tmp_path, world_size):
    out = str(tmp_path / "grads")
    run_ranks(_distributed_nt_xent, world_size, out)
    views = global_views(world_size).requires_grad_(True)
    reference = naive_nt_xent(views, 0.2)
    reference.backward()
    for rank in range(world_size):
        result = torch.load(f"{out}.{rank}", weights_only=True)
        rows = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
        torch.testing.assert_close(result["loss"], reference.detach(), rtol=1e-10, atol=0)
        # Each rank's views get the gradient of the sum of every rank's loss; the reference is the mean.
        torch.testing.assert_close(result["grad"] / world_size, views.grad[rows], rtol=1e-10, atol=1e-14)
    # Negatives really crossed ranks: the mean of per-rank losses over local views alone differs.
    local_only = sum(
        naive_nt_xent(views[r * NUM_LOCAL : (r + 1) * NUM_LOCAL], 0.2) for r in range(world_size)
    )
    assert abs(local_only.item() / world_size - reference.item()) > 1e-2


# --- The production objectives: what build_loss gives the trainer with loss.image_ssl_weight > 0 ---

OBJECTIVE_WEIGHT, OBJECTIVE_TEMPERATURE = 0.7, 0.2


def objective_inputs(world_size: int) -> dict[str, torch.Tensor]:
    """A float64 global batch: features and scale as in test_loss.py, the views' head outputs, a bias."""
    from tests.test_loss import global_batch
    from tests.test_siglip import BIAS

    image, text, scale = global_batch(world_size, seed=3)
    g = torch.Generator().manual_seed(4)
    views = torch.randn(len(image), 1, DIM, generator=g, dtype=torch.float64)
    views = torch.cat([views, views + 0.5 * torch.randn(views.shape, generator=g, dtype=torch.float64)], 1)
    return {"image_features": image, "text_features": text, "logit_scale": scale, "view_features": views,
            "logit_bias": BIAS}  # fmt: skip


def reference_objective(kind: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Written out over the whole global batch in one process: the image–text loss's definition plus the
    weight times SimCLR's NT-Xent's."""
    from tests.test_loss import naive_clip_loss
    from tests.test_siglip import naive_sigmoid_loss

    image, text, scale = inputs["image_features"], inputs["text_features"], inputs["logit_scale"]
    if kind == "siglip":
        image_text = naive_sigmoid_loss(image, text, scale, inputs["logit_bias"])
    else:
        image_text = naive_clip_loss(image, text, scale)
    return image_text + OBJECTIVE_WEIGHT * naive_nt_xent(inputs["view_features"], OBJECTIVE_TEMPERATURE)


def objective_names(kind: str) -> list[str]:
    names = ["image_features", "text_features", "logit_scale", "view_features"]
    return [*names, "logit_bias"] if kind == "siglip" else names  # an InfoNCE model has no bias


def _distributed_objectives(rank: int, world_size: int, out_path: str) -> None:
    from tests.test_loss import NUM_LOCAL as NUM_LOCAL_PAIRS
    from tests.test_loss import TILE

    dist.init_process_group("gloo")
    results = {}
    for kind in ("infonce", "siglip"):
        ssl = ImageSslConfig(temperature=OBJECTIVE_TEMPERATURE)
        cfg = LossConfig(kind=kind, tile_size=TILE, image_ssl_weight=OBJECTIVE_WEIGHT, image_ssl=ssl)
        rows = slice(rank * NUM_LOCAL_PAIRS, (rank + 1) * NUM_LOCAL_PAIRS)
        inputs = {}
        for name, value in objective_inputs(world_size).items():
            if name in objective_names(kind):
                local = value[rows] if name.endswith("_features") else value
                inputs[name] = local.clone().requires_grad_(True)
        loss = build_loss(cfg, rank, world_size)(**inputs)  # called by name, as Engine.train_step does
        grads = torch.autograd.grad(loss, list(inputs.values()))
        results[kind] = {"loss": loss.detach(), **{name: g for name, g in zip(inputs, grads, strict=True)}}
    torch.save(results, f"{out_path}.{rank}")
    dist.destroy_process_group()


def test_production_objectives_with_the_image_term_equal_a_float64_reference(tmp_path):
    """Tiled InfoNCE + NT-Xent and SigLIP + NT-Xent, as build_loss composes them, at 2 gloo ranks: the mean
    of the ranks' losses, and every gradient (features, views, scale, bias), against one process."""
    from tests.test_loss import NUM_LOCAL as NUM_LOCAL_PAIRS

    world_size, out = 2, str(tmp_path / "objectives")
    run_ranks(_distributed_objectives, world_size, out)
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(world_size)]
    for kind in ("infonce", "siglip"):
        inputs = {
            name: value.clone().requires_grad_(True)
            for name, value in objective_inputs(world_size).items()
            if name in objective_names(kind)
        }
        reference = reference_objective(kind, inputs)
        grads = dict(zip(inputs, torch.autograd.grad(reference, list(inputs.values())), strict=True))
        # The term really weighs: the objective without it is far off.
        assert OBJECTIVE_WEIGHT * naive_nt_xent(inputs["view_features"], OBJECTIVE_TEMPERATURE) > 0.1
        mean_loss = sum(r[kind]["loss"] for r in ranks) / world_size
        torch.testing.assert_close(mean_loss, reference.detach(), rtol=1e-10, atol=0, msg=kind)
        for rank, results in enumerate(ranks):
            rows = slice(rank * NUM_LOCAL_PAIRS, (rank + 1) * NUM_LOCAL_PAIRS)
            for name in ("image_features", "text_features", "view_features"):
                # Each rank's rows get the gradient of the sum of all ranks' losses; the reference is their mean.
                torch.testing.assert_close(
                    results[kind][name] / world_size, grads[name][rows], rtol=1e-10, atol=1e-14,
                    msg=f"{kind} {name} rank {rank}",
                )  # fmt: skip
        for name in ("logit_scale", "logit_bias"):  # shared: DeepSpeed averages their gradients over ranks
            if name in grads:
                mean_grad = sum(r[kind][name] for r in ranks) / world_size
                torch.testing.assert_close(
                    mean_grad, grads[name], rtol=1e-10, atol=1e-14, msg=f"{kind} {name}"
                )


def test_with_image_ssl_adds_the_weighted_term_to_the_image_text_loss():
    g = torch.Generator().manual_seed(0)
    image, text = (F.normalize(torch.randn(4, DIM, generator=g), dim=-1) for _ in range(2))
    views, scale = torch.randn(4, 2, DIM, generator=g), torch.tensor([10.0])
    combined = WithImageSsl(ClipLoss(), NtXentLoss(temperature=0.1), weight=0.5)
    expected = ClipLoss()(image, text, scale) + 0.5 * naive_nt_xent(views, 0.1)
    actual = combined(image_features=image, text_features=text, logit_scale=scale, view_features=views)
    torch.testing.assert_close(actual, expected)
    assert combined.max_logit_scale == 100.0


def test_config_section_is_checked():
    cfg = load_config(None, ["data.train=x", "loss.image_ssl_weight=1", "loss.image_ssl.crop_scale=[0.2, 1]"])
    assert cfg.loss.image_ssl_weight == 1.0 and cfg.loss.image_ssl.crop_scale == [0.2, 1.0]
    assert load_config(None, ["data.train=x"]).loss.image_ssl_weight == 0.0  # off by default
    for bad, match in (
        ("loss.image_ssl_weight=-1", "image_ssl_weight must be >= 0"),
        ("loss.image_ssl.crop_scale=[0.5, 0.2]", "crop_scale"),
        ("loss.image_ssl.temperature=0", "temperature must be > 0"),
        ("loss.image_ssl.blur_p=2", "blur_p must be in"),
        ("loss.image_ssl.blur=0.5", "unknown config key 'loss.image_ssl.blur'"),
    ):
        with pytest.raises(ValueError, match=match):
            load_config(None, ["data.train=x", bad])


PREPROCESS_CFG = {"size": 16, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def test_two_views_are_random_but_seeded_and_configurable():
    from PIL import Image

    image = Image.effect_noise((24, 24), 60).convert("RGB")
    views = TwoViews(ImageSslConfig(), PREPROCESS_CFG)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = views(image, random.Random(0))
    assert first.shape == (2, 3, 16, 16) and first.dtype == torch.uint8  # normalised on the rank
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(views(image, random.Random(1)), first)
    # Drawn from the given generator alone: torch's global one, which the training step shares with a
    # loader thread, is neither read nor advanced.
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    torch.testing.assert_close(views(image, random.Random(0)), first, rtol=0, atol=0)
    # Every augmentation off: both views are the whole image, resized and normalised.
    plain = ImageSslConfig(
        crop_scale=[1, 1], flip_p=0, color_jitter=0, color_jitter_p=0, grayscale_p=0, blur_p=0
    )
    a, b = TwoViews(plain, {**PREPROCESS_CFG, "size": 24})(image, random.Random(0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a = TrainAugment(24, PREPROCESS_CFG["mean"], PREPROCESS_CFG["std"]).normalize(a)
    expected = (
        torch.tensor(list(image.tobytes()), dtype=torch.float32).view(24, 24, 3).permute(2, 0, 1) / 255 - 0.5
    ) / 0.25
    torch.testing.assert_close(a, expected, rtol=0, atol=1e-5)


def test_stream_views_come_from_one_decode_and_resume_exactly(color_shards, monkeypatch):

    import clip_pipe.data.stream
    from clip_pipe.config import SourceConfig
    from clip_pipe.data import StreamPositions, build_stream, list_sources
    from clip_pipe.data.order import OrderSpec

    sources = list_sources([SourceConfig([str(color_shards)])])
    tokenizer = open_clip.get_tokenizer("clip-pipe-test")
    augment = TrainAugment(16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    views = TwoViews(ImageSslConfig(), PREPROCESS_CFG)
    num_decodes = 0
    real_decode = clip_pipe.data.stream.decode_uint8

    def counting_decode(sample):
        nonlocal num_decodes
        num_decodes += 1
        return real_decode(sample)

    monkeypatch.setattr(clip_pipe.data.stream, "decode_uint8", counting_decode)

    def batches(with_views=True, rank=0, world_size=1, saved=None, step=0, num_batches=12):
        stream, _ = build_stream(
            sources, 12, augment, tokenizer, rank, world_size, num_streams=6, seed=3, shuffle_buffer=12,
            saved=saved, step=step, views=views if with_views else None,
        )  # fmt: skip
        return list(itertools.islice(iter(stream), num_batches))

    full = batches()
    assert num_decodes == 12 * 12, "each image decoded once, however many views"
    assert all(b["views"].shape == (12, 2, 3, 16, 16) for b in full)
    assert not torch.equal(full[0]["views"][:, 0], full[0]["views"][:, 1])
    # The views draw after the main augmentation: the images are those of a run without views.
    plain = batches(with_views=False)
    assert "views" not in plain[0]
    for ours, theirs in zip(full, plain, strict=True):
        torch.testing.assert_close(ours["images"], theirs["images"], rtol=0, atol=0)
    # Resumed from a checkpoint's positions as rank 1 of 2: its half of the same samples, same views.
    positions = StreamPositions({}, -1)
    for batch in full[:5]:
        positions.advance(batch)
    specs = [OrderSpec(sources[0].name, [s.num_samples for s in sources[0].shards], 1.0)]
    saved = StreamPositions.merge([positions.to_list()], specs, [6], 3, 12).to_dict()
    resumed = batches(rank=1, world_size=2, saved=saved, step=5, num_batches=7)
    for ours, theirs in zip(resumed, full[5:], strict=True):
        assert ours["keys"] == theirs["keys"][6:]
        torch.testing.assert_close(ours["views"], theirs["views"][6:], rtol=0, atol=0)


def test_head_trains_with_the_model_but_is_left_out_of_the_open_clip_export(tmp_path):
    torch.manual_seed(0)
    encoder = build_model(ModelConfig(name="clip-pipe-test"))
    add_image_ssl_head(encoder)
    head_keys = [k for k in encoder.model.state_dict() if k.startswith("image_ssl_head.")]
    assert head_keys and any(p is encoder.model.image_ssl_head[0].weight for p in encoder.model.parameters())
    assert not any(k.startswith("image_ssl_head.") for k in export_state_dict(encoder.model))
    # open_clip loads the export strictly, and embeds exactly as we do.
    theirs = open_clip.create_model(
        "clip-pipe-test", pretrained=str(save_export(encoder.model, encoder.model_cfg, tmp_path))
    )
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            theirs.eval().encode_image(images), encoder.model.eval().encode_image(images), rtol=0, atol=0
        )
