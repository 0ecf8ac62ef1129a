"""Benchmark set-up: record the device, the versions and the shapes with every run."""
from __future__ import annotations

import contextlib
import platform

import pytest
import torch

from gapkern import ops

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

# Peak DRAM bandwidth by device name, for cards whose properties lack the memory clock.
_PEAK_GBPS = {"H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H200": 4800.0, "A100-SXM4-80GB": 2039.0}


def peak_bandwidth_gbps() -> float | None:
    """The device's memory bandwidth in GB/s (from its memory clock and bus width)."""
    if not ON_GPU:
        return None
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    for key, value in _PEAK_GBPS.items():
        if key in props.name:
            return value
    return None


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Model benchmarks on the CPU: tiny matmuls gain nothing from threads, and a busy CPU makes OpenMP
    threads spin. On a GPU nothing changes."""
    before = torch.get_num_threads()
    if not ON_GPU:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception as exc:  # recorded, never fatal
            out[name] = f"unavailable: {exc}"
    out["cuda_runtime"] = torch.version.cuda
    return out


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["gapkern_versions"] = versions()
    if ON_GPU:
        props = torch.cuda.get_device_properties(0)
        machine_info["gpu"] = {"name": props.name, "sm": f"{props.major}.{props.minor}",
                               "memory_gib": round(props.total_memory / 2**30, 1),
                               "peak_bandwidth_gbps": peak_bandwidth_gbps()}
    else:
        machine_info["gpu"] = None


def use_backend(name: str):
    """``with use_backend(name):`` runs the ops on backend ``name`` (``gapkern.ops.use_backend``), or skips
    the benchmark where it cannot run; names that are no backend (plain PyTorch baselines) change nothing."""
    if name not in ops.backend.NAMES:
        return contextlib.nullcontext()
    status = ops.backend_status(name, DEVICE)
    if not status.ready or (name != "torch" and not ON_GPU):  # the Triton interpreter is no benchmark
        pytest.skip(f"backend {name}: {status}")
    return ops.use_backend(name)


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def timed(fn, inner: int):
    """A callable running ``fn`` ``inner`` times then waiting for the device: the
    per-call time is the measured time / inner, with launch queues kept full."""
    def run():
        for _ in range(inner):
            fn()
        sync()
    return run


@pytest.fixture
def measure(benchmark):
    """measure(fn, bytes_moved=..., inner=None, **shape_info): benchmark fn, record the median per-call
    time and GB/s; returns the median seconds per call.

    ``inner`` calls per round (default 20 on a GPU, 1 on CPU); 1 for calls that synchronise themselves."""
    def _measure(fn, bytes_moved: int, inner: int | None = None, **info):
        inner = inner or (20 if ON_GPU else 1)
        fn()
        sync()
        benchmark.extra_info.update(info)
        benchmark.extra_info["inner_calls"] = inner
        benchmark(timed(fn, inner))
        # The median: robust to the odd descheduled round on a shared machine.
        per_call = benchmark.stats.stats.median / inner
        benchmark.extra_info["us_per_call"] = round(per_call * 1e6, 3)
        benchmark.extra_info["us_per_call_mean"] = round(benchmark.stats.stats.mean / inner * 1e6, 3)
        benchmark.extra_info["bytes_moved"] = bytes_moved
        benchmark.extra_info["achieved_gbps"] = round(bytes_moved / per_call / 1e9, 2)
        peak = peak_bandwidth_gbps()
        if peak:
            benchmark.extra_info["fraction_of_peak_bandwidth"] = round(bytes_moved / per_call / 1e9 / peak, 3)
        return per_call
    return _measure
