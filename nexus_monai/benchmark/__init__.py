"""``nexus-sr benchmark``: speed, memory and distance to the machine's limit of Nexus-INR inference.

For ONE whole output volume (default 240 x 240 x 160 at 1 mm, both contrasts) on this machine's CPU:

* peak fp32 GEMM FLOP/s of this machine, measured in the same run (a ``2048^3`` matmul at the
  thread count used, before and after the inference; the larger is the reference),
  :mod:`~nexus_monai.benchmark.machine`;
* Nexus-INR whole-volume inference (:func:`~nexus_monai.engines.predict.predict_volumes`) as it
  runs by default ("after": encoders on halo tiles planned from ``--max-memory-gib``, channels-last
  convolutions, empty tiles skipped) and, in the same run, as it ran before ("before": encoders on
  the whole LR volumes, default layout), with the largest difference between the two outputs;
* for each: every multiply-add of the network counted from its modules while it runs
  (:mod:`~nexus_monai.benchmark.flops`: Conv3d, Linear, the window attention's products), per part
  (encoders, KD-Attn, MMF/SEL MLPs, decoders, rest) time, FLOPs, attainable time = FLOPs / peak
  GEMM and their ratio, the same for the whole inference, and each op kind's own rate at its real
  shapes; the window attention's window-row gather / positional table / whole forward also timed alone;
* each part's own bound: its FLOPs at the peak GEMM or the bytes its gathers read (KD-Attn window rows,
  trilinear lookups) at the memory bandwidth measured in the run (a 256 MiB copy), the larger, and
  the part's time / that bound, so a regression shows which part moved;
* trilinear interpolation of both contrasts onto the same grid (SimpleITK), ratio and voxels/s;
* memory: RSS before inference and the peak during the "after" inference (the kernel's high-water
  mark reset through ``/proc/self/clear_refs`` where allowed), the process peak;
* the older decoder matmul bound (``torch.addmm`` at the decoder's own layer shapes);
* training steps/s at the bundle's CPU setting (:func:`~nexus_monai.benchmark.probes.time_training`);
* with ``--fit``: SSMCSR ``fit-subject`` throughput on the 2 mm embedded subject
  (:mod:`~nexus_monai.benchmark.fit`).

Network: ``network_def`` of ``<bundle>/configs/train.yaml`` (+ ``--config`` overlays), with the
trained weights ``<bundle>/models/model.pt`` when present, otherwise a seeded random
initialisation (identical cost; the numbers are speed, not quality).

The hidden CLI option ``--size X Y Z`` (for tests) changes the output volume; the voxel size is
then the smallest whole number of mm at which the template brain fits that many voxels (1 mm for
the default 240 x 240 x 160, 7 mm for 32 x 32 x 24), by block averaging.
"""

from nexus_monai.benchmark.flops import NetworkProfile, attention_probe, module_macs
from nexus_monai.benchmark.inputs import (DEFAULT_SIZE, benchmark_inputs, decoder_flops_per_point, decoder_linears,
                                          describe_network, load_benchmark_network, training_batch)
from nexus_monai.benchmark.machine import machine_info, measure_gemm, measure_memory_bandwidth, measure_peak_gemm
from nexus_monai.benchmark.probes import time_inference, time_training, time_trilinear
from nexus_monai.benchmark.report import format_report
from nexus_monai.benchmark.run import run_benchmark

__all__ = [
    "DEFAULT_SIZE", "benchmark_inputs", "load_benchmark_network", "decoder_linears", "decoder_flops_per_point",
    "describe_network", "measure_gemm", "measure_peak_gemm", "measure_memory_bandwidth", "time_inference",
    "time_trilinear", "training_batch",
    "time_training", "machine_info", "run_benchmark", "format_report", "NetworkProfile", "attention_probe",
    "module_macs",
]
