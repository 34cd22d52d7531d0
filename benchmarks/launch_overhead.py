"""Host time to issue a component vs its GPU time: one host thread or one per device?

With ``devices=["cuda:0", "cuda:1", ...]`` in one process, a single host thread
could issue component 0 on device 0, then component 1 on device 1, ...: kernel
launches do not wait, so the devices still overlap *if* issuing every
component takes less host time than the slowest component takes on its GPU.
Otherwise the host is the bottleneck and one thread per device (the default)
is needed.  This script estimates both sides for the real SD 1.5 UNet
(fp16, 512 px, batch 2) and the paper split:

* **measured here**: the number of operators each component issues (a
  ``TorchDispatchMode`` counter over a forward on the meta device: an upper
  bound on its kernel launches) and its FLOPs;
* **stated**: the host time per operator of eager PyTorch on a GPU
  (``--op-us``: Python, module calls, dispatcher and the launch; 8-15 us is the
  usual range) and the GPU throughput (``--tflops``, default 39: the RTX A5000
  figure of ``speedup_model.py``, calibrated on the paper's SD 2.1 latency;
  300 is closer to an H100).  The host time of a forward on the meta device is
  not used: meta kernels run Python shape functions, far slower than a launch.

Host time of a component = operators x host time per operator; GPU time = its
FLOPs / throughput.  One host thread keeps N devices busy when the sum of the
N host times is below the largest GPU time.  (Threads share the GIL for the
Python part of the host time, so even one thread per device only helps where
the host time is spent in torch's C++ with the GIL released: the measurement
on GPUs, ``gpu_acceptance.py``'s devices-2gpu, decides.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="2,3,4", help="model_n values (paper split)")
    ap.add_argument("--px", type=int, default=512, help="image side in pixels")
    ap.add_argument("--op-us", default="8,15", help="stated host time per operator on a GPU, us (comma list)")
    ap.add_argument("--tflops", default="39,300", help="stated GPU throughputs, TFLOP/s (comma list)")
    return ap.parse_args(argv)


def measure(n: int, px: int):
    """Per component of the paper split: (component, operators, FLOPs)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from asyncdiff import arch, splits
    from asyncdiff.testing import tiny

    unet = tiny.build_real_unet("sd15", device="meta", dtype=torch.float16)
    layout = arch.describe(unet)
    split = splits.resolve_static(layout, n, "paper")
    side = px // 8
    args = (torch.empty(2, 4, side, side, device="meta", dtype=torch.float16),
            torch.tensor([500], device="meta"))
    kwargs = {"encoder_hidden_states": torch.empty(2, 77, 768, device="meta", dtype=torch.float16)}
    order, flops = splits.count_costs(layout, unet, args, kwargs)
    cost = dict(zip(order, flops))
    owner = split.owner
    comp_of = {u: owner[u] if u in owner else owner[layout.parent(u)] for u in order}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    ops = dict.fromkeys(order, 0)
    marks = {}
    handles = []
    counter = Count()

    def enter(u):
        def hook(_m, _a):
            marks[u] = counter.ops
        return hook

    def leave(u):
        def hook(_m, _a, _o):
            ops[u] = counter.ops - marks[u]
        return hook

    for u in order:
        mod = layout.module(u, unet)
        handles.append(mod.register_forward_pre_hook(enter(u)))
        handles.append(mod.register_forward_hook(leave(u)))
    try:
        with torch.no_grad(), counter:
            unet(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for c in range(n):
        units = [u for u in order if comp_of[u] == c]
        rows.append((c, sum(ops[u] for u in units), sum(cost[u] for u in units)))
    return rows


def main(argv=None):
    args = parse_args(argv)
    tflops = [float(x) for x in args.tflops.split(",")]
    op_us = [float(x) for x in args.op_us.split(",")]
    _util.preamble(
        "Host time to issue a component vs its GPU time (SD 1.5, fp16, paper split)",
        notes=[
            "measured here: operators per component (TorchDispatchMode over a meta-device forward: an upper "
            "bound on its kernel launches) and FLOPs",
            f"stated: host time per operator on a GPU {args.op_us} us; GPU throughput {args.tflops} TFLOP/s",
            f"SD 1.5 real config, {args.px}x{args.px} px, batch 2 (classifier-free guidance)",
            "one host thread keeps the devices busy when sum(host) < max(GPU)",
        ],
    )
    table = []
    for n in (int(x) for x in args.n.split(",")):
        rows = measure(n, args.px)
        for us in op_us:
            host = [k * us * 1e-6 for _, k, _ in rows]
            for tf in tflops:
                gpu = [f / (tf * 1e12) for *_, f in rows]
                verdict = "one host thread suffices" if sum(host) < max(gpu) else "host-bound: thread per device"
                table.append([n, " / ".join(str(k) for _, k, _ in rows), f"{us:g}", f"{tf:g}",
                              " / ".join(f"{h * 1e3:.1f}" for h in host), f"{sum(host) * 1e3:.1f}",
                              " / ".join(f"{g * 1e3:.1f}" for g in gpu), f"{max(gpu) * 1e3:.1f}",
                              f"{sum(host) / max(gpu):.2f}", verdict])
    print(_util.table(["N", "operators [measured]", "us/op [stated]", "TFLOP/s [stated]", "host ms per component",
                       "sum host ms", "GPU ms per component", "max GPU ms", "sum host / max GPU", "verdict"], table,
                      align="rlrrllllrl"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
