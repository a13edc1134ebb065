"""Benchmarks for chameleon-ft: every figure is a ratio of ours to a baseline measured in the same run.

Run them all with ``python -m benchmarks`` (see ``python -m benchmarks --help``). Each benchmark is one
module of this package that exposes ``run(quick: bool) -> list[dict]``; the dicts are built with
:func:`benchmarks.common.figure`. A benchmark that cannot run here (e.g. a GPU one on a CPU machine)
raises :class:`benchmarks.common.SkipBenchmark` with the reason. To add one, write the module and list
its name in :data:`BENCHMARKS`.
"""

# Run order; each name is a module of this package.
BENCHMARKS = ("loss_memory", "checkpoint_load", "step_overhead", "data_throughput", "packed_attention",
              "training_throughput", "generation", "gpu_training")
