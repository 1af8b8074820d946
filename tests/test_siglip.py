"""SigLIP's sigmoid loss: equal to the single-process loss over the global batch (2 and 3 gloo ranks,
float64, value and gradients including scale and bias), and rank by rank to open_clip's own distributed
SigLipLoss (each of its four text exchanges, point-to-point included); the bias survives export and
import; the engine trains with it under ZeRO 0-3 and gradient accumulation exactly as one process does."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import SigLipLoss as OpenClipSigLipLoss

from clip_pipe.config import LossConfig, ModelConfig
from clip_pipe.losses import SigLipLoss, build_loss
from clip_pipe.model import build_model, load_export, save_export
from tests.conftest import run_ranks
from tests.test_loss import (
    AT_100,
    NUM_LOCAL,
    PRECISIONS,
    TILE,
    aligned_batch,
    assert_matches_float64,
    distributed_results,
    global_batch,
    loss_and_grads,
)

BIAS = torch.tensor([-4.0], dtype=torch.float64)


def naive_sigmoid_loss(image, text, scale, bias):
    """The paper's definition over one batch: −mean over images of Σ_texts log σ(label · logit)."""
    logits = scale * image @ text.T + bias
    labels = 2 * torch.eye(len(image), dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / len(image)


@pytest.mark.parametrize("tile", [1, TILE, 1000])
def test_single_process_matches_definition_and_open_clip(tile):
    image, text, scale = global_batch(2)
    ours = loss_and_grads(SigLipLoss(tile_size=tile), image, text, scale, BIAS)
    definition = loss_and_grads(naive_sigmoid_loss, image, text, scale, BIAS)
    theirs = loss_and_grads(OpenClipSigLipLoss(), image, text, scale, BIAS)
    for key, value in definition.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-6, atol=1e-12, msg=key)
        torch.testing.assert_close(theirs[key], value, rtol=1e-6, atol=1e-12, msg=key)


# Aligned pairs at scale 100 and the initial bias: a positive's logit is about 100 · 0.995 − 10 = 89.5,
# whose exp overflows fp32 (e^88.7 is its largest), so softplus must not be log(1 + exp(z)).
AT_100_BIAS = torch.tensor([SigLipLoss.init_logit_bias], dtype=torch.float64)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_sigmoid_operating_point_matches_float64(precision):
    dtype = PRECISIONS[precision]
    image, text = aligned_batch(2, spread=0.0, dtype=dtype)  # random negatives, as a trained model's
    reference = loss_and_grads(naive_sigmoid_loss, image.double(), text.double(), AT_100, AT_100_BIAS)
    assert (100 * (image.double() * text.double()).sum(dim=1) - 10).min() > 89  # past fp32's exp
    got = loss_and_grads(SigLipLoss(tile_size=TILE), image, text, AT_100.float(), AT_100_BIAS.float())
    assert_matches_float64(got, reference, dtype)
    torch.testing.assert_close(got["bias_grad"].double(), reference["bias_grad"], rtol=1e-5, atol=0)


def test_sigmoid_loss_needs_a_bias_and_clamps_the_scale():
    image, text = aligned_batch(2, spread=0.0)
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(image, text, torch.tensor([10.0]))
    big = torch.tensor([250.0], requires_grad=True)
    loss = SigLipLoss()(image.float(), text.float(), big, AT_100_BIAS.float())
    loss.backward()
    assert big.grad.item() == 0.0
    # Against the definition at 100 in float64, not against the loss itself at 100 (inf == inf).
    expected = naive_sigmoid_loss(image, text, AT_100, AT_100_BIAS)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=0)


# open_clip's ways of passing the texts round the ranks: neighbour send/recv in both directions (its
# default) or one, an all-reduce per rank, or an all-gather (torch.distributed.nn, with gradients).
OPEN_CLIP_EXCHANGES = ("bidir", "shift", "reduce", "gather")


def _distributed_sigmoid(rank: int, world_size: int, out_path: str) -> None:
    dist.init_process_group("gloo")
    image, text, scale = global_batch(world_size)
    results = {
        "ours": distributed_results(
            rank, world_size, lambda r, w: SigLipLoss(r, w, tile_size=TILE), image, text, scale, BIAS
        )
    }
    for exchange in OPEN_CLIP_EXCHANGES:
        results[exchange] = distributed_results(
            rank, world_size, lambda r, w, e=exchange: OpenClipSigLipLoss(rank=r, world_size=w, dist_impl=e),
            image, text, scale, BIAS,
        )  # fmt: skip
    torch.save(results, f"{out_path}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_sigmoid_loss_equals_single_process(tmp_path, world_size):
    out = str(tmp_path / "grads")
    run_ranks(_distributed_sigmoid, world_size, out)
    image, text, scale = global_batch(world_size)
    reference = loss_and_grads(naive_sigmoid_loss, image, text, scale, BIAS)
    for rank in range(world_size):
        results = torch.load(f"{out}.{rank}", weights_only=True)
        got = results["ours"]
        rows = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
        torch.testing.assert_close(got["loss"], reference["loss"], rtol=1e-6, atol=0)
        for key in ("image_grad", "text_grad"):  # world_size × the mean loss's, as in test_loss.py
            torch.testing.assert_close(
                got[key] / world_size, reference[key][rows], rtol=1e-6, atol=0, msg=key
            )
        for key in ("scale_grad", "bias_grad"):
            torch.testing.assert_close(got[key], reference[key], rtol=1e-6, atol=0, msg=key)
        # Rank by rank, open_clip on the same rows: the same loss (this rank's images against every
        # text), the same gradients for this rank's features, scale and bias, with every exchange.
        for exchange in OPEN_CLIP_EXCHANGES:
            theirs = results[exchange]
            for key in ("rank_loss", "image_grad", "text_grad", "rank_scale_grad", "rank_bias_grad"):
                torch.testing.assert_close(
                    got[key], theirs[key], rtol=1e-10, atol=1e-15, msg=f"{exchange} {key}"
                )
    local_only = [
        naive_sigmoid_loss(
            image[r * NUM_LOCAL : (r + 1) * NUM_LOCAL], text[r * NUM_LOCAL : (r + 1) * NUM_LOCAL], scale, BIAS
        )
        for r in range(world_size)
    ]
    assert abs(sum(local_only).item() / world_size - reference["loss"].item()) > 1e-3


def test_siglip_model_carries_its_bias_through_export_and_import(tmp_path):
    torch.manual_seed(0)
    siglip = LossConfig(kind="siglip")
    ours = build_model(ModelConfig(name="clip-pipe-test"), siglip)
    model = ours.model
    assert model.logit_bias.shape == (1,) and model.logit_bias.item() == -10.0  # (1,): DeepSpeed's shape
    torch.testing.assert_close(model.logit_scale.exp(), torch.tensor([10.0]))
    with torch.no_grad():
        model.logit_bias.fill_(-7.5)  # not the init value, so a dropped bias would show
    path = save_export(model, ours.model_cfg, tmp_path / "ours")
    exported = torch.load(path, weights_only=True)
    assert exported["logit_bias"].shape == () and exported["logit_bias"].item() == -7.5  # open_clip's 0-dim
    # open_clip rebuilds it from the folder alone (the architecture dict asks for a bias) ...
    model_cfg = json.loads((path.parent / "open_clip_config.json").read_text())["model_cfg"]
    theirs = open_clip.model.CLIP(**model_cfg)
    open_clip.load_checkpoint(theirs, str(path), strict=True, weights_only=True)
    assert theirs.logit_bias.item() == -7.5
    # ... and so do we.
    assert load_export(path).model.logit_bias.item() == -7.5

    # An open_clip SigLIP-style state dict (its own config with init_logit_bias, 0-dim bias) fine-tunes here.
    open_clip_cfg = {**ours.model_cfg, "init_logit_bias": -10}
    theirs = open_clip.model.CLIP(**open_clip_cfg)
    with torch.no_grad():
        theirs.logit_bias.fill_(-3.25)
    assert theirs.logit_bias.shape == ()
    torch.save(theirs.state_dict(), tmp_path / "siglip.pt")
    back = build_model(ModelConfig(name="clip-pipe-test", pretrained=str(tmp_path / "siglip.pt")), siglip)
    assert back.model.logit_bias.shape == (1,) and back.model.logit_bias.item() == -3.25


def test_classifier_gives_sigmoid_probabilities_for_a_biased_model(tmp_path):
    from clip_pipe.classifier import ZeroShotClassifier

    torch.manual_seed(0)
    encoder = build_model(ModelConfig(name="clip-pipe-test"), LossConfig(kind="siglip"))
    clf = ZeroShotClassifier(encoder)
    features = F.normalize(torch.randn(2, clf.embed_dim), dim=-1)
    labels = ["red", "green", "blue"]
    ranked = clf.rank(features, labels)
    cosine = features @ clf.label_weights(labels)
    expected = torch.sigmoid(10.0 * cosine - 10.0)
    for row, predictions in enumerate(ranked):
        for p in predictions:
            assert p.probability == pytest.approx(expected[row, labels.index(p.label)].item(), rel=1e-5)
    assert sum(p.probability for p in ranked[0]) < 0.5  # independent sigmoids, not a softmax


# --- The engine, from the config: ZeRO 0-3 and accumulation equal one process on the whole batch ---

ENGINE_RUNS = ((0, 1), (1, 1), (2, 2), (3, 2))  # (ZeRO stage, accum_steps)


def _engine_cfg(stage: int, accum_steps: int, ds_json: str | None = None, eps: float = 1e-3):
    from tests.test_engine import make_cfg

    cfg = make_cfg(stage, ds_json, "loss.kind=siglip", "loss.tile_size=3", f"optim.accum_steps={accum_steps}")
    # The attention key biases have an exactly zero true gradient, so theirs is rounding noise that
    # depends on reduction order; the sigmoid loss's larger feature gradients make that noise larger
    # than InfoNCE's, and Adam scales it up: with test_engine's eps of 1e-4 merely reordering the
    # loss's sums moves them by 2e-6 in 5 steps. A larger eps keeps the comparison about the maths.
    cfg.optim.eps = eps
    return cfg


def _train_ranks(rank: int, world_size: int, out: str) -> None:
    from clip_pipe.distributed import env_from_os
    from clip_pipe.engine import Engine, init_process_group
    from clip_pipe.train import lr_at
    from tests.test_engine import NUM_LOCAL, NUM_STEPS, global_batch, partition_everything

    torch.set_num_threads(1)
    init_process_group(env_from_os())
    for stage, accum_steps in ENGINE_RUNS:
        cfg = _engine_cfg(stage, accum_steps, partition_everything(Path(out).parent))
        torch.manual_seed(0)
        encoder = build_model(cfg.model, cfg.loss)
        engine = Engine(encoder.model, cfg, world_size)
        loss_fn = build_loss(cfg.loss, rank, world_size)
        rows = slice(rank * NUM_LOCAL, (rank + 1) * NUM_LOCAL)
        for step in range(NUM_STEPS):
            images, texts = global_batch(step, encoder.tokenizer)
            engine.train_step(images[rows], texts[rows], loss_fn, lr_at(step, cfg.optim, NUM_STEPS))
        weights = engine.export_state_dict()
        if rank == 0:
            torch.save(weights, f"{out}.zero{stage}")


def reference_params() -> tuple[dict, dict]:
    from clip_pipe.model import export_state_dict
    from tests.test_engine import global_batch, train_reference

    cfg = _engine_cfg(0, 1)
    torch.manual_seed(0)
    encoder = build_model(cfg.model, cfg.loss)
    model = encoder.model
    initial = export_state_dict(model)
    train_reference(
        model, cfg.optim, lambda step: naive_sigmoid_loss(*model(*global_batch(step, encoder.tokenizer)))
    )
    return initial, export_state_dict(model)


@pytest.mark.slow
def test_two_rank_engine_with_sigmoid_loss_matches_single_process(tmp_path):
    out = str(tmp_path / "params")
    run_ranks(_train_ranks, 2, out, timeout=1200)  # 4 engines on a shared 2-core machine
    initial, reference = reference_params()
    assert abs(reference["logit_bias"] - initial["logit_bias"]).item() > 1e-4, "the bias must train"
    assert max((reference[k] - initial[k]).abs().max().item() for k in reference) > 1e-3
    for stage, accum_steps in ENGINE_RUNS:
        params = torch.load(f"{out}.zero{stage}", weights_only=True)
        assert params.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(
                params[key],
                reference[key],
                rtol=1e-5,
                atol=1e-6,
                msg=f"ZeRO-{stage} accum {accum_steps} {key}",
            )
