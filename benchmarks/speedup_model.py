"""A GPU speed-up model of AsyncDiff, from counted FLOPs and exchanged bytes.

Nothing runs on a GPU.  Two kinds of input, labelled as such in the output:

* **measured here** (meta device, shapes only, nothing computed): the FLOPs of
  every component of the paper split (``splits.resolve_static(layout, n,
  "paper")``; FLOPs by ``splits.count_costs``) for SD 1.5 at 512 px, SD 2.1 at
  768 px and SDXL at 1024 px, batch 2 (classifier-free guidance), fp16; and
  the bytes every rank sends and receives at every transport event of the
  pipeline call, from the library's own exchange plan
  (``ExchangePlan.event`` on the C schedule's plan of each call,
  ``docs/design.md`` §3-§4);
* **stated**: the effective throughput of one GPU (calibrated so that the
  model's single-GPU SD 2.1 latency, 50 denoiser calls, equals the paper's
  measured 5.51 s on an RTX A5000; the same throughput for every model and
  component), the link bandwidths, the warm-up steps, and whether transfers
  overlap compute.

The timeline of one pipeline call is the C schedule's (``_core.Schedule``),
call by call: a warm-up call costs the whole denoiser; an asynchronous call
costs the largest component that any rank computes (0 for a stride-2 *sync*
call, where nothing computes); a call whose plan has a transport event adds
the busiest rank's traffic, max(bytes sent, bytes received) over ranks, over
the link bandwidth (each GPU's link taken as full duplex, all links
independent, no per-message latency).  "No overlap" adds the transfer after
the compute (what a rank waiting on its inputs does); "full overlap" takes
the larger of the two (a bound).  Glue code, the scheduler, the text encoder
and the VAE are not modelled separately: the calibration folds them into the
throughput.

``cfg_parallel``: the two guidance halves run on two groups of N+S-1 GPUs,
each GPU at batch 1: every compute time and every exchanged byte halves, and
every call adds one swap of the denoiser output's half between paired GPUs
of the two groups (never overlapped).  Speed-ups are against one GPU at
batch 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402

# ------------------------------------------------------------ stated inputs
# SPEC.md §7: "Paper, 50 DDIM steps, RTX A5000 + NVLink, NCCL broadcast", seconds
# per image; (model_n, stride) -> latency; (0, 0) = the original model on one GPU.
PAPER_STEPS = 50
PAPER_LATENCY = {
    "sd21": {(0, 0): 5.51, (2, 1): 3.03, (3, 1): 2.41, (4, 1): 2.10, (2, 2): 1.82, (3, 2): 1.35},
    "sd15": {(0, 0): 2.70, (2, 1): 1.52, (3, 1): 1.23, (4, 1): 1.01, (2, 2): 0.94, (3, 2): 0.72},
    "sdxl": {(0, 0): 13.81, (2, 1): 8.00, (3, 1): 5.84, (4, 1): 5.12, (2, 2): 4.91, (3, 2): 3.65},
}
PAPER_SPEEDUP = {  # as printed in the paper (one decimal)
    "sd21": {(2, 1): 1.8, (3, 1): 2.3, (4, 1): 2.6, (2, 2): 3.0, (3, 2): 4.0},
    "sd15": {(2, 1): 1.8, (3, 1): 2.2, (4, 1): 2.6, (2, 2): 2.9, (3, 2): 3.7},
    "sdxl": {(2, 1): 1.7, (3, 1): 2.4, (4, 1): 2.7, (2, 2): 2.8, (3, 2): 3.8},
}
# SPEC.md §7: communication time of the original (every unit broadcast to every rank), SD 2.1.
PAPER_COMM_SD21 = {(2, 1): 0.13, (4, 1): 0.30}
CALIBRATE_ON = "sd21"
# RTX A5000 (GA102, 64 SMs): 222.2 TFLOPS fp16 tensor with 2:4 sparsity, i.e. 111.1 dense.
A5000_DENSE_FP16 = 111.1e12
# RTX A5000 NVLink bridge: 112.5 GB/s bidirectional = 56.25 GB/s per direction; 50 effective assumed.
LINKS = "NVLink=50,PCIe 4.0 x16=25,100 Gb/s net=12.5"
# Warm-up per stride: S=1 -> 1 (SPEC §2's example, the original README's reset_state(warm_up=1));
# S=2 -> 9 (SPEC §3 "The paper uses odd W (e.g. 9)", the original run scripts' n3s2 default).
WARM_UP = "1,9"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="sd15,sd21,sdxl", help="comma list of sd15, sd21, sdxl")
    ap.add_argument("--n", default="2,3,4", help="model_n values")
    ap.add_argument("--strides", default="1,2", help="stride values")
    ap.add_argument("--bandwidth", default=LINKS,
                    help="links as NAME=GB/s (10^9 bytes/s per direction) or bare numbers, comma separated "
                         f"(default: {LINKS!r})")
    ap.add_argument("--steps", type=int, default=PAPER_STEPS, help="denoising steps per image")
    ap.add_argument("--warm-up", default=WARM_UP, help="warm-up steps for stride 1 and stride 2 (S1,S2)")
    ap.add_argument("--sensitivity", default="1,3,5,9",
                    help="warm-up values for the sensitivity table (first link, no overlap, no cfg); '' = none")
    ap.add_argument("--throughput", type=float, default=None,
                    help="effective TFLOP/s of one GPU (default: calibrated on the paper's single-GPU SD 2.1 "
                         "latency)")
    return ap.parse_args(argv)


def parse_links(text: str) -> list[tuple[str, float]]:
    """``"NVLink=50,PCIe=25"`` or ``"50,25"`` -> [(name, bytes/s)]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, value = item.rpartition("=")
        gbs = float(value)
        if gbs <= 0:
            raise ValueError(f"--bandwidth: {item!r} is not a positive GB/s")
        out.append((name.strip() or f"{gbs:g} GB/s", gbs * 1e9))
    if not out:
        raise ValueError("--bandwidth: no link given")
    return out


# ------------------------------------------------------------ measured inputs
@dataclass
class Arch:
    """What the meta device tells about one model (batch 2, fp16)."""

    arch: str
    name: str
    desc: str
    full_flops: float  # one whole denoiser call (sum of the fine units)
    result_bytes: int  # the denoiser output
    comp: dict = field(default_factory=dict)  # n -> [FLOPs of component r]
    plans: dict = field(default_factory=dict)  # (n, s) -> (ExchangePlan, Slots)
    unit_bytes: dict = field(default_factory=dict)  # n -> {unit: output bytes} (units of the split)


def measure(arch: str, ns=(2, 3, 4), strides=(1, 2), batch: int = 2) -> Arch:
    """Count FLOPs and exchange plans of ``arch`` on the meta device (fp16)."""
    import _models
    import torch

    from asyncdiff import splits
    from asyncdiff.exchange import Slots

    c = _models.case(arch, dtype=torch.float16, batch=batch)
    order, costs = splits.count_costs(c.layout, c.model, c.args, c.kwargs)
    a = Arch(arch, _models.NAMES[arch], c.desc, float(sum(costs)), 0)
    for n in ns:
        split = _models.split_of(c, n, "paper")
        a.comp[n] = [float(x) for x in splits.component_costs(c.layout, split, order, costs)]
        for s in strides:
            ex = _models.exchange(c, split, n, s)
            a.plans[(n, s)] = (ex["plan"], Slots(ex["units"], ex["result"][0]))
            a.result_bytes = _models.size_of(ex["result"])
            a.unit_bytes[n] = {u: _models.size_of(shapes) for u, shapes in ex["units"].items()}
    return a


def full_flops(arch: str, batch: int = 2) -> float:
    """FLOPs of one whole denoiser call of ``arch`` (fp16, meta device)."""
    import _models
    import torch

    from asyncdiff import splits

    c = _models.case(arch, dtype=torch.float16, batch=batch)
    _order, costs = splits.count_costs(c.layout, c.model, c.args, c.kwargs)
    return float(sum(costs))


def calibrate(sd21_flops: float) -> float:
    """Effective FLOP/s such that 50 SD 2.1 calls take the paper's single-GPU latency."""
    return PAPER_STEPS * sd21_flops / PAPER_LATENCY[CALIBRATE_ON][(0, 0)]


# ------------------------------------------------------------ the model
@dataclass
class Call:
    kind: str  # "warm-up", "compute", "sync"
    flops: float  # the largest amount any rank computes at this call
    busiest: int  # max over ranks of max(bytes sent, bytes received) at its event (0: no event)


def timeline(a: Arch, n: int, s: int, warm_up: int, steps: int) -> list[Call]:
    """One pipeline call as the C schedule runs it, call by call."""
    from asyncdiff import _core

    plan, slots = a.plans[(n, s)]
    sched = _core.Schedule(n, s, warm_up, 0, steps)
    world = sched.world_size
    calls = []
    for k in range(steps):
        ps = [sched.plan(r, k) for r in range(world)]
        if any(p.compute_all for p in ps):
            kind, flops = "warm-up", a.full_flops
        else:
            comps = [a.comp[n][p.compute_component] for p in ps if p.compute_component >= 0]
            kind, flops = ("compute", max(comps)) if comps else ("sync", 0.0)
        busiest = 0
        if ps[0].exchange:
            for r in range(world):
                sends, recvs = plan.event(r, ps[r], slots)
                out = sum(m.nbytes * len(m.peers) for m in sends)
                inn = sum(m.nbytes for m in recvs)
                busiest = max(busiest, out, inn)
        calls.append(Call(kind, flops, busiest))
    return calls


def predict(a: Arch, n: int, s: int, warm_up: int, steps: int, throughput: float, bandwidth: float,
            cfg: bool = False, overlap: bool = False, calls: list[Call] | None = None) -> dict:
    """Predicted latency of one image and speed-up over one GPU at batch 2.

    Returns ``latency``, ``baseline`` (one GPU), ``speedup``, ``compute`` and
    ``comm`` (seconds summed over the calls), ``gpus``."""
    calls = calls if calls is not None else timeline(a, n, s, warm_up, steps)
    share = 0.5 if cfg else 1.0
    swap = a.result_bytes / 2 / bandwidth if cfg else 0.0  # one output half between the groups, every call
    total = compute_s = comm_s = 0.0
    for call in calls:
        comp = call.flops * share / throughput
        comm = call.busiest * share / bandwidth
        total += (max(comp, comm) if overlap else comp + comm) + swap
        compute_s += comp
        comm_s += comm + swap
    baseline = steps * a.full_flops / throughput
    return {"latency": total, "baseline": baseline, "speedup": baseline / total, "compute": compute_s,
            "comm": comm_s, "gpus": (n + s - 1) * (2 if cfg else 1)}


def original_bytes(a: Arch, n: int) -> int:
    """Bytes the original moves per asynchronous step: every unit's output broadcast from its
    owner to every other rank, one blocking NCCL broadcast per unit (SPEC.md §5), so the
    broadcasts run one after the other and each takes about its size over the link."""
    return sum(a.unit_bytes[n].values())


def original_calls(a: Arch, n: int, calls: list[Call]) -> list[Call]:
    """``calls`` with every asynchronous event carrying the original's broadcast instead of ours."""
    return [Call(c.kind, c.flops, original_bytes(a, n) if c.busiest and c.kind != "warm-up" else 0)
            for c in calls]


def counts(calls: list[Call]) -> str:
    kinds = [c.kind for c in calls]
    events = sum(1 for c in calls if c.busiest)
    return (f"{kinds.count('warm-up')} warm-up, {kinds.count('compute')} compute, {kinds.count('sync')} sync; "
            f"{events} events")


# ------------------------------------------------------------ output
def paper_cell(arch: str, n: int, s: int, steps: int):
    if steps != PAPER_STEPS or (n, s) not in PAPER_SPEEDUP.get(arch, {}):
        return None
    return f"{PAPER_SPEEDUP[arch][(n, s)]:.1f}x ({PAPER_LATENCY[arch][(n, s)]:.2f} s)"


def main(argv=None):
    args = parse_args(argv)
    archs = [x.strip() for x in args.archs.split(",") if x.strip()]
    ns = _util.int_list(args.n)
    strides = _util.int_list(args.strides)
    links = parse_links(args.bandwidth)
    ws = _util.int_list(args.warm_up)
    warm = {1: ws[0], 2: ws[-1]}
    sens = _util.int_list(args.sensitivity) if args.sensitivity.strip() else []

    data = {}
    for arch in archs:
        data[arch] = measure(arch, ns, strides)
        print(f"  done: {arch}", file=sys.stderr, flush=True)
    if args.throughput:
        thr, how = args.throughput * 1e12, f"{args.throughput:g} TFLOP/s effective (given by --throughput)"
    else:
        f21 = data[CALIBRATE_ON].full_flops if CALIBRATE_ON in data else full_flops(CALIBRATE_ON)
        thr = calibrate(f21)
        how = (f"{thr / 1e12:.1f} TFLOP/s effective, calibrated: 50 x {f21 / 1e9:,.0f} GFLOP (SD 2.1 768 px, batch 2) "
               f"/ {PAPER_LATENCY[CALIBRATE_ON][(0, 0)]} s (paper, 1 x RTX A5000) = "
               f"{100 * thr / A5000_DENSE_FP16:.0f} % of the A5000's 111.1 TFLOP/s dense fp16 tensor peak")

    _util.preamble(
        "AsyncDiff speed-up model: counted FLOPs and exchanged bytes -> predicted GPU speed-up",
        threads=None,
        notes=[
            ("**measured here** (meta device, nothing computed): FLOPs per component of the paper split "
             "(torch flop counter via splits.count_costs, fp16, batch 2) and bytes per rank at every transport "
             "event (ExchangePlan.event on each call's C-schedule plan)"),
            f"**stated** throughput: {how}; the same for every model and component",
            ("**stated** links (GB/s = 10^9 B/s per direction, each GPU's link full duplex, no latency term): "
             + ", ".join(name if name == f"{bw / 1e9:g} GB/s" else f"{name}: {bw / 1e9:g} GB/s"
                         for name, bw in links)
             + (" — NVLink: the A5000 bridge gives 112.5 GB/s bidirectional = 56.25 per direction, 50 effective "
                "assumed; a bridge joins 2 GPUs only, so with 3-4 GPUs some pairs really go over PCIe"
                if any(name == "NVLink" for name, _ in links) else "")),
            (f"**stated** warm-up: W = {warm[1]} for S=1, W = {warm[2]} for S=2 (see the warm-up table); "
             f"{args.steps} steps; time_shift off"),
            ("step time = largest computed component / throughput + busiest rank's max(sent, received) bytes / "
             "bandwidth (no overlap) or the max of the two (full overlap); warm-up call = whole model; stride-2 "
             "sync call = 0 compute, no event"),
            ("cfg: two groups of N+S-1 GPUs at batch 1 (compute and exchanged bytes halve) + one swap of the "
             "output's half per call (never overlapped); GPUs = 2(N+S-1); speed-ups against 1 GPU at batch 2"),
            ("paper: SPEC.md §7 (50 DDIM steps, RTX A5000 + NVLink, the original code: NCCL broadcast of every "
             "unit); — where the paper has no figure"),
        ],
    )

    print("### Inputs\n")
    rows = []
    for arch in archs:
        a = data[arch]
        paper1 = PAPER_LATENCY.get(arch, {}).get((0, 0)) if args.steps == PAPER_STEPS else None
        implied = PAPER_STEPS * a.full_flops / paper1 if paper1 else None
        rows.append([a.name, a.desc.split(" (")[0], a.full_flops / 1e9, args.steps * a.full_flops / thr, paper1,
                     f"{implied / 1e12:.1f} ({100 * implied / A5000_DENSE_FP16:.0f} %)" if implied else None,
                     _util.nbytes_h(a.result_bytes)])
    print(_util.table(["model", "size", "GFLOP/call [measured]", "1-GPU latency s [model]",
                       "1-GPU latency s [paper]", "paper-implied TFLOP/s (of peak)", "output [measured]"], rows,
                      align="llrrrrr"))
    print()
    rows = []
    for arch in archs:
        a = data[arch]
        for n in ns:
            for s in strides:
                calls = timeline(a, n, s, warm[s], args.steps)
                per_event = max((c.busiest for c in calls if c.kind != "warm-up"), default=0)
                rows.append([a.name, n, s, " / ".join(f"{x / 1e9:,.0f}" for x in a.comp[n]),
                             a.full_flops / max(a.comp[n]), per_event / 2**20, warm[s], counts(calls)])
    print(_util.table(["model", "N", "S", "component GFLOP [measured]", "compute-only step speed-up",
                       "busiest MiB/async event [measured]", "W [stated]", "calls (C schedule)"],
                      rows, align="lrrlrrrl"))

    print("\n### Predicted speed-up over one GPU\n")
    rows = []
    for arch in archs:
        a = data[arch]
        for n in ns:
            for s in strides:
                calls = timeline(a, n, s, warm[s], args.steps)
                ideal = predict(a, n, s, warm[s], args.steps, thr, float("inf"), calls=calls)
                for name, bw in links:
                    p = {(cfg, ov): predict(a, n, s, warm[s], args.steps, thr, bw, cfg, ov, calls)
                         for cfg in (False, True) for ov in (False, True)}
                    base = p[(False, False)]
                    rows.append([a.name, n, s, f"{base['gpus']} / {p[(True, False)]['gpus']}", warm[s], name,
                                 1e3 * base["comm"],
                                 ideal["speedup"], base["latency"], base["speedup"], p[(False, True)]["speedup"],
                                 p[(True, False)]["speedup"], p[(True, True)]["speedup"],
                                 paper_cell(arch, n, s, args.steps)])
    print(_util.table(["model", "N", "S", "GPUs (/ cfg)", "W", "link", "comm ms", "no comm",
                       "latency s", "speed-up", "overlap", "cfg", "cfg overlap", "paper"], rows,
                      align="lrrrrlrrrrrrrl"))
    print("\ncomm ms: transfer milliseconds per image (no overlap, no cfg); no comm: the same schedule with "
          "infinite bandwidth; latency s and speed-up: no overlap, no cfg; overlap: full overlap; cfg: "
          "cfg_parallel (no overlap); cfg overlap: both.")

    if sens:
        name, bw = links[0]
        print(f"\n### Against the paper: warm-up and exchange ({name}, no overlap, no cfg)\n")
        rows = []
        for arch in archs:
            a = data[arch]
            for n in ns:
                for s in strides:
                    row = [a.name, n, s]
                    for w in sens:
                        if w >= args.steps:
                            row += [None, None]
                            continue
                        calls = timeline(a, n, s, w, args.steps)
                        row.append(predict(a, n, s, w, args.steps, thr, bw, calls=calls)["speedup"])
                        row.append(predict(a, n, s, w, args.steps, thr, bw, calls=original_calls(a, n, calls))
                                   ["speedup"])
                    row.append(paper_cell(arch, n, s, args.steps))
                    rows.append(row)
        heads = [f"W={w} {who}" for w in sens for who in ("ours", "orig.")]
        print(_util.table(["model", "N", "S"] + heads + ["paper"], rows, align="lrr" + "r" * len(heads) + "l"))
        print("\nours: this project's exchange plan; orig.: the same model with the original's exchange "
              "(every unit's output broadcast to every rank at each asynchronous event, one blocking broadcast "
              "per unit, so per event the sum of all unit outputs over the link), i.e. the code the paper timed.")

    if "sd21" in data and args.steps == PAPER_STEPS and 1 in strides:
        a = data["sd21"]
        print("\n### Check of the link figure: the paper's measured communication (SD 2.1, original code)\n")
        rows = []
        for (n, s), t in PAPER_COMM_SD21.items():
            if n not in ns:
                continue
            moved = (args.steps - warm[1]) * original_bytes(a, n)
            row = [f"N{n}S{s}", t, moved / 2**30, moved / t / 1e9]
            row += [moved / bw for _, bw in links]
            row.append(predict(a, n, s, warm[s], args.steps, thr, links[0][1])["comm"])
            rows.append(row)
        print(_util.table(["config", "paper s", "original GiB/image", "implied GB/s"]
                          + [f"original @ {name} s" for name, _ in links] + [f"ours @ {links[0][0]} s"],
                          rows, align="lrrr" + "r" * (len(links) + 1)))
        print(f"\noriginal: {args.steps - warm[1]} asynchronous steps x the sum of all unit outputs (serial "
              "blocking broadcasts); implied GB/s: that volume over the paper's measured time; ours: this "
              "project's exchange plan on the first link (no overlap).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
