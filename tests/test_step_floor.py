"""The training step's computed floor (pipelines/step_floor.py) and its columns in
pipelines/bench_train_step.py's table."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import bench_train_step as bench  # noqa: E402
from pipelines.step_floor import CopyProbe, StepCost, copy_bandwidth, floor_seconds, step_cost  # noqa: E402

B, d, m, k = 4096, 768, 6144, 32


def test_flops_of_the_dense_and_sparse_steps_and_auxk():
    assert step_cost("vanilla", B, d, m, k).flops == 10 * B * d * m
    assert step_cost("topk", B, d, m, k, sparse_kernels=False).flops == 10 * B * d * m
    sparse = step_cost("topk", B, d, m, k)
    assert sparse.flops == 2 * B * d * m + 8 * B * k * d == step_cost("batchtopk", B, d, m, k).flops
    assert step_cost("topk", B, d, m, k, n_dead=100).flops - sparse.flops == 10 * B * d * 100
    # a threshold rule's selected-entries path: the sparse count with its mean selected entries per token
    assert step_cost("vanilla", B, d, m, k, selected=50.0).flops == 2 * B * d * m + 8 * B * 50.0 * d
    assert step_cost("jumprelu", B, d, m, k, selected=50.0, sparse_kernels=False).flops == 10 * B * d * m


def test_bytes_count_parameters_adam_and_the_batch_sized_tensors():
    P = 2 * d * m + m + d
    params = 4 * (9 * d * m + 8 * P)
    assert step_cost("topk", B, d, m, k).bytes == params + 8 * B * d + 2 * 4 * B * m
    assert step_cost("jumprelu", B, d, m, k).bytes == params + 8 * B * d + 6 * 4 * B * m
    assert step_cost("jumprelu", B, d, m, k, act_bytes=2).bytes == params + 8 * B * d + 6 * 2 * B * m


def test_the_floor_is_the_larger_bound():
    assert floor_seconds(StepCost(2e9, 1e6), 1e9, 1e9) == (2.0, "flops")
    assert floor_seconds(StepCost(1e6, 3e9), 1e9, 1e9) == (3.0, "bytes")


def test_the_bandwidth_is_measured_on_a_real_copy():
    cpu = torch.device("cpu")
    probe = CopyProbe(cpu, nbytes=4 << 20)
    assert probe.bytes_moved == 8 << 20 and torch.equal(probe.dst, probe.src) and probe.seconds() > 0
    assert 1e6 < copy_bandwidth(cpu, nbytes=4 << 20, repeats=2) < 1e13


def test_the_table_shows_flops_bytes_rates_floor_and_both_ratios():
    ours = {"median_step_s": 0.2, "tokens_per_s": B / 0.2, "floor_s": 0.1, "step_over_floor": 2.0,
            "step_s": [0.2, 0.21], "floors_s": [0.1, 0.1], "mem_ratio": 5.0, "step_peak_bytes": 2**30,
            "flops": 3e11, "bytes": 9e8, "gemm_flops_per_s": 1e11, "bandwidth_bytes_per_s": 1e10, "roof_s": 0.09,
            "roof_bound": "bytes", "step_over_roof": 0.2 / 0.09, "precision": "fp32"}
    rows = bench.build_rows([{"arch": "topk", "d_in": d, "expansion": 8, "ours": ours, "saelens": "skipped"}])
    line = dict(zip(bench.HEAD, bench.table_lines(rows)[0]))
    assert line["GFLOP"] == "300.0" and line["MB"] == "900" and line["GEMM GFLOP/s"] == "100.0 fp32"
    assert line["GB/s"] == "10.0" and line["floor ms"] == "90.0 (bytes)" and line["step/floor"] == "2.22"
    assert line["step/fwd mm"] == "2.00 MISS"  # the CPU target for topk is 1.3 dense forward products


def test_the_sparse_step_floor_is_below_the_dense_one():
    sparse = floor_seconds(step_cost("topk", B, d, m, k), 5e13, 3e12)[0]
    dense = floor_seconds(step_cost("topk", B, d, m, k, sparse_kernels=False), 5e13, 3e12)[0]
    assert sparse < dense / 3
