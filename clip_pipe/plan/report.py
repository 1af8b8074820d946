"""The plan as a table for people (`clip-pipe plan`); `Plan.to_dict()` is the JSON for scripts."""

from __future__ import annotations

from clip_pipe.plan.gpus import GIB
from clip_pipe.plan.planner import Plan


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def _gb(x: float) -> str:
    return f"{x / 1e9:.3g} GB"


def _count(x: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.0f}"


def _hours(h: float) -> str:
    return f"{h:.3g} h" if h < 48 else f"{h / 24:.3g} days"


def format_plan(plan: Plan) -> str:
    s, g, mdl, mem, t, c = plan.setup, plan.gpu, plan.model, plan.memory, plan.time, plan.comms
    num_local = s["global_batch"] // s["num_gpus"]
    levers = [
        f"patch dropout {s['patch_dropout']:g}" if s["patch_dropout"] else "",
        "activation checkpointing" if s["grad_checkpointing"] else "",
        (
            f"image tower locked ({s['unlocked_image_layers']} top blocks train)"
            if s["unlocked_image_layers"]
            else "image tower locked"
        )
        if s["lock_image"]
        else "",
        "text tower locked" if s["lock_text"] else "",
    ]
    levers = ", ".join(x for x in levers if x) or "none"
    fwd = mdl["forward_flops_per_sample"]
    loss_name = "tiled" if s["loss"] == "tiled" else "ClipLoss (local)"
    rows = [
        ("setup", f"{s['model']} on {s['num_gpus']} x {g['name']}, {s['precision']}, ZeRO-{s['zero_stage']}, "
         f"{loss_name} loss, global batch {s['global_batch']} = {num_local} per GPU"),
        ("levers", levers),
        ("model", f"{_count(mdl['num_params'])} parameters (image {_count(mdl['num_image_params'])}, text "
         f"{_count(mdl['num_text_params'])}), {_count(mdl['num_trainable'])} trainable; tokens: image "
         f"{mdl['image_tokens']}, text {mdl['text_tokens']}"),
        ("FLOPs per sample", f"forward {_count(fwd['image'] + fwd['text'])} (image {_count(fwd['image'])}, "
         f"text {_count(fwd['text'])}); training step {_count(mdl['train_flops_per_sample'])}"
         + (f" + {_count(mdl['recompute_flops_per_sample'])} recomputed" if mdl["recompute_flops_per_sample"] else "")),
        ("", ""),
        ("memory per GPU", "(each at its most; the peak is the largest phase of the step, not their sum)"),
        ("  parameters", _gib(mem["params"])),
        ("  gradients", _gib(mem["grads"])),
        ("  optimizer state", _gib(mem["optimizer"]) + " (fp32 master weights and Adam moments)"),
        ("  DeepSpeed buffers", _gib(mem["deepspeed_buffers"]) + " (reduce bucket and copies; ZeRO-3: gathered parameters)"),
        ("  activations", f"{_gib(mem['activations_saved'])} saved + {_gib(mem['activations_working'])} "
         "for one block's backward"),
        ("  loss", _gib(mem["loss"])),
        ("  peak", f"{_gib(mem['peak'])} in {mem['peak_phase']}, of {_gib(mem['capacity'])} usable: "
         + ("fits" if mem["fits"] else "DOES NOT FIT")),
        ("  largest batch per GPU", f"{plan.max_batch_per_gpu['num_local']} "
         f"(global {plan.max_batch_per_gpu['global_batch']})"),
        ("", ""),
        ("bytes per step per GPU", f"gradients {_gb(c['gradient_bytes'])} ("
         + ("2" if s["zero_stage"] < 3 else "3") + "Ψ, ZeRO paper), features "
         f"{_gb(c['feature_bytes'])}; at {c['link_gb_s']:g} GB/s: {c['gradient_s'] * 1e3:.1f} ms "
         + ("(hidden behind backward where it can be)" if c["gradient_overlapped"] else "(after backward)")
         + f" + {c['feature_s'] * 1e3:.1f} ms"),
        ("step time", f"{t['step_s']:.3g} s = compute {t['compute_s']:.3g} s at {t['utilisation']:.1%} of "
         f"{g['bf16_flops'] / 1e12:g} TFLOP/s + exposed communication {t['exposed_comm_s'] * 1e3:.1f} ms"),
        ("throughput", f"{t['samples_per_s_per_gpu']:.4g} samples/s per GPU, {t['samples_per_s']:.4g} in all; "
         f"MFU {t['mfu']:.1%}"),
    ]  # fmt: skip
    if plan.run:
        r = plan.run
        rows.append(
            ("run", f"{_count(r['num_samples'])} samples = {r['num_steps']} steps: {_hours(r['wall_hours'])}, "
             f"{r['gpu_days']:.4g} GPU-days")
        )  # fmt: skip
    if plan.data:
        d = plan.data
        rows.append(
            ("data prep", f"{_count(d['num_pairs'])} pairs: {d['cpu_hours']:.4g} CPU-hours, "
             f"{_hours(d['wall_hours'])} on {d['cores']} cores; {d['storage_bytes'] / 1e12:.3g} TB at "
             f"{d['bytes_per_pair'] / 1e3:g} kB per pair")
        )  # fmt: skip
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}".rstrip() for k, v in rows]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
