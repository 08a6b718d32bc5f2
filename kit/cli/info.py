"""``otkit info`` (devices, ONNX Runtime providers, TensorRT) and ``otkit --version`` (the kit and its libraries)."""

from __future__ import annotations

import os
import platform

import click

from kit.cli.common import dependency_versions, emit_json, table


def print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """The eager ``--version`` callback of the ``otkit`` group: versions, one a line, then exit."""
    if not value or ctx.resilient_parsing:
        return
    v = dependency_versions()
    providers = ", ".join(v.pop("onnxruntime_providers")) or "none"
    click.echo(f"otkit {v.pop('otkit')}")
    for k, val in v.items():
        click.echo(f"  {k:<16}{val if val is not None else 'not installed'}")
    click.echo(f"  {'ort providers':<16}{providers}")
    ctx.exit()


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(as_json: bool) -> None:
    """Devices, ONNX Runtime providers and TensorRT availability."""
    import torch

    v = dependency_versions()
    devices = [{"device": "cpu", "name": platform.processor() or platform.machine(), "detail": f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads"}]
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        devices.append({"device": f"cuda:{i}", "name": p.name,
                        "detail": f"compute {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB"})
    report = {
        "versions": {k: val for k, val in v.items() if k != "onnxruntime_providers"},
        "devices": devices,
        "onnxruntime_providers": v["onnxruntime_providers"],
        "tensorrt": {"available": v["tensorrt"] is not None, "version": v["tensorrt"]},
    }
    if as_json:
        emit_json(report)
        return
    click.echo(table(devices, ["device", "name", "detail"]))
    click.echo()
    click.echo(f"ONNX Runtime {v.get('onnxruntime')}: providers {', '.join(report['onnxruntime_providers']) or 'none'}")
    click.echo(f"TensorRT: {v['tensorrt'] or 'not installed (pip install otkit[gpu] on a CUDA machine)'}")
