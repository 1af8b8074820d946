"""The distributed embedding pass equals one process: 2 real gloo ranks under DeepSpeed ZeRO-3 (every
parameter partitioned, so each forward pass is a collective), with ranks holding unequal numbers of
images (41 and 25 samples over 2 ranks, batches of 4), of captions (1 to 3 per image), and an unreadable
sample on one rank. Every rank must end with the whole set, in order, and the same metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clip_pipe.config import load_config
from clip_pipe.eval import embed, read_eval_set, score, score_on_main
from clip_pipe.model import build_model
from tests.conftest import REPO, run_ranks, write_eval_set
from tests.eval_helpers import write_clip_benchmark_retrieval, write_pairs_set
from tests.test_engine import partition_everything

pytestmark = pytest.mark.slow
BATCH = 4


def _cfg(tmp: Path, stage: int):
    overrides = [
        "data.train=/unused",
        f"run.zero_stage={stage}",
        f"run.deepspeed_config={partition_everything(tmp)}",
    ]
    return load_config(REPO / "configs" / "tiny_test.yaml", overrides)


def _embed_ranks(rank: int, world_size: int, tmp: str, paths: list[str]) -> None:
    from clip_pipe.distributed import env_from_os
    from clip_pipe.engine import Engine, init_process_group

    torch.set_num_threads(1)
    init_process_group(env_from_os())
    cfg = _cfg(Path(tmp), stage=3)
    torch.manual_seed(0)
    encoder = build_model(cfg.model)
    engine = Engine(encoder.model, cfg, world_size)
    assert all(p.numel() == 0 for p in engine.module.parameters()), "ZeRO-3 must partition every parameter"
    args = (engine.module, encoder.preprocess_val, encoder.tokenizer)
    probe = embed(*args, read_eval_set(paths[0]), BATCH, rank, world_size, engine.device, engine.dtype)
    out = {}
    for path in paths:
        emb = embed(*args, read_eval_set(path), BATCH, rank, world_size, engine.device, engine.dtype)
        out[emb.name] = (vars(emb), score_on_main(emb, probe, rank, world_size))
    torch.save(out, Path(tmp) / f"rank{rank}.pt")  # every rank: each must hold the whole set


def test_two_rank_zero3_embedding_and_metrics_equal_one_process(tmp_path):
    paths = [
        str(write_pairs_set(tmp_path / "pairs", num_images=21, bad_keys=(6,), noise=True)),  # 41 readable
        str(write_clip_benchmark_retrieval(tmp_path / "cb_retrieval", num_images=25, noise=True)),
        str(write_eval_set(tmp_path / "classes", num_samples=41)),
    ]
    run_ranks(_embed_ranks, 2, str(tmp_path), paths, timeout=600)

    torch.manual_seed(0)
    encoder = build_model(_cfg(tmp_path, stage=0).model)
    args = (encoder.model, encoder.preprocess_val, encoder.tokenizer)
    probe = embed(*args, read_eval_set(paths[0]), BATCH)
    for rank in (0, 1):
        shares = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for path in paths:
            ref = embed(*args, read_eval_set(path), BATCH)
            got, results = shares[ref.name]
            for field in ("keys", "groups", "captions", "classnames", "num_skipped"):
                assert got[field] == getattr(ref, field), (ref.name, field)
            for field in ("labels", "text_owner"):
                assert (got[field] is None) == (getattr(ref, field) is None) and (
                    got[field] is None or torch.equal(got[field], getattr(ref, field))
                ), (ref.name, field)
            for field in ("images", "texts", "class_texts"):
                if getattr(ref, field) is not None:
                    torch.testing.assert_close(got[field], getattr(ref, field), rtol=0, atol=2e-6, msg=field)
            expected = score(ref, probe)
            assert results.keys() == expected.keys()
            for key, value in expected.items():
                assert results[key] == (
                    pytest.approx(value, abs=1e-6) if isinstance(value, float) else value
                ), key
    pairs = torch.load(tmp_path / "rank1.pt", weights_only=True)["pairs"][1]
    assert (pairs["num_samples"], pairs["num_skipped"], pairs["num_images"]) == (41, 1, 21)
    cb = torch.load(tmp_path / "rank1.pt", weights_only=True)["cb_retrieval"][1]
    assert cb["num_texts"] == sum(1 + i % 3 for i in range(25))
