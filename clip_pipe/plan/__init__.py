"""The planner behind `clip-pipe plan`: memory, traffic, time and GPU-days of a training setup, on paper.

    from clip_pipe.plan import Setup, plan, format_plan
    print(format_plan(plan(Setup("ViT-B-16", num_gpus=64, global_batch=32768, num_samples=10**9))))

arch.py    parameters (exact, on the meta device) and FLOPs per sample (analytic)
memory.py  model states by ZeRO stage as DeepSpeed allocates them, activations, the loss
comms.py   bytes per step: gradients (ZeRO paper), the loss's feature exchange
gpus.py    the GPU table (bf16 peak, memory, bandwidths)
planner.py Setup -> Plan: composes the above, step time at a stated utilisation, the run, data prep
report.py  the plan as a table
"""

from clip_pipe.plan.gpus import GPUS, Gpu
from clip_pipe.plan.planner import DEFAULT_UTILISATION, Plan, Setup, fit_utilisation, plan
from clip_pipe.plan.report import format_plan

__all__ = ["DEFAULT_UTILISATION", "GPUS", "Gpu", "Plan", "Setup", "fit_utilisation", "format_plan", "plan"]
