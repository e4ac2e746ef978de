"""Compile every fastkd kernel for NVIDIA GPUs without a GPU and print a JSON report.

Run in its own process without TRITON_INTERPRET (the interpreter patches triton.language):
    python tests/codegen_report.py > report.json
Each entry: registers, local-memory bytes (spills) and whether 128-bit global loads occur, for
bf16 rows of V = 131072 (Triton's launcher marks V and row strides, divisible by 16, as such).
"""
import json
import os
import sys

import torch
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from fastkd import kernels  # noqa: E402
from triton_tools import compile_report  # noqa: E402
from fastkd.kernels import crd as crd_kernels, rkd as rkd_kernels  # noqa: E402  (imported lazily by fastkd)
from fastkd.kernels import at as at_kernels, hcl as hcl_kernels, ickd as ickd_kernels  # noqa: E402

V = 131072
ARCHS = (90, 80)
ROW = {"V": "i32", "temperature": "fp64"}
TILES = {"BLOCK_R": kernels.dist.BLOCK_R, "BLOCK_C": 64}  # the DIST tile kernels (their BLOCK_C for large V)


def _strides(*names):
    return {n: "i64" for n in names}


def _tiles(tiles):
    """A launcher's tile constexprs (its dict without num_warps)."""
    return {k: v for k, v in tiles.items() if k != "num_warps"}


def _warps(tiles):
    return {"num_warps": tiles["num_warps"]}


def _gram(tiles):
    """ICKD's Gram tiles (the forward and coupling kernels have no BLOCK_L)."""
    return {k: v for k, v in _tiles(tiles).items() if k != "BLOCK_L"}

# kernel, runtime signature, constexprs[, launch]: bf16 rows get 4096-column blocks and 8 warps unless the
# constexprs fix their own tile (BLOCK_R, as DIST's tile kernels) or `launch` gives num_warps.  launch
# "ldg128": False marks kernels that cannot use 128-bit loads by nature: RKD's work on small tiles of
# [N, N] fp64 matrices (L2-resident) with one or two elements per thread.
CASES = {
    "kl_forward": (
        kernels.kl.kl_forward_kernel,
        {"p_ptr": "*bf16", "q_ptr": "*bf16", "labels_ptr": "*i64", "loss_ptr": "*fp32", "stats_ptr": "*fp32",
         **ROW, **_strides("stride_p", "stride_q"), "ignore_index": "i32"},
        {"HAS_LABELS": True, "UNIT_P": True, "UNIT_Q": True},
    ),
    "kl_backward": (
        kernels.kl.kl_backward_kernel,
        {"p_ptr": "*bf16", "q_ptr": "*bf16", "labels_ptr": "*i64", "stats_ptr": "*fp32", "grad_loss_ptr": "*fp32",
         "grad_p_ptr": "*bf16", "grad_q_ptr": "*bf16", **ROW, **_strides("stride_p", "stride_q", "stride_g"),
         "ignore_index": "i32"},
        {"HAS_LABELS": True, "GRAD_P": True, "GRAD_Q": True, "UNIT_P": True, "UNIT_Q": True},
    ),
    "jsd_forward": (
        kernels.jsd.jsd_forward_kernel,
        {"s_ptr": "*bf16", "t_ptr": "*bf16", "labels_ptr": "*i64", "loss_ptr": "*fp32", "stats_ptr": "*fp32",
         **ROW, **_strides("stride_s", "stride_t"), "beta": "fp64", "ignore_index": "i32"},
        {"HAS_LABELS": True, "UNIT_S": True, "UNIT_T": True},
    ),
    "jsd_backward": (
        kernels.jsd.jsd_backward_kernel,
        {"s_ptr": "*bf16", "t_ptr": "*bf16", "labels_ptr": "*i64", "stats_ptr": "*fp32", "grad_loss_ptr": "*fp32",
         "grad_s_ptr": "*bf16", "grad_t_ptr": "*bf16", **ROW, **_strides("stride_s", "stride_t", "stride_g"),
         "beta": "fp64", "ignore_index": "i32"},
        {"HAS_LABELS": True, "GRAD_S": True, "GRAD_T": True, "UNIT_S": True, "UNIT_T": True},
    ),
    "dkd_forward": (
        kernels.dkd.dkd_forward_kernel,
        {"s_ptr": "*bf16", "t_ptr": "*bf16", "target_ptr": "*i64", "loss_ptr": "*fp32", "stats_ptr": "*fp32",
         **ROW, **_strides("stride_s", "stride_t"), "alpha": "fp64", "beta": "fp64", "ignore_index": "i32"},
        {"HAS_LABELS": True, "UNIT_S": True, "UNIT_T": True},
    ),
    "dkd_backward": (
        kernels.dkd.dkd_backward_kernel,
        {"s_ptr": "*bf16", "t_ptr": "*bf16", "target_ptr": "*i64", "stats_ptr": "*fp32", "grad_loss_ptr": "*fp32",
         "grad_s_ptr": "*bf16", "grad_t_ptr": "*bf16", **ROW, **_strides("stride_s", "stride_t", "stride_g"),
         "alpha": "fp64", "beta": "fp64", "ignore_index": "i32"},
        {"HAS_LABELS": True, "GRAD_S": True, "GRAD_T": True, "UNIT_S": True, "UNIT_T": True},
    ),
    "dist_row_stats": (
        kernels.dist.dist_row_stats_kernel,
        {"s_ptr": "*bf16", "t_ptr": "*bf16", "labels_ptr": "*i64", "stats_ptr": "*fp32",
         **ROW, **_strides("stride_s", "stride_t"), "ignore_index": "i32"},
        {"HAS_LABELS": True, "UNIT_S": True, "UNIT_T": True},
    ),
    "dist_column_stats": (
        kernels.dist.dist_column_stats_kernel,
        {"s_ptr": "*bf16", "t_ptr": "*bf16", "labels_ptr": "*i64", "row_stats_ptr": "*fp32", "col_stats_ptr": "*fp32",
         "N": "i32", **ROW, **_strides("stride_s", "stride_t"), "stride_sc": "constexpr", "stride_tc": "constexpr",
         "ignore_index": "i32"},
        {"HAS_LABELS": True, "stride_sc": 1, "stride_tc": 1, **TILES},
    ),
    "dist_rowdot": (
        kernels.dist.dist_rowdot_kernel,
        {"x_ptr": "*bf16", "o_ptr": "*bf16", "labels_ptr": "*i64", "c_x_ptr": "*fp32", "c_o_ptr": "*fp32",
         "row_coef_ptr": "*fp32", "col_coef_ptr": "*fp32", "N": "i32", **ROW, **_strides("stride_x", "stride_o"),
         "stride_xc": "constexpr", "stride_oc": "constexpr", "ignore_index": "i32"},
        {"HAS_LABELS": True, "stride_xc": 1, "stride_oc": 1, **TILES},
    ),
    "dist_grad": (
        kernels.dist.dist_grad_kernel,
        {"x_ptr": "*bf16", "o_ptr": "*bf16", "labels_ptr": "*i64", "c_x_ptr": "*fp32", "c_o_ptr": "*fp32",
         "row_coef_ptr": "*fp32", "col_coef_ptr": "*fp32", "grad_ptr": "*bf16", "N": "i32", **ROW,
         **_strides("stride_x", "stride_o"), "stride_xc": "constexpr", "stride_oc": "constexpr", "ignore_index": "i32"},
        {"HAS_LABELS": True, "stride_xc": 1, "stride_oc": 1, **TILES},
    ),
    "sparse_kl_forward": (
        kernels.sparse_kl.sparse_kl_forward_kernel,
        {"s_ptr": "*bf16", "ids_ptr": "*i64", "values_ptr": "*fp32", "labels_ptr": "*i64", "loss_ptr": "*fp32",
         "stats_ptr": "*fp32", "V": "i32", "K": "i32", **_strides("stride_s", "stride_sc", "stride_i", "stride_ic",
         "stride_v", "stride_vc"), "temperature": "fp64", "beta": "fp64", "ignore_index": "i32"},
        {"MODE": 2, "TAIL": True, "LOGITS": False, "HAS_LABELS": True, "UNIT_S": True, "KBLOCK": 64},
    ),
    "sparse_kl_backward": (
        kernels.sparse_kl.sparse_kl_backward_kernel,
        {"s_ptr": "*bf16", "ids_ptr": "*i64", "values_ptr": "*fp32", "labels_ptr": "*i64", "stats_ptr": "*fp32",
         "grad_loss_ptr": "*fp32", "grad_ptr": "*bf16", "V": "i32", "K": "i32", **_strides("stride_s", "stride_sc",
         "stride_i", "stride_ic", "stride_v", "stride_vc", "stride_g"), "temperature": "fp64", "beta": "fp64",
         "ignore_index": "i32"},
        {"MODE": 2, "TAIL": True, "LOGITS": False, "HAS_LABELS": True, "UNIT_S": True, "KBLOCK": 64},
    ),
    "softmax_forward": (
        kernels.softmax.softmax_forward_kernel,
        {"x_ptr": "*bf16", "y_ptr": "*bf16", **ROW, **_strides("stride_x")},
        {"LOG": False, "UNIT_X": True},
    ),
    "softmax_backward": (
        kernels.softmax.softmax_backward_kernel,
        {"y_ptr": "*bf16", "dy_ptr": "*bf16", "dx_ptr": "*bf16", **ROW, **_strides("stride_dy")},
        {"LOG": True, "UNIT_DY": True},
    ),
    "rkd_sqdist": (
        rkd_kernels.sqdist_kernel,
        {"e_ptr": "*bf16", "r_ptr": "*fp64", "N": "i32", "D": "i32", **_strides("stride_n"), "stride_d": "constexpr"},
        {"ACC": tl.float64, "stride_d": 1, "BLOCK_N": rkd_kernels.SQDIST_BLOCK_N, "BLOCK_D": rkd_kernels.SQDIST_BLOCK_D},
        {"num_warps": rkd_kernels.SQDIST_WARPS, "ldg128": False},
    ),
    "rkd_sqdist_backward": (
        rkd_kernels.sqdist_backward_kernel,
        {"e_ptr": "*bf16", "g_ptr": "*fp64", "de_ptr": "*bf16", "N": "i32", "D": "i32", **_strides("stride_n"),
         "stride_d": "constexpr"},
        {"stride_d": 1, "BLOCK_N": rkd_kernels.SQDIST_BLOCK_N, "BLOCK_D": rkd_kernels.SQDIST_BLOCK_D},
        {"num_warps": rkd_kernels.SQDIST_WARPS, "ldg128": False},
    ),
    "rkd_angle_forward": (
        rkd_kernels.angle_forward_kernel,
        {"rs_ptr": "*fp64", "rt_ptr": "*fp64", "partial_ptr": "*fp32", "N": "i32"},
        {"BLOCK_XY": rkd_kernels.ANGLE_BLOCK_XY, "BLOCK_Z": rkd_kernels.ANGLE_BLOCK_Z},
        {"num_warps": rkd_kernels.ANGLE_WARPS, "ldg128": False},
    ),
    "rkd_angle_backward": (
        rkd_kernels.angle_backward_kernel,
        {"rs_ptr": "*fp64", "rt_ptr": "*fp64", "grad_loss_ptr": "*fp32", "gs_ptr": "*fp64", "gt_ptr": "*fp64",
         "N": "i32", "inv_count": "fp64"},
        {"GRAD_S": True, "GRAD_T": True, "BLOCK_XY": rkd_kernels.ANGLE_BLOCK_XY, "BLOCK_Z": rkd_kernels.ANGLE_BLOCK_Z},
        {"num_warps": rkd_kernels.ANGLE_WARPS, "ldg128": False},
    ),
    "crd_nce": (
        crd_kernels.crd_nce_kernel,
        {"v_ptr": "*bf16", "bank_ptr": "*fp32", "idx_ptr": "*i64", "z_ptr": "*fp32", "loss_ptr": "*fp32",
         "grad_ptr": "*fp32", "K1": "i32", "D": "i32", "n_bank": "i32", "chunk": "i32",
         **_strides("stride_v", "stride_bank", "stride_idx"), "stride_vd": "constexpr", "stride_bankd": "constexpr",
         "stride_idxk": "constexpr", "inv_t": "fp64", "m_pn": "fp64", "inv_m_pn": "fp64"},
        {"stride_vd": 1, "stride_bankd": 1, "stride_idxk": 1, "EXP_SUM": False, "GRAD": True, "BLOCK_K": 32,
         "BLOCK_D": 128, "EVEN_D": True},  # feat_dim 128: 32 rows of 128 per tile
        {"num_warps": 4},
    ),
    # hint losses on a ResNet-stage map: bf16 [N, 256, 32, 32]; sizes as constexprs (the launcher marks those
    # divisible by 16 as such; the divisibility rule here covers only V and strides), NCHW (unit stride constexpr)
    "at_map": (
        at_kernels.at_map_kernel,
        {"f_ptr": "*bf16", "q_ptr": "*fp32", "C": "i32", **_strides("stride_n", "stride_c"), "p": "fp64",
         "scale": "fp64"},
        {"L": 1024, "stride_l": 1, "POWER": at_kernels.SQUARE, **_tiles(at_kernels.map_tiles(256, 1024))},
        _warps(at_kernels.map_tiles(256, 1024)),
    ),
    "at_map_grad": (
        at_kernels.at_map_grad_kernel,
        {"f_ptr": "*bf16", "dq_ptr": "*fp32", "df_ptr": "*bf16", "C": "i32",
         **_strides("stride_n", "stride_c", "stride_gn", "stride_gc"), "p": "fp64", "scale": "fp64"},
        {"L": 1024, "stride_l": 1, "stride_gl": 1, "POWER": at_kernels.ABS, **_tiles(at_kernels.map_tiles(256, 1024))},
        _warps(at_kernels.map_tiles(256, 1024)),
    ),
    "at_distance": (
        at_kernels.at_distance_kernel,
        {"qs_ptr": "*fp32", "qt_ptr": "*fp32", "loss_ptr": "*fp32", "stats_ptr": "*fp32", "eps": "fp64",
         "scale": "fp64"},
        {"L": 1024, "PAPER": False, "BLOCK": 1024},
        {"num_warps": 4},
    ),
    "at_distance_grad": (
        at_kernels.at_distance_grad_kernel,
        {"qs_ptr": "*fp32", "qt_ptr": "*fp32", "stats_ptr": "*fp32", "grad_loss_ptr": "*fp32", "dqs_ptr": "*fp32",
         "dqt_ptr": "*fp32", "stride_g": "i32", "eps": "fp64", "scale": "fp64"},
        {"L": 1024, "PAPER": True, "GRAD_S": True, "GRAD_T": True, "BLOCK": 1024},
        {"num_warps": 4},
    ),
    "hcl_forward": (
        hcl_kernels.hcl_forward_kernel,
        {"s_ptr": "*bf16", "t_ptr": "*bf16", "partial_ptr": "*fp32", "pooled_ptr": "*fp32", "C": "i32", "H": "i32",
         **_strides("stride_sn", "stride_sc", "stride_sh", "stride_tn", "stride_tc", "stride_th"),
         "w0": "fp64", "w4": "fp64", "w2": "fp64", "w1": "fp64"},
        {"W": 32, "stride_sw": 1, "stride_tw": 1, "FIRST_SLOT": 0, "SAVE": True, "PRECISION": "tf32x3",
         **_tiles(hcl_kernels.tiles(256, 32, 32, False))},
        _warps(hcl_kernels.tiles(256, 32, 32, False)),
    ),
    "hcl_backward": (
        hcl_kernels.hcl_backward_kernel,
        {"s_ptr": "*bf16", "t_ptr": "*bf16", "pooled_ptr": "*fp32", "grad_loss_ptr": "*fp32", "gs_ptr": "*bf16",
         "gt_ptr": "*bf16", "C": "i32", "H": "i32",
         **_strides("stride_sn", "stride_sc", "stride_sh", "stride_tn", "stride_tc", "stride_th", "stride_gsn",
                    "stride_gsc", "stride_gsh", "stride_gtn", "stride_gtc", "stride_gth"),
         "w0": "fp64", "w4": "fp64", "w2": "fp64", "w1": "fp64"},
        {"W": 32, "stride_sw": 1, "stride_tw": 1, "stride_gsw": 1, "stride_gtw": 1, "FIRST_SLOT": 0, "SAVED": True,
         "GRAD_S": True, "GRAD_T": True, "PRECISION": "tf32x3", **_tiles(hcl_kernels.tiles(256, 32, 32, False))},
        _warps(hcl_kernels.tiles(256, 32, 32, False)),
    ),
    "ickd_forward": (
        ickd_kernels.ickd_forward_kernel,
        {"s_ptr": "*bf16", "t_ptr": "*bf16", "loss_ptr": "*fp32", "coef_ptr": "*fp32",
         **_strides("stride_sn", "stride_sc", "stride_tn", "stride_tc"), "eps": "fp64"},
        {"C": 256, "L": 1024, "stride_sl": 1, "stride_tl": 1, "PRECISION": "tf32",
         **_gram(ickd_kernels.tiles(256, 1024))},
        _warps(ickd_kernels.tiles(256, 1024)),
    ),
    "ickd_coupling": (
        ickd_kernels.ickd_coupling_kernel,
        {"s_ptr": "*bf16", "t_ptr": "*bf16", "coef_ptr": "*fp32", "grad_loss_ptr": "*fp32", "ms_ptr": "*fp32",
         "mt_ptr": "*fp32", **_strides("stride_sn", "stride_sc", "stride_tn", "stride_tc"), "scale": "fp64"},
        {"C": 256, "L": 1024, "stride_sl": 1, "stride_tl": 1, "GRAD_S": True, "GRAD_T": True, "PRECISION": "tf32",
         **_gram(ickd_kernels.tiles(256, 1024))},
        _warps(ickd_kernels.tiles(256, 1024)),
    ),
    "ickd_grad": (  # the recomputing variant (STORED=False) holds the most
        ickd_kernels.ickd_grad_kernel,
        {"s_ptr": "*bf16", "t_ptr": "*bf16", "coef_ptr": "*fp32", "grad_loss_ptr": "*fp32", "ms_ptr": "*fp32",
         "mt_ptr": "*fp32", "gs_ptr": "*bf16", "gt_ptr": "*bf16",
         **_strides("stride_sn", "stride_sc", "stride_tn", "stride_tc", "stride_gsn", "stride_gsc", "stride_gtn",
                    "stride_gtc"), "scale": "fp64"},
        {"C": 256, "L": 1024, "stride_sl": 1, "stride_tl": 1, "stride_gsl": 1, "stride_gtl": 1, "STORED": False,
         "GRAD_S": True, "GRAD_T": True, "PRECISION": "tf32", **_tiles(ickd_kernels.tiles(256, 1024))},
        _warps(ickd_kernels.tiles(256, 1024)),
    ),
}


def report():
    block, num_warps = kernels.common.block_config(V, torch.bfloat16)
    out = {}
    for name, (kernel, signature, constexprs, *launch) in CASES.items():
        divisibility = {n: 16 for n, ty in signature.items() if (n == "V" or n.startswith("stride")) and ty != "constexpr"}
        launch = launch[0] if launch else {}
        own_tile = "BLOCK_R" in constexprs or "num_warps" in launch  # the kernel's own tile: its own warps
        meta = {"ACC": tl.float32, **({} if own_tile else {"BLOCK": block}), **constexprs}
        for arch in ARCHS:
            r = compile_report(kernel, signature, meta, arch=arch, num_warps=launch.get("num_warps", 4) if own_tile
                               else num_warps, divisibility=divisibility)
            out[f"{name}@sm_{arch}"] = {"registers": r.registers, "spill_bytes": r.spill_bytes,
                                        "ldg128": r.has_128bit_loads, "ldg128_expected": launch.get("ldg128", True)}
    return out


if __name__ == "__main__":
    assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"
    json.dump(report(), sys.stdout, indent=1)
