"""benchmarks.static, the static performance report CI runs: the latent step's Triton kernels compiled
for sm_90 at the 3B / 7B shapes with the runtime's own specialization, and the CUDA kernels through
nvcc. Fails if the head's weight W, its basis U or hidden is read with loads narrower than 16
bytes, or if a kernel spills."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gapkern_static_report", ROOT / "benchmarks" / "static.py")
static = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = static  # dataclasses look their module up
_spec.loader.exec_module(static)


def test_load_widths_attributes_each_load_to_its_pointer_argument():
    ptx = """
    ld.param.b64 %rd1, [k_param_0];
    ld.param.b64 %rd2, [k_param_1];
    ld.param.b32 %r1, [k_param_2];
    mad.wide.s32 %rd3, %r1, 2, %rd1;
    @%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd3 + 0 ];
    add.s64 %rd4, %rd2, 16;
    ld.global.b16 { %rs1 }, [ %rd4 + 0 ];
    cp.async.cg.shared.global [ %r9 + 0 ], [ %rd3 + 0 ], 0x10, %r8;
    """
    widths = static.load_widths(ptx, ["w_ptr", "basis_ptr", ""])
    assert widths == {"w_ptr": Counter({16: 2}), "basis_ptr": Counter({2: 1})}


def test_problems_flags_scalar_loads_and_spills():
    narrow = static.Kernel("project_kernel", "case", (1, 1, 1), 40, 0,
                           {"w_ptr": Counter({2: 3}), "h_ptr": Counter({16: 1})})
    spilling = static.Kernel("reconstruct_kernel", "case", (1, 1, 1), 255, 8, {"basis_ptr": Counter({16: 4})})
    bad = static.problems([narrow, spilling])
    assert any("W read with 2-byte loads" in line for line in bad)
    assert any("spills 8 bytes" in line for line in bad)


def test_static_report_passes_for_the_compiled_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-m", "benchmarks.static"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    assert "Static performance report" in run.stdout
    for kernel in ("project_kernel", "reconstruct_kernel"):
        assert f"| 7B D3584 d629 B64 | {kernel}" in run.stdout
    assert "| 7B D3584 d629 B64 calibrated | calibrate_kernel" in run.stdout
    assert "PROBLEM" not in run.stdout
