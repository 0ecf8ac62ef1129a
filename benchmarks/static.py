"""The *static* performance report: the latent step's kernels compiled for sm_90, read without a GPU.

    python -m benchmarks.static [--json FILE]

Triton: the bound latent step (``gapkern.triton_kernels.prepare_latent_step``) is set up and called at
the 3B and 7B shapes (bfloat16, B = 1 and 64, calibrated or not) with ``JITFunction.run`` replaced:
each launch goes through Triton's own binder and ``_pack_args`` (the runtime's specialization:
16-divisible integers and 16-byte aligned pointers become ``tt.divisibility`` attributes, 1s become
constants) and is compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``. The PTX is
read for the width of every global load, attributed to the kernel argument its address comes from
(a taint pass over the PTX registers from each ``ld.param``), and ptxas ``-v`` gives registers and
spills. CUDA: ``csrc/latent_mma.cu`` and ``csrc/rowwise.cu`` through ``nvcc -arch=sm_90 -Xptxas -v``
(registers, spills) and ``-ptx`` (load widths per kernel, all arguments together).

Every figure is *static*: read from compiled code, never measured. The bound is the bytes the
kernel must move (each tensor it touches read or written once) over the DRAM bandwidth of an
H100 SXM / H200. Nothing is cached between runs (a fresh Triton cache directory each time).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SMS = 132  # H100 SXM and H200
PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}
SHAPES = {"3B": (2048, 360), "7B": (3584, 629)}  # (D, d): Qwen2.5-VL hidden size, the head's rank
ROWS = (1, 64)
ROOT = Path(__file__).resolve().parents[1]
# The kernel arguments whose loads must be vectors: the head's weight and basis, and hidden.
WIDE = {"project_kernel": {"w_ptr": "W", "h_ptr": "hidden"}, "reconstruct_kernel": {"basis_ptr": "U"},
        "calibrate_kernel": {"x_ptr": "latents"}}

_REG = re.compile(r"%[a-z]+[0-9]+")
_LD = re.compile(r"ld\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.(?:b|u|s|f)(\d+)")
_CP = re.compile(r"cp\.async\.\w+\.shared\.global\s*\[[^\]]*\],\s*\[([^\]]*)\],\s*(0x[0-9a-f]+|\d+)")


@dataclass
class Kernel:
    name: str
    case: str
    grid: tuple = ()
    registers: int = 0
    spill_bytes: int = 0
    loads: dict = field(default_factory=dict)  # argument -> Counter(width in bytes -> count)
    bytes_moved: int = 0


def load_widths(ptx: str, params: list[str]) -> dict[str, Counter]:
    """{argument name: Counter(bytes per load -> loads)} for the global loads (ld.global, cp.async) of
    one PTX kernel whose .param i is ``params[i]``; '?' for an address no argument reaches."""
    taint: dict[str, frozenset] = defaultdict(frozenset)
    body = []
    for raw in ptx.splitlines():
        line = raw.split("//")[0].strip().rstrip(";")
        if not line or line.startswith((".", "{", "}")) or line.endswith(":"):
            continue
        line = re.sub(r"^@!?%\w+\s+", "", line)
        body.append(line)
        m = re.match(r"ld\.param\.\w+\s+(%\w+),\s*\[\w+_param_(\d+)", line)
        if m and params[int(m.group(2))]:  # "": not a pointer
            taint[m.group(1)] = frozenset([params[int(m.group(2))]])
    changed = True
    while changed:  # propagate through every non-memory instruction until nothing changes (loops)
        changed = False
        for line in body:
            op, _, rest = line.partition(" ")
            if op.startswith(("ld.", "st.", "cp.", "atom", "red", "bar", "ret", "bra", "mma", "wgmma", "fence")):
                continue
            regs = _REG.findall(rest)
            if rest.lstrip().startswith("{"):
                head, _, tail = rest.partition("}")
                dests, srcs = _REG.findall(head), _REG.findall(tail)
            else:
                dests, srcs = regs[:1], regs[1:]
            new = frozenset().union(*(taint[r] for r in srcs)) if srcs else frozenset()
            for d in dests:
                if not new <= taint[d]:
                    taint[d] = taint[d] | new
                    changed = True
    widths: dict[str, Counter] = defaultdict(Counter)

    def owner(addr):
        names = frozenset().union(*(taint[r] for r in _REG.findall(addr))) if _REG.findall(addr) else frozenset()
        return "+".join(sorted(names)) or "?"

    for line in body:
        m = _LD.match(line)
        if m:
            addr = line[line.rindex("[") + 1:]
            widths[owner(addr)][int(m.group(1) or 1) * int(m.group(2)) // 8] += 1
            continue
        m = _CP.match(line)
        if m:
            widths[owner(m.group(1))][int(m.group(2), 0)] += 1
    return dict(widths)


def ptxas_usage(ptxas: str, source: Path, args: list[str]) -> list[tuple[str, int, int]]:
    """[(function, registers, spill bytes)] from ``ptxas -v`` (or ``nvcc -Xptxas -v``) output."""
    run = subprocess.run([ptxas, *args, str(source)], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"{ptxas} {source}: {run.stderr[-2000:]}")
    out, name, spill = [], None, 0
    for line in (run.stdout + run.stderr).splitlines():
        if m := re.search(r"Function properties for (\S+)", line):
            name = m.group(1)
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spill = int(m.group(1)) + int(m.group(2))
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            out.append((name, int(m.group(1)), spill))
            name, spill = None, 0
    return out


def triton_kernels(cache_dir: str) -> list[Kernel]:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from gapkern import triton_kernels as tk
    from gapkern.ops import _cache

    assert not tk.INTERPRET, "benchmarks.static: unset TRITON_INTERPRET (the interpreter compiles nothing)"
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    # The ptxas Triton itself assembles sm_90 with (triton 3.9 bundles a newer one as ptxas-blackwell).
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = str(next(p for p in (bundled / "ptxas-blackwell", bundled / "ptxas") if p.exists()))
    launches: list = []

    def record(self, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, sig, const, attrs = self._pack_args(backend, kwargs, bound, spec, opts)
        moved = sum(v.numel() * v.element_size() for v in bound.values() if isinstance(v, torch.Tensor))
        launches.append((self, sig, const, attrs, options, (tuple(grid) + (1, 1))[:3], moved))

    JITFunction.run = record
    for module in (tk.project,):  # the launch plan of an H100 / H200
        module.num_sms = lambda device: SMS
    kernels = []
    compiled: dict = {}
    for shape_name, (D, d) in SHAPES.items():
        for B in ROWS:
            for calibrated in (False, True):
                g = torch.Generator().manual_seed(0)
                t = {k: torch.randn(*s, generator=g).bfloat16() for k, s in
                     dict(h=(B, D), w=(D, d), U=(D, d), b=(d,), m=(D,), s=(d,)).items()}
                out = torch.empty(B, D, dtype=torch.bfloat16)
                tau = torch.ones(B) if calibrated else None
                launches.clear()
                step = tk.prepare_latent_step(t["w"], t["b"], t["U"], t["m"], tau, t["s"], 1e-6,
                                           torch.ones(B, dtype=torch.bool), out, _cache.workspace)
                step(t["h"])
                case = f"{shape_name} D{D} d{d} B{B}" + (" calibrated" if calibrated else "")
                for fn, sig, const, attrs, options, grid, moved in list(launches):
                    key = (fn.fn.__name__, str(sig), str(sorted(const.items())), str(attrs), str(options))
                    if key not in compiled:
                        ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                                            target=target, options=options.__dict__)
                        params = [n if v.startswith("*") else "" for n, v in sig.items() if v != "constexpr"]
                        ptx = Path(cache_dir) / f"k{len(compiled)}.ptx"
                        ptx.write_text(ck.asm["ptx"])
                        (_, regs, spill), = ptxas_usage(ptxas, ptx, ["-arch=sm_90a", "-v", "-o", os.devnull])
                        compiled[key] = (regs, spill, load_widths(ck.asm["ptx"], params))
                    regs, spill, loads = compiled[key]
                    kernels.append(Kernel(fn.fn.__name__, case, grid, regs, spill, loads, moved))
    return kernels


def cuda_kernels(work: Path) -> list[Kernel]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    kernels = []
    for source in ("latent_mma.cu", "rowwise.cu"):
        path = ROOT / "csrc" / source
        usage = ptxas_usage(nvcc, path, ["-arch=sm_90", "-std=c++17", "-Xptxas", "-v", "-c", "-o",
                                         str(work / (source + ".o"))])
        ptx_file = work / (source + ".ptx")
        subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-ptx", str(path), "-o", str(ptx_file)], check=True)
        entries = re.split(r"\.entry\s+", ptx_file.read_text())[1:]
        widths = {}
        for entry in entries:
            name = entry.split("(")[0].strip()
            n = len(re.findall(r"_param_\d+[,\s)]", entry.split(")")[0]))
            w = load_widths(entry, [f"arg{i}" for i in range(max(n, 1))])
            widths[name] = sum(w.values(), Counter())
        names = subprocess.run(["c++filt"], input="\n".join(u[0] for u in usage), capture_output=True,
                               text=True).stdout.splitlines()
        for (mangled, regs, spill), pretty in zip(usage, names):
            short = re.sub(r"gapkern::\(anonymous namespace\)::|void |\(.*", "", pretty)
            kernels.append(Kernel(short, f"csrc/{source}", (), regs, spill,
                                  {"all": widths.get(mangled, Counter())}))
    return kernels


def _fmt_loads(loads: dict, names: dict) -> str:
    parts = []
    for arg, widths in sorted(loads.items()):
        label = names.get(arg, arg.removesuffix("_ptr"))
        parts.append(label + " " + ",".join(f"{w}Bx{n}" for w, n in sorted(widths.items())))
    return "; ".join(parts)


def report(kernels: list[Kernel]) -> str:
    lines = ["# Static performance report (sm_90, compiled, not measured)", "",
             f"Grid vs {SMS} SMs (H100 SXM / H200). Loads: bytes per global load x count in the PTX, "
             "per argument. Bound: bytes moved / DRAM peak (H100 3.35 TB/s, H200 4.8 TB/s).", "",
             "| case | kernel | grid (programs) | vs SMs | regs | spill B | loads | MB moved | "
             "bound H100 / H200 us |", "|---|---|---|---|---|---|---|---|---|"]
    steps = defaultdict(list)
    for k in kernels:
        if k.grid:
            n = k.grid[0] * k.grid[1] * k.grid[2]
            steps[k.case].append(k)
            bound = " / ".join(f"{k.bytes_moved / (g * 1e3):.2f}" for g in PEAK_GBPS.values())
            lines.append(f"| {k.case} | {k.name} | {n} {k.grid} | {n / SMS:.2f} | {k.registers} | {k.spill_bytes} "
                         f"| {_fmt_loads(k.loads, WIDE.get(k.name, {}))} | {k.bytes_moved / 1e6:.2f} | {bound} |")
        else:
            lines.append(f"| {k.case} | {k.name} | | | {k.registers} | {k.spill_bytes} | "
                         f"{_fmt_loads(k.loads, {})} | | |")
    lines += ["", "Launches per step (Triton, bound step):", ""]
    lines += [f"- {case}: {len(ks)} ({', '.join(k.name for k in ks)}), "
              f"{sum(k.bytes_moved for k in ks) / 1e6:.2f} MB, static bound "
              + " / ".join(f"{sum(k.bytes_moved for k in ks) / (g * 1e3):.2f}" for g in PEAK_GBPS.values())
              + " us (H100 / H200)" for case, ks in steps.items()]
    return "\n".join(lines)


def problems(kernels: list[Kernel]) -> list[str]:
    """What the CI test rejects: W, U or hidden read with loads narrower than 16 bytes, or a spill."""
    bad = []
    for k in kernels:
        if k.spill_bytes:
            bad.append(f"{k.case} {k.name}: spills {k.spill_bytes} bytes")
        for arg, label in WIDE.get(k.name, {}).items():
            widths = k.loads.get(arg, Counter())
            if not widths:
                bad.append(f"{k.case} {k.name}: no global load of {label} found")
            elif min(widths) < 16:
                bad.append(f"{k.case} {k.name}: {label} read with {min(widths)}-byte loads ({dict(widths)})")
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the kernels' figures to this file")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels (nvcc)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gapkern-static-") as tmp:
        kernels = triton_kernels(tmp)
        if not args.no_cuda:
            kernels += cuda_kernels(Path(tmp))
    print(report(kernels))
    bad = problems(kernels)
    for line in bad:
        print("PROBLEM:", line)
    if args.json:
        Path(args.json).write_text(json.dumps([dict(k.__dict__, loads={a: dict(w) for a, w in k.loads.items()})
                                               for k in kernels], indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
