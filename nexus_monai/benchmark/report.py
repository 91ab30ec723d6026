"""The human-readable table printed by ``nexus-sr benchmark``."""

from __future__ import annotations

from typing import Mapping

__all__ = ["format_report"]

_PART_NAMES = {"encoders": "encoders (Conv3d)", "attention": "KD-Attn (window attention + key projection)",
               "fusion_mlps": "MMF / SEL MLPs", "decoder_mlps": "decoder MLPs",
               "other": "rest (lookups, empty test, tiling, scaling)"}


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f} x"


def _bound(row: Mapping) -> str:
    if row.get("bound_s") is None:
        return ""
    kind = row.get("bound_kind", "")
    kind = f" {kind}" if kind else ""
    return f" | own bound {row['bound_s']:.2f} s{kind}, {_ratio(row.get('ratio_to_bound'))}"


def _parts_rows(add, r: Mapping, indent: str = "  ") -> None:
    add((f"{indent}part: time / FLOPs / attainable at peak GEMM / ratio | own bound (GEMM peak or memory "
         f"bandwidth), ratio", ""))
    for name, row in r["parts"].items():
        add((f"{indent}  {_PART_NAMES.get(name, name)}", f"{row['seconds']:.2f} s / {_si(row['flops'], 'FLOP')} / "
                                                          f"{row['attainable_s']:.2f} s / "
                                                          f"{_ratio(row['ratio_to_attainable'])}{_bound(row)}"))
    whole = {"bound_s": r.get("bound_s"), "ratio_to_bound": r.get("whole_inference_ratio_to_bound")}
    add((f"{indent}  whole inference",
         f"{r['nexus_s']:.2f} s / {_si(r['flops'], 'FLOP')} / {r['attainable_s']:.2f} s / "
         f"{_ratio(r['whole_inference_ratio_to_attainable'])}{_bound(whole)}"))


def format_report(r: Mapping) -> str:
    """The table printed by ``nexus-sr benchmark`` (every number is also in the JSON)."""
    m = r["machine"]
    shape = "x".join(str(s) for s in r["output_shape"])
    rows: list = []
    add = rows.append
    add(f"Nexus-INR benchmark: one {shape} output volume ({r['spacing_mm']:g} mm, both contrasts), {r['device']}"
        + (" with bf16 autocast (amp)" if r.get("amp") else ""))
    add(f"machine  : {m['cpu_model']}, {m['cpus_available']} CPUs available (os.cpu_count {m['cpu_count']}), "
        f"torch {m['torch_version']} with {m['torch_threads']} threads (OMP_WAIT_POLICY {m['omp_wait_policy']}), "
        f"Python {m['python_version']}")
    if m.get("load_average_1min") is not None:
        end = m.get("load_average_1min_end")
        add(
            f"           load average {m['load_average_1min']:.2f} at start"
            + (f", {end:.2f} at the end" if end is not None else "")
            + f" (other processes share these {m['cpus_available']} CPUs)"
        )
    if m.get("cuda_device_name"):
        add(f"device   : {m['cuda_device_name']} ({m['cuda_total_memory_gib']:.0f} GiB, "
            f"compute {m['cuda_capability']}), "
            f"CUDA {m['cuda_version']}, cuDNN {m['cudnn_version']}, TF32 matmul {m['cuda_matmul_allow_tf32']}")
    add(f"input    : {r['input']}")
    add(f"           T1 LR {r['t1_acquisition']} {tuple(r['t1_lr_shape'])}, T2 LR {r['t2_acquisition']} "
        f"{tuple(r['t2_lr_shape'])}, "
        f"target grid {tuple(r['output_shape'])}, brain {r['brain_voxels']:,} voxels")
    add(f"network  : {r['network']}")
    add(f"weights  : {r['weights']}")
    if r.get("config_files"):
        add(f"config   : {' + '.join(r['config_files'])}")
    add("")
    peak = r["peak_gemm_flops_per_s"]
    runs = ", ".join(_si(p, "FLOP/s") for p in r["peak_gemm_runs_flops_per_s"])
    dtype = {"bfloat16": "bf16", "float32": "fp32"}.get(r.get("peak_gemm_dtype", "float32"), "fp32")
    where = f"{r['peak_gemm_threads']} threads" if r["device"] == "cpu" else r["device"]
    add((f"peak {dtype} GEMM ({r['peak_gemm_n']}^3 matmul, {where}; best of runs {runs}; "
         f"the attainable-time reference)",
         _si(peak, "FLOP/s")))
    if r.get("peak_gemm_bf16_flops_per_s") and dtype == "bf16":
        add(("peak fp32 GEMM (same size, same run)", _si(r["peak_gemm_fp32_flops_per_s"], "FLOP/s")))
    if r.get("memory_bandwidth_bytes_per_s"):
        add(("memory bandwidth (256 MiB copy, read + write; the memory-bound parts' reference)",
             _si(r["memory_bandwidth_bytes_per_s"], "B/s")))
    plan = r.get("plan", {})
    tiling = (f"tiles {'x'.join(str(t) for t in plan['tile_shape'])} output voxels, halo {plan['halo_voxels']}, "
              f"{plan['tiles_encoded']} encoded / {plan['tiles_skipped']} empty skipped, chunks of "
              f"{plan['chunk_size']:,}"
              + (f", halo overhead {plan['halo_overhead']:.2f} x" if plan.get("halo_overhead") is not None else "")
              if plan.get("tiled") else "untiled")
    v = r["output_voxels"]
    budget = r["max_memory_gib"] if isinstance(r["max_memory_gib"], str) else f"max {r['max_memory_gib']:g} GiB"
    add((f"inference, whole volume (after: {tiling}; {budget})", ""))
    add(("  Nexus-INR (predict_volumes)", f"{r['nexus_s']:.2f} s"))
    _parts_rows(add, r)
    if r.get("consistency_s"):
        add(("  of the rest: soft data-consistency step", f"{r['consistency_s']:.2f} s"))
    add(("  points decoded (skip_empty)", f"{r['decoded_points']:,} of {v:,} ({100 * r['decoded_fraction']:.1f} %), "
                                          f"{r['decoder_calls']} decoder calls of <= {r['max_points_per_call']:,}"))
    add(("  op kinds at their real shapes: calls, FLOPs, rate (fraction of peak GEMM)", ""))
    for k in r["op_kinds"][:12]:
        rate = "-" if not k["flops_per_s"] else f"{_si(k['flops_per_s'], 'FLOP/s')} ({k['fraction_of_peak']:.2f})"
        add((f"    {k['kind']}", f"{k['calls']} calls, {_si(k['flops'], 'FLOP')}, {rate}"))
    a = r.get("attention_probe")
    if a:
        add(
            (
                f"  KD-Attn alone ({a['points']:,} points, window {a['window']}, key map {tuple(a['key_shape'])})",
                f"window-row gather {_si(a['gather_bytes_per_s'], 'B/s')}, "
                f"positional table ({a['phases']} phases) {a['positional_table_s'] * 1e3:.1f} ms, "
                f"whole {a['us_per_point']:.2f} us/point, {_si(a['forward_bytes_per_s'], 'B/s')} of window rows",
            )
        )
    b = r.get("before")
    if b:
        add(("before (encoders on the whole volumes, default layout, untiled)", ""))
        add(("  Nexus-INR", f"{b['nexus_s']:.2f} s, peak RSS {b['peak_rss_gib']:.2f} GiB"))
        _parts_rows(add, b)
        add(("  speed-up before / after (same run)", f"{r['speedup_before_to_after']:.2f} x"))
        add(("  max |after - before| (outputs up to " + f"{r['max_abs_before']:.3g})",
             f"{r['max_abs_diff_before_after']:.2e}"))
    add(("  trilinear, both contrasts (SimpleITK)", f"{r['trilinear_s']:.2f} s"))
    add(("  ratio Nexus-INR / trilinear", f"{r['ratio_nexus_to_trilinear']:.1f} x"))
    add(("  output voxels/s, Nexus-INR",
         f"{_si(r['voxels_per_s'], 'voxel/s')} ({_si(r['decoded_points_per_s'], 'point/s')} decoded)"))
    add(("memory (RSS)", ""))
    add(("  before inference (inputs + network loaded)", f"{r['rss_before_inference_gib']:.2f} GiB"))
    exact = "" if r["rss_peak_inference_exact"] else " (VmHWM not resettable: peak so far)"
    add(("  peak during inference (after)",
         f"{r['peak_rss_gib']:.2f} GiB (+{r['rss_increase_inference_gib']:.2f} GiB){exact}"))
    add(("  peak of the process (ru_maxrss)", f"{r['rss_peak_process_gib']:.2f} GiB"))
    if r.get("cuda_peak_memory_gib") is not None:
        add(("  device memory, peak allocated during inference (after)", f"{r['cuda_peak_memory_gib']:.2f} GiB"))
    add(("decoder matmul bound", ""))
    add((f"  GEMM FLOP/s, addmm at the decoder shapes ({r['gemm_rows']:,} rows)", _si(r["gemm_flops_per_s"], "FLOP/s")))
    add((f"  GEMM FLOP/s, {r['gemm_hidden_shape']} alone", _si(r["gemm_hidden_flops_per_s"], "FLOP/s")))
    add(("  decoder FLOPs/point (2 * sum in*out, both decoders)", f"{r['decoder_flops_per_point']:,}"))
    add(("  matmul-bound decoder time (points * FLOPs / FLOP/s)", f"{r['matmul_bound_s']:.2f} s"))
    add(("  whole inference / matmul bound", f"{r['ratio_nexus_to_matmul_bound']:.1f} x"))
    add(("  decoder MLPs measured / matmul bound", f"{r['ratio_decoder_mlp_to_matmul_bound']:.2f} x"))
    if r.get("train_steps_per_s") is None:
        add(("training", "skipped (--skip-train)"))
    else:
        p = "x".join(str(s) for s in r["train_patch_size"])
        add((f"training at the bundle setting (batch {r['train_batch_size']}, patch {p}, {r['train_num_points']:,} "
             f"points)", ""))
        add(("  steps/s (forward + all losses + backward + Adam)",
             f"{r['train_steps_per_s']:.3f} ({r['train_s'] / r['train_steps']:.2f} s/step, "
             f"{r['train_steps']} steps after {r['train_warmup_steps']} warm-up)"))
        add(("  loss terms", ", ".join(r["train_loss_terms"])))
    f = r.get("fit")
    if f:
        add((f"SSMCSR fit-subject, split-head, {f['subject']} (T1 LR {tuple(f['t1_lr_shape'])}, T2 LR "
             f"{tuple(f['t2_lr_shape'])})", ""))
        for run in f["runs"]:
            what = (
                f"  {run['forward_model']}, {run['trunk_layers']} x {run['hidden']} trunk, batch "
                f"{run['batch_size']}"
                + (
                    f" ({run['iterations_timed']} of {run['iterations_per_epoch']} iterations, extrapolated)"
                    if run["extrapolated"]
                    else ""
                )
            )
            add((what, f"epoch {run['epoch_s']:.1f} s, {_si(run['observations_per_s'], 'obs/s')}, "
                       f"{_si(run['inr_samples_per_s'], 'sample/s')}, GEMM bound {run['gemm_bound_epoch_s']:.1f} s "
                       f"({run['ratio_to_gemm_bound']:.1f} x), {run['epochs_in_14_min']:.1f} epochs in 14 min"))
        add(("  the authors' code (their report, this machine kind, 2 mm pair)",
             f"{f['authors_epochs_in_14_min']} of 50 epochs in 14 min"))
    width = max(len(row[0]) for row in rows if isinstance(row, tuple)) + 2
    return "\n".join(row if isinstance(row, str) else (row[0].ljust(width) + row[1]).rstrip() for row in rows)
