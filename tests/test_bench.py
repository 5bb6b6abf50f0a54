"""The benchmarks' own rules (the measurements themselves run on a GPU: bench/gpu_check.py)."""

from __future__ import annotations

import importlib.util

from conftest import REPO


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mfu_peaks_are_matched_by_exact_model():
    peak = load("train_step").peak_tflops
    names = {
        "NVIDIA H100 80GB HBM3": 989.0,
        "NVIDIA H100 PCIe": 756.0,
        "NVIDIA H100 NVL": 835.0,
        "NVIDIA H200": 989.0,
        "NVIDIA H200 NVL": 835.0,
        "NVIDIA A100-SXM4-80GB": 312.0,
        "NVIDIA A10": 125.0,
        "NVIDIA GeForce RTX 4090": None,
    }
    assert {name: peak(name) for name in names} == names
