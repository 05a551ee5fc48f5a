"""Where a decode token's time goes: torch.profiler over a few tokens, boiled down to a few numbers.

    breakdown = profile_decode(step, tokens=16, device=device)   # step(): decode one token

Per token, in milliseconds: wall (under the profiler, a little slower than unprofiled), device
time of kernels on any stream other than host-to-device copies (compute), host-to-device copy
time (the copy stream), host time blocked in synchronisations (the one routing sync per layer,
prediction reads, the sampled token), and the host time not accounted for by waiting, which is
mostly Python and kernel launches. Counts per token: kernel launches from the host (a CUDA graph's replay
counts one), asynchronous copies issued, and blocking synchronisations. Plus the top operators by host
self time and by device time.

The profiler slows graph launches (it traces every node), so `host_split` times the same tokens again without
it, where the step replays graphs: wall, host time launching graph pieces, host time between pieces, and of
that the time blocked in routing reads (what is left is the provider's Python and its small copies).
"""

from __future__ import annotations

import time

import torch

SYNC_KEYS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
# kernel launches from the host: a CUDA graph's replay is one launch, whatever it holds
LAUNCH_KEYS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
COPY_KEYS = ("cudaMemcpyAsync",)


def _device_time(event) -> float:
    # torch >= 2.4 names it self_device_time_total; older releases self_cuda_time_total (microseconds)
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def profile_decode(step, tokens: int, device: torch.device, top: int = 12, graph=None, copier=None) -> dict:
    """`graph`: the step's GraphCapture, `copier`: the provider's CudaCopier, where they exist (for `host_split`)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(tokens):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - started
    events = prof.key_averages()
    copy = sum(_device_time(e) for e in events if "Memcpy HtoD" in e.key)
    device_total = sum(_device_time(e) for e in events)
    sync = sum(e.self_cpu_time_total for e in events if e.key in SYNC_KEYS)
    per_token = lambda microseconds: round(microseconds / 1e3 / tokens, 3)
    wall_us = wall * 1e6
    breakdown = {
        "tokens": tokens,
        "wall_ms_per_token": per_token(wall_us),
        "compute_ms_per_token": per_token(device_total - copy),
        "h2d_copy_ms_per_token": per_token(copy),
        "host_sync_wait_ms_per_token": per_token(sync),
        "host_other_ms_per_token": per_token(max(wall_us - sync, 0.0)),
        "launches_per_token": sum(e.count for e in events if e.key in LAUNCH_KEYS) / tokens,
        "copies_per_token": sum(e.count for e in events if e.key in COPY_KEYS) / tokens,
        "syncs_per_token": sum(e.count for e in events if e.key in SYNC_KEYS) / tokens,
        "top_host_ops": [(e.key, per_token(e.self_cpu_time_total), e.count // tokens)
                         for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]],
        "top_device_ops": [(e.key[:80], per_token(_device_time(e)), e.count // tokens)
                           for e in sorted(events, key=lambda e: -_device_time(e))[:top] if _device_time(e) > 0],
    }
    if graph is not None:
        breakdown["host_split"] = host_split(step, tokens, device, graph, copier)
    return breakdown


def host_split(step, tokens: int, device: torch.device, graph, copier) -> dict:
    """Milliseconds per token, unprofiled: wall, launching graph pieces, between pieces, blocked in routing reads."""
    torch.cuda.synchronize(device)
    graph.launch_seconds = graph.host_work_seconds = 0.0
    waited = getattr(copier, "read_wait_seconds", 0.0)
    started = time.perf_counter()
    for _ in range(tokens):
        step()
    torch.cuda.synchronize(device)
    per_token = lambda seconds: round(seconds * 1e3 / tokens, 3)
    return {"wall_ms_per_token": per_token(time.perf_counter() - started),
            "launch_ms_per_token": per_token(graph.launch_seconds),
            "between_pieces_ms_per_token": per_token(graph.host_work_seconds),
            "routing_wait_ms_per_token": per_token(getattr(copier, "read_wait_seconds", 0.0) - waited),
            "pieces": len(graph.pieces)}
