"""Everything DeepSpeed: process group, engine, step, checkpoints. No other module imports it.

The DeepSpeed JSON is generated from our config, so there is one source of truth; `run.deepspeed_config`
names a JSON merged over it for deliberate overrides (DeepSpeed users' own settings keep working).
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import pickle
import platform
import warnings
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.utils import clip_grad_norm_
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from clip_pipe.checkpoints import save_file
from clip_pipe.config import TrainConfig
from clip_pipe.distributed import DistEnv, export_env
from clip_pipe.model import to_export

log = logging.getLogger(__name__)
logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
deepspeed.utils.logger.setLevel(logging.WARNING)
# DeepSpeed's ZeRO still calls the collective torch 2.14 renamed; the warning is theirs, not the user's.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*deprecated", category=FutureWarning)
# DeepSpeed rebuilds reduced sparse gradients from our own embedding's indices; torch's note that it
# does not re-check them is about that call, not anything the user did.
warnings.filterwarnings(
    "ignore", message=r"Sparse invariant checks are implicitly disabled", category=UserWarning
)


def init_process_group(env: DistEnv, timeout_s: int = 1800) -> None:
    """Join the job's process group (NCCL on GPUs, gloo on CPUs; DeepSpeed picks)."""
    export_env(env)
    # DeepSpeed JIT-compiles its CPU shared-memory all-reduce with g++ when the group starts (30-60 s on
    # a machine's first run), but only its tensor-parallel inference layers call it
    # (`inference_all_reduce`): training's all-reduce and all-gather are torch.distributed's (gloo) with
    # or without it. So it is never built (docs/benchmarks.md: the same step time either way).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s), verbose=False)
    # Leave the group while the interpreter is still whole. Otherwise gloo's worker threads can be torn
    # down during finalisation, and a rank whose run succeeded dies of SIGABRT, "terminate called without
    # an active exception" (pytorch#190489).
    atexit.unregister(_leave_process_group)
    atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    if torch.distributed.is_initialized():
        # DeepSpeed engines live in reference cycles; free them (and any collective work they hold) first.
        gc.collect()
        torch.distributed.destroy_process_group()


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size // cfg.optim.accum_steps,
        "gradient_accumulation_steps": cfg.optim.accum_steps,
        "train_batch_size": cfg.data.batch_size * world_size,
        # DeepSpeed clips at 1.0 unless told otherwise; ours is always explicit (0 = off).
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.run.zero_stage},
        "bf16": {"enabled": cfg.run.precision == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.optim.lr,
                "betas": [cfg.optim.beta1, cfg.optim.beta2],
                "eps": cfg.optim.eps,
                "weight_decay": cfg.optim.weight_decay,
                # torch's AdamW runs everywhere; DeepSpeed's FusedAdam needs a CUDA build.
                "torch_adam": True,
                # torch's fused kernel (CPU and CUDA): one pass over all parameters. On CPU torch would
                # otherwise loop tensor by tensor, 4x slower for the demo's model (docs/benchmarks.md).
                "fused": True,
            },
        },
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if cfg.run.deepspeed_config:
        path = Path(cfg.run.deepspeed_config)
        if not path.is_file():
            raise ValueError(f"run.deepspeed_config: no such file {path}")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"run.deepspeed_config {path} is not valid JSON: {e}") from None
        config = _merge(config, user)
    return config


def reduces_sparse_gradients(config: dict[str, Any]) -> bool:
    """Whether DeepSpeed reduces sparse gradients as such under `config`: only at ZeRO-0 without its
    16-bit optimizers, the one path where it reduces gradients itself, tensor by tensor (ZeRO 1-3 and
    the bf16/fp16 optimizers flatten them into buffers)."""
    return (
        config["zero_optimization"].get("stage", 0) == 0
        and not config.get("bf16", {}).get("enabled")
        and not config.get("fp16", {}).get("enabled")
    )


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norm gains and the logit scale (all < 2-D) are left alone."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def cpu_has_native_bf16(environ: dict | None = None) -> bool:
    """Whether torch's CPU kernels run bf16 on bf16 hardware (avx512_bf16 or AMX) rather than emulating it.

    Both the CPU and the kernels in use count: `ATEN_CPU_CAPABILITY` below avx512 or oneDNN capped below
    its AVX-512 bf16 ISA (`ONEDNN_MAX_CPU_ISA`) emulate bf16 with fp32 arithmetic on any CPU.
    """
    environ = os.environ if environ is None else environ
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # no emulation to warn about that we can tell from here
    hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    capped = environ.get("ONEDNN_MAX_CPU_ISA", environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    onednn_ok = capped == "ALL" or any(isa in capped for isa in ("BF16", "FP16", "AMX"))
    return hardware and onednn_ok and torch.backends.cpu.get_cpu_capability() == "AVX512"


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's checkpoint engine, but loading with `weights_only=True` (no arbitrary unpickling)."""

    def save(self, state_dict, path: str):
        save_file(state_dict, path)  # a full disk is an OSError (ENOSPC), not an opaque RuntimeError

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_DEEPSPEED_CHECKPOINT_GLOBALS):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:  # torch's message is a page of advice; keep its reason
                reason = next((line for line in str(e).splitlines() if "GLOBAL" in line), "")
                raise ValueError(
                    f"refusing to load {path}: not a weights-only checkpoint, unpickling it could run "
                    f"code ({reason.strip() or 'unsupported content'})"
                ) from None


def _deepspeed_checkpoint_globals() -> list:
    # The plain-data classes DeepSpeed pickles into its checkpoints, allowed by name and nothing else.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


_DEEPSPEED_CHECKPOINT_GLOBALS = _deepspeed_checkpoint_globals()


# Model outputs that are not per-sample features: never split into micro-batches.
SHARED_OUTPUTS = ("logit_scale", "logit_bias")


class Engine:
    """A DeepSpeed engine around the dual encoder, with the step and checkpoint calls we use."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, world_size: int):
        self.config = deepspeed_config(cfg, world_size)
        # Counted before ZeRO-3 partitions them. Frozen parameters (locked towers) are left out of the
        # optimizer's groups, so DeepSpeed gives them no gradient buffers, no reduction and no optimizer state.
        self.num_params = sum(p.numel() for p in model.parameters())
        self.num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(
            "parameters: %s, trainable %s; the %s frozen get no gradients and no optimizer state",
            f"{self.num_params:,}", f"{self.num_trainable:,}", f"{self.num_params - self.num_trainable:,}",
        )  # fmt: skip
        self.seed = cfg.run.seed
        # The token embedding is most of a small CLIP's parameters (3.2M of the demo's 3.4M), but a
        # batch uses a few hundred of its 49,408 rows. A dense gradient zero-fills, all-reduces and copies
        # the whole table every step; a sparse one sends the rows used, and is made dense again after the
        # reduction, for clipping and AdamW, so the step is the same (weight decay and moments still
        # reach every row). 1.16x the throughput benchmark's samples/s at fp32 (docs/benchmarks.md).
        self.sparse_params = []
        # Inductor cannot build a sparse gradient (it fails on the sparse tensor's storage): compiled models
        # keep dense ones.
        if reduces_sparse_gradients(self.config) and not cfg.run.compile:
            for module in model.modules():
                if isinstance(module, nn.Embedding) and module.weight.requires_grad:  # not a locked tower's
                    module.sparse = True
                    self.sparse_params.append(module.weight)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=self.config
        )
        self.ds.checkpoint_engine = WeightsOnlyCheckpointEngine(self.ds._config)
        if cfg.run.compile:
            # nn.Module.compile in place: the parameters and state dict keys stay as they are.
            self.ds.compile()
        if not self.ds.zero_optimization() and cfg.run.precision == "fp32":
            self.ds.clip_fp32_gradients = self._clip_fp32_gradients
        if self.sparse_params:
            self._allreduce_gradients = self.ds.allreduce_gradients
            self.ds.allreduce_gradients = self._allreduce_then_densify
        self.bf16 = cfg.run.precision == "bf16"
        if self.bf16 and self.device.type == "cpu" and not cpu_has_native_bf16():
            log.warning(
                "run.precision=bf16 on a CPU without bf16 instructions (no avx512_bf16 or AMX in use): bf16 "
                "is emulated here and runs several times slower than fp32 (docs/benchmarks.md); "
                "prefer run.precision=fp32 on this machine"
            )
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.accum_steps = self.ds.gradient_accumulation_steps()

    def _allreduce_then_densify(self, *args, **kwargs) -> None:
        self._allreduce_gradients(*args, **kwargs)
        if self.ds.is_gradient_accumulation_boundary():
            for p in self.sparse_params:
                if p.grad is not None and p.grad.is_sparse:
                    p.grad = p.grad.to_dense()  # sums the rows every rank sent (and repeats within one)

    def _clip_fp32_gradients(self) -> None:
        # At ZeRO-0 in fp32 DeepSpeed clips here but drops the norm it computed, so get_global_grad_norm()
        # would say None; keep it, as ZeRO 1-3 and bf16 do. The gradients are already all-reduced.
        self.ds._global_grad_norm = clip_grad_norm_(
            self.ds.module.parameters(), max_norm=self.ds.gradient_clipping(), mpu=self.ds.mpu
        )

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    def forward(self, images: torch.Tensor, texts: torch.Tensor, views: torch.Tensor | None = None):
        """The loss's inputs by name: image_features (B, D), text_features (B, D) and logit_scale (plus logit_bias for models that have one); with
        `views` (B, 2, 3, H, W) also view_features (B, 2, D), the image–image head's outputs.

        The views go through the image tower in the same pass as the images, so ZeRO-3 gathers each
        layer once, and the head (a submodule, so DeepSpeed trains and partitions it) maps their
        normalised embeddings into the image–image space.
        """
        images, texts = images.to(self.device, self.dtype), texts.to(self.device)
        num_images = images.shape[0]
        if views is not None:
            images = torch.cat([images, views.to(self.device, self.dtype).flatten(0, 1)])  # (3B, 3, H, W)
        # open_clip returns a fourth output, logit_bias, for models built with one (SigLIP).
        with self._attention_kernel():
            all_image_features, text_features, *scale_and_bias = self.ds(images, texts)
        outputs = dict(zip(SHARED_OUTPUTS, scale_and_bias, strict=False))
        outputs.update(image_features=all_image_features[:num_images], text_features=text_features)
        if views is not None:
            view_features = self.module.image_ssl_head(all_image_features[num_images:])  # (2B, D)
            outputs["view_features"] = view_features.unflatten(0, (num_images, -1))  # (B, 2, D)
        return outputs

    @contextmanager
    def _training_rng(self, micro_batch: int):
        """Inside, torch's generators are seeded by (run.seed, step, rank, micro-batch) alone, and put back after.

        Training-time randomness (patch dropout's masks, dropout in Hugging Face towers) is then a pure
        function of where the step is: a resumed run draws the masks the uninterrupted one did, each rank
        its own, and the gradient pass of a micro-batch draws those of its feature-caching pass, as the
        exact accumulated gradient needs. `global_steps` is DeepSpeed's step count, saved in checkpoints.
        """
        seed = np.random.SeedSequence([self.seed, self.ds.global_steps, self.ds.global_rank, micro_batch])
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(seed.generate_state(1)[0]))
            yield

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        # Under the forward's attention kernel: activation checkpointing recomputes the blocks here, and the
        # recomputation must run the kernel the forward ran (torch checks that it saves the same tensors).
        with self._attention_kernel():
            self.ds.backward(loss, **kwargs)

    def _attention_kernel(self):
        # On CPUs, torch's fused (flash) attention backward in bf16 is 4x slower than the whole rest of
        # the demo model's backward; the plain matmul-softmax-matmul path is not (docs/benchmarks.md).
        # GPUs keep the fused kernels.
        if self.device.type == "cpu" and self.bf16:
            return sdpa_kernel([SDPBackend.MATH])
        return nullcontext()

    def train_step(
        self,
        images: torch.Tensor,
        texts: torch.Tensor,
        loss_fn: nn.Module,
        lr: float,
        views: torch.Tensor | None = None,
    ):
        """One optimizer step on this rank's batch; returns the detached loss and the global grad norm
        (None if unclipped). `views`: the image–image term's views, if `loss_fn` takes them.

        With `accum_steps` > 1 the batch is split into micro-batches, and the gradient is still exactly
        that of the whole global batch's loss (open_clip's `accum_freq` method): a first pass without
        gradients caches every micro-batch's features; then each micro-batch is recomputed with
        gradients, spliced into the cached features, and the loss over all of them (every rank's, via
        the loss's all-gather) is back-propagated. Each backward reaches only its own micro-batch's
        activations, so their sum is the full-batch gradient, with every negative in every micro-step.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.ds.train()
        if self.accum_steps == 1:
            with self._training_rng(0):
                loss = loss_fn(**self.forward(images, texts, views))
            self.backward(loss)
            self.ds.step()
            return loss.detach(), self.ds.get_global_grad_norm()

        micro_batches = list(zip(images.chunk(self.accum_steps), texts.chunk(self.accum_steps), strict=True))
        if views is not None:
            micro_batches = [
                (*m, v) for m, v in zip(micro_batches, views.chunk(self.accum_steps), strict=True)
            ]
        assert len(micro_batches) == self.accum_steps, "batch_size is a multiple of accum_steps"
        cached = []
        for j, micro_batch in enumerate(micro_batches):
            with torch.no_grad(), self._training_rng(j):
                cached.append(self.forward(*micro_batch))
        for j in range(self.accum_steps):
            with self._training_rng(j):  # the masks its cached features were computed with
                outputs = self.forward(*micro_batches[j])
            # Every feature (B, ...) of the whole batch, with micro-batch j's carrying its gradient.
            inputs = {
                name: torch.cat([outputs[name] if k == j else c[name] for k, c in enumerate(cached)])
                for name in outputs
                if name not in SHARED_OUTPUTS
            }
            # The scale and bias take part in every micro-step's loss, so their gradients would add up
            # to accum_steps times the whole batch's (open_clip_train's accum_freq keeps that error).
            # Scaling the gradient, not the value (x + 0 exactly), keeps the sum exact.
            shared = {
                name: outputs[name].detach() + (outputs[name] - outputs[name].detach()) / self.accum_steps
                for name in SHARED_OUTPUTS
                if name in outputs
            }
            loss = loss_fn(**inputs, **shared)
            # Each micro-step's loss is the whole batch's loss, so the gradients add up, unscaled:
            # DeepSpeed's default divides by accum_steps, as if each micro-batch had a loss of its own.
            self.ds.set_gradient_accumulation_boundary(j == self.accum_steps - 1)
            self.backward(loss, scale_wrt_gas=False)
            self.ds.step()
        return loss.detach(), self.ds.get_global_grad_norm()

    @contextmanager
    def full_params(self, params=None):
        """Collective under ZeRO-3: inside, `params` (default: all) are whole on every rank, read-only.

        Stages 0-2 keep whole parameters on every rank already, so this is a no-op there.
        """
        if self.ds.zero_optimization_partition_weights():
            params = list(self.module.parameters()) if params is None else params
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
        else:
            yield

    def logit_scale(self) -> float:
        """The learned temperature, exp'd (collective under ZeRO-3, where it may be partitioned)."""
        with self.full_params([self.module.logit_scale]):
            return float(self.module.logit_scale.detach().float().exp())

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: the whole model as a plain open_clip state dict on rank 0 (None on other ranks).

        Under ZeRO-3 each rank holds a slice of every parameter; DeepSpeed gathers them one layer
        at a time onto rank 0, so no rank ever holds the whole model twice.
        """
        if self.ds.zero_optimization_partition_weights():
            state = self.ds._zero3_consolidated_16bit_state_dict()
            return None if state is None else to_export(state)
        return to_export(self.module.state_dict()) if self.ds.global_rank == 0 else None

    def save(self, checkpoint_dir: Path, tag: str, client_state: dict) -> None:
        """Collective: every rank writes its part. `latest` is left alone: DeepSpeed would rewrite it in
        place, and a full disk would leave it empty; the caller moves it once the checkpoint is whole."""
        self.ds.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state, save_latest=False)

    def load(self, checkpoint_dir: Path, tag: str | None = None) -> dict | None:
        """Collective: restore weights, optimizer and our client state; None if nothing to load."""
        try:
            path, client_state = self.ds.load_checkpoint(str(checkpoint_dir), tag=tag)
        except RuntimeError as e:
            if "Error(s) in loading state_dict" not in str(e):
                raise
            # torch's strict load names every missing and unexpected key; the last line says which.
            raise ValueError(
                f"the checkpoint in {checkpoint_dir} does not fit the model this config builds "
                f"({str(e).strip().splitlines()[-1].strip().rstrip('.')}). Resume with the settings it was saved with "
                "(model.name, loss.kind, loss.image_ssl_weight on or off)."
            ) from None
        return client_state if path is not None else None
