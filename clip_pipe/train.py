"""The training loop: one readable `while step < num_steps` loop that ends with evaluation and a report.

Run directory (`run.out_dir`):
    config.yaml         the resolved config        ds_config.json   the DeepSpeed config it generated
    train.log           the log                    metrics.jsonl    one record per logged step / eval
    training.png        loss, lr, throughput       eval.json        final results of every eval set
    zeroshot.json       the classification sets' part of eval.json, as before eval.json existed
    report/             index.html (self-contained) and its PNGs; figures.json holds their data
    checkpoints/        resumable DeepSpeed checkpoints, each with an exported `model.safetensors`
    model.safetensors + open_clip_config.json      the final model, loadable by open_clip
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from clip_pipe.checkpoints import set_latest
from clip_pipe.config import OptimConfig, TrainConfig, save_config
from clip_pipe.data import (
    DataOrder,
    OrderSpec,
    Source,
    StreamPositions,
    batch_loader,
    build_stream,
    list_sources,
    shard_reader,
)
from clip_pipe.data.augment import TrainAugment
from clip_pipe.data.views import TwoViews
from clip_pipe.distributed import env_from_os, threads_per_rank
from clip_pipe.engine import Engine, init_process_group
from clip_pipe.eval import configured_sets, embed, format_results, logged_metrics, score_on_main
from clip_pipe.eval.figures import figure_data
from clip_pipe.eval.report import write_report
from clip_pipe.losses import MAX_LOGIT_SCALE, build_loss
from clip_pipe.metrics import MetricsLog, plot_metrics, setup_logging
from clip_pipe.model import DualEncoder, add_image_ssl_head, build_model, save_export, set_patch_dropout

log = logging.getLogger(__name__)

# SLURM sends SIGUSR1 ahead of a time limit or preemption when the job asks for it (--signal=USR1@s),
# and SIGTERM when it cancels or preempts a job outright.
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Training stopped early on a signal, after saving a checkpoint to resume from (`--resume latest`)."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"preempted at step {step}; resume from {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class _StopRequest:
    """A signal handler that only records the signal; the step loop acts on it at a step boundary."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        self.signum = signum


@contextmanager
def stop_on_signals(signals=PREEMPTION_SIGNALS) -> Iterator[_StopRequest]:
    """Catch `signals` while training; the handlers in place before are put back afterwards."""
    request = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # Python delivers signals to the main thread only; nothing to install
        return
    previous = {signum: signal.signal(signum, request) for signum in signals}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def lr_at(step: int, optim: OptimConfig, num_steps: int) -> float:
    """Learning rate for the update made at `step` (0-based): linear warmup, then cosine or flat; in the
    last `optim.tune_steps` (the unmasked tune), a second decay from `optim.tune_lr`."""
    num_main_steps = num_steps - optim.tune_steps
    if optim.tune_steps and step >= num_main_steps:
        peak = optim.lr / 100 if optim.tune_lr is None else optim.tune_lr
        return _decay(step - num_main_steps, optim.tune_steps, peak, min(optim.min_lr, peak), optim.schedule)
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    return _decay(
        step - optim.warmup_steps, num_main_steps - optim.warmup_steps, optim.lr, optim.min_lr, optim.schedule
    )


def _decay(step: int, num_steps: int, peak: float, floor: float, schedule: str) -> float:
    if schedule == "constant":
        return peak
    progress = step / max(1, num_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def masked_at(step: int, cfg: TrainConfig) -> bool:
    """Whether the update at `step` trains with patch dropout: all but the last `optim.tune_steps`."""
    return cfg.model.patch_dropout > 0 and step < cfg.run.steps - cfg.optim.tune_steps


def train(cfg: TrainConfig, resume: str | None = None) -> dict:
    """Train as configured, then run zero-shot eval. Returns {eval set name: results} (every rank).

    SIGUSR1 or SIGTERM on any rank makes every rank save a checkpoint at the end of the current step
    and raise `Preempted`.
    """
    with stop_on_signals() as stop:
        return _train(cfg, resume, stop)


def _train(cfg: TrainConfig, resume: str | None, stop: _StopRequest) -> dict:
    env = env_from_os()
    torch.set_num_threads(threads_per_rank(env, cfg.run.threads_per_rank))
    run_dir, checkpoint_dir = cfg.run.dir, cfg.run.dir / "checkpoints"
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise ValueError(f"{run_dir} already holds a run: pass --resume latest, or set another run.name")
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, env.is_main)
    # Fail on a bad path, an unreachable store or bad credentials now, not after the process group
    # and model are up.
    sources = list_sources(cfg.data.source_list, cfg.data.timeout_s, cfg.data.counts_file)
    reader = shard_reader(cfg.data, [shard for source in sources for shard in source.shards])
    eval_sets, probe_set = configured_sets(cfg.eval)

    init_process_group(env, cfg.run.collective_timeout_s)
    torch.manual_seed(cfg.run.seed)  # every rank builds the same initial weights
    encoder = build_model(cfg.model, cfg.loss)
    loss_fn, views = build_loss(cfg.loss, env.rank, env.world_size), None
    if cfg.loss.image_ssl_weight > 0:
        add_image_ssl_head(encoder)
        views = TwoViews(cfg.loss.image_ssl, encoder.model.visual.preprocess_cfg)
    engine = Engine(encoder.model, cfg, env.world_size)
    global_batch = cfg.data.batch_size * env.world_size
    metrics = MetricsLog(run_dir / "metrics.jsonl", cfg.run.report_to)

    step, saved_data, num_skipped = 0, None, 0
    if resume:
        state = engine.load(checkpoint_dir, tag=None if resume == "latest" else resume)
        if state is None:
            log.info("no checkpoint in %s: starting from step 0", checkpoint_dir)
        else:
            step = state["step"]
            # The job's count so far (all ranks'), carried by one rank so that the sum over ranks stays right.
            num_skipped = state.get("num_skipped", 0) if env.is_main else 0
            log.info("resumed from %s at step %d", checkpoint_dir, step)
            saved_data = state.get("data")
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(engine.config, indent=2))
        metrics.truncate_after(step)

    # The data order: a function of the data, the seed and the step, whatever the ranks and workers, so
    # a checkpoint resumes exactly on another number of either (docs/design.md, "The elastic order").
    stream, start = build_stream(
        sources, global_batch, encoder.preprocess_train, encoder.tokenizer, env.rank, env.world_size,
        num_streams=cfg.data.num_streams, seed=cfg.data.seed, shuffle_buffer=cfg.data.shuffle_buffer,
        resampled=cfg.data.resampled, saved=saved_data, step=step, views=views, reader=reader,
    )  # fmt: skip
    for message in start.messages:
        log.warning(message)
    order = stream.order
    num_samples = sum(s.num_samples for source in sources for s in source.shards)
    log.info(
        "training %s for %d steps: %d ranks × %d = %d samples/step, %d shards (%d samples), %.2f epochs",
        cfg.model.name, cfg.run.steps, env.world_size, cfg.data.batch_size, global_batch,
        sum(len(s.shards) for s in sources), num_samples, cfg.run.steps * global_batch / num_samples,
    )  # fmt: skip
    if len(sources) > 1:
        for source, source_batch, num_streams in zip(
            sources, order.layout.source_batches, start.source_streams, strict=True
        ):
            source_samples = sum(s.num_samples for s in source.shards)
            log.info(
                "source %s: %d samples/step (weight %g), %d samples, %d streams, %.2f epochs",
                source.name, source_batch, source.weight, source_samples, num_streams,
                cfg.run.steps * source_batch / source_samples,
            )  # fmt: skip
    data_positions = StreamPositions(start.positions, step - 1)
    batches = iter(batch_loader(stream, cfg.data.num_workers))
    float_batches: dict[str, torch.Tensor] = {}  # a CPU rank's normalised batches, reused (_model_input)
    start_step, start_time = step, time.perf_counter()
    window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
    progress = tqdm(
        total=cfg.run.steps, initial=step, disable=not env.is_main, desc="train", unit="step",
        mininterval=1 if sys.stderr.isatty() else 30,  # a log file needs no 10 Hz redraws
    )  # fmt: skip
    while step < cfg.run.steps:
        t0 = time.perf_counter()
        batch = next(batches)
        assert batch["step"] == step, "the loader is in step with the trainer"
        data_positions.advance(batch)
        data_wait += time.perf_counter() - t0
        lr = lr_at(step, cfg.optim, cfg.run.steps)
        if cfg.model.patch_dropout:  # a pure function of the step, so a resumed run switches where it should
            if not masked_at(step, cfg) and (step == start_step or masked_at(step - 1, cfg)):
                tune = cfg.optim.tune_steps
                log.info("step %d: unmasked tune for the last %d steps, lr from %.2e", step, tune, lr)
            set_patch_dropout(engine.module, cfg.model.patch_dropout if masked_at(step, cfg) else 0.0)
        images, views = (
            _model_input(batch.get(name), encoder.preprocess_train, engine.device, float_batches, name)
            for name in ("images", "views")
        )
        loss, grad_norm = engine.train_step(images, batch["texts"], loss_fn, lr, views)
        num_skipped += batch["num_skipped"]
        step += 1
        window_steps += 1
        progress.update(1)

        if step % cfg.run.log_every == 0 or step == cfg.run.steps:
            loss = _sum_over_ranks(loss, env.world_size, engine.device) / env.world_size
            elapsed = time.perf_counter() - window_start
            record = {
                "step": step,
                "epoch": step * global_batch / num_samples,
                "loss": loss,
                "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "logit_scale": min(engine.logit_scale(), MAX_LOGIT_SCALE),
                "samples_per_s": window_steps * global_batch / elapsed,
                "data_wait_frac": data_wait / elapsed,
                # Training samples lost to unreadable data so far, over all ranks, since step 0.
                "num_skipped": int(_sum_over_ranks(num_skipped, env.world_size, engine.device)),
            }
            if env.is_main:
                metrics.write(record)
            progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", sps=f"{record['samples_per_s']:.0f}")
            window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0

        # One tiny all-reduce a step: every rank must stop at the same step, whichever got the signal.
        stopping = _sum_over_ranks(stop.signum is not None, env.world_size, engine.device) > 0
        if step % cfg.run.checkpoint_every == 0 or step == cfg.run.steps or stopping:
            save_checkpoint(
                engine, encoder, checkpoint_dir, step, cfg.run.keep_checkpoints, env.is_main,
                data=_gather_positions(data_positions, sources, order, start.seed, env.world_size),
                num_skipped=int(_sum_over_ranks(num_skipped, env.world_size, engine.device)),
            )  # fmt: skip
        if stopping:
            # No rank exits before rank 0 has written its files: when one rank exits, launchers
            # (deepspeed, torchrun) kill the rest.
            _sum_over_ranks(0, env.world_size, engine.device)
            progress.close()
            log.warning(
                "stopping on a signal at step %d; checkpoint saved, resume with --resume latest", step
            )
            raise Preempted(step, checkpoint_dir / f"step_{step:08d}")
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < cfg.run.steps:
            run_eval(engine, encoder, eval_sets, probe_set, cfg, env, step, metrics)
    progress.close()
    train_seconds = time.perf_counter() - start_time

    results, figures = run_eval(engine, encoder, eval_sets, probe_set, cfg, env, step, metrics, figures=True)
    num_skipped = int(_sum_over_ranks(num_skipped, env.world_size, engine.device))
    weights = engine.export_state_dict()  # collective: ZeRO-3 gathers the partitions onto rank 0
    if env.is_main:
        (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
        classification = {k: r for k, r in results.items() if r["kind"] == "classification"}
        (run_dir / "zeroshot.json").write_text(json.dumps(classification, indent=2))
        (run_dir / "report").mkdir(exist_ok=True)
        (run_dir / "report" / "figures.json").write_text(json.dumps(figures))
        save_export(engine.module, encoder.model_cfg, run_dir, state=weights)
        plot_metrics(metrics.read(), run_dir / "training.png")
        write_report(run_dir)
        log.info(
            "done: %d steps in %.0f s (%.0f samples/s overall), %d training samples skipped as unreadable "
            "since step 0; "
            "run dir %s", step - start_step, train_seconds, (step - start_step) * global_batch / train_seconds,
            num_skipped, run_dir,
        )  # fmt: skip
        for r in results.values():
            log.info("eval  %s", format_results(r))
        log.info("report: %s", run_dir / "report" / "index.html")
    # All ranks leave together, once rank 0 has written the run's files: none tears down its side of the
    # process group while a peer is still at work.
    _sum_over_ranks(0, env.world_size, engine.device)
    return results


def run_eval(
    engine, encoder, eval_sets, probe_set, cfg: TrainConfig, env, step: int, metrics: MetricsLog,
    figures: bool = False,
) -> tuple[dict, dict]:  # fmt: skip
    """Evaluate every eval set: all ranks embed their share, rank 0 scores. Returns the results (every
    rank) and, with `figures`, the data for the report's pictures (rank 0)."""

    embedded = {}  # a folder that is both the probe's training set and an eval set is embedded once

    def embed_set(eval_set):
        key = tuple(eval_set.shard_urls)
        if key not in embedded:
            embedded[key] = embed(
                engine.module, encoder.preprocess_val, encoder.tokenizer, eval_set, cfg.eval.batch_size,
                env.rank, env.world_size, engine.device, engine.dtype,
            )  # fmt: skip
        return embedded[key]

    probe = embed_set(probe_set) if probe_set is not None else None
    results, figure_sets = {}, {}
    for eval_set in eval_sets:
        emb = embed_set(eval_set)
        # A probe scored on its own training set would report its training accuracy: not done.
        own = probe_set is not None and eval_set.shard_urls == probe_set.shard_urls
        r = score_on_main(emb, None if own else probe, env.rank, env.world_size)
        results[eval_set.name] = r
        log.info("eval @ step %d  %s", step, format_results(r))
        if env.is_main:
            metrics.write({"step": step, "eval_set": eval_set.name, **logged_metrics(r)})
            if figures:
                figure_sets[eval_set.name] = figure_data(emb, eval_set)
    return results, figure_sets


def save_checkpoint(
    engine: Engine,
    encoder: DualEncoder,
    checkpoint_dir: Path,
    step: int,
    num_keep: int,
    is_main: bool,
    data: dict | None = None,
    num_skipped: int = 0,
) -> None:
    """Collective. `data`: the data order's `LoaderState.to_dict()` (rank 0 writes it);
    `num_skipped`: training samples lost to unreadable data up to `step`, over all ranks."""
    tag = f"step_{step:08d}"
    engine.save(checkpoint_dir, tag, client_state={"step": step, "data": data, "num_skipped": num_skipped})
    weights = engine.export_state_dict()
    if is_main:
        # Beside DeepSpeed's files, a plain state dict that open_clip and `launch/zeroshot.py` read.
        save_export(engine.module, encoder.model_cfg, checkpoint_dir / tag, state=weights)
        set_latest(checkpoint_dir, tag)  # only now is the checkpoint whole (a full disk fails before)
        if num_keep:
            for old in sorted(checkpoint_dir.glob("step_*"))[:-num_keep]:
                shutil.rmtree(old)


def _gather_positions(
    positions: StreamPositions, sources: list[Source], order: DataOrder, seed: int, world_size: int
) -> dict:
    # DeepSpeed writes the client state from rank 0 only, so rank 0 must hold every stream's place; each
    # rank knows those of the streams its slots read.
    per_rank = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(per_rank, positions.to_list())
    else:
        per_rank[0] = positions.to_list()
    specs = [OrderSpec(s.name, [shard.num_samples for shard in s.shards], s.weight) for s in sources]
    streams = order.layout.source_streams
    return StreamPositions.merge(per_rank, specs, streams, seed, order.layout.global_batch).to_dict()


def _model_input(
    pixels: torch.Tensor | None,
    augment: TrainAugment,
    device: torch.device,
    float_batches: dict[str, torch.Tensor],
    name: str,
) -> torch.Tensor | None:
    """The loader's uint8 `pixels` (images or views) moved to `device` and normalised there: the one
    place training batches become the model's float input. On a CPU the float batch is written into
    the last step's `float_batches[name]` (that step is done with it); a fresh one a step would fault in
    every page anew."""
    if pixels is None:
        return None
    pixels = pixels.to(device)
    out = float_batches.get(name)
    if device.type == "cpu" and (out is None or out.shape != pixels.shape):
        out = float_batches[name] = torch.empty(pixels.shape, dtype=torch.float32)
    return augment.normalize(pixels, out if device.type == "cpu" else None)


def _sum_over_ranks(value, world_size: int, device: torch.device) -> float:
    # On the engine's device: NCCL reduces GPU tensors only.
    value = torch.as_tensor(value, dtype=torch.float64).to(device).clone()
    if world_size > 1:
        dist.all_reduce(value)
    return float(value)
