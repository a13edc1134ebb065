"""``strategy=fsdp`` (FSDP2 through Lightning's ModelParallelStrategy; NCCL on CUDA, gloo on CPU), every run
in processes of its own: one rank with checkpoints, ``resume=auto`` from one of them and an export, and
several ranks against that one rank, which accumulates the same global batches."""

import pytest
import torch

from tests.gpu.checks import check_dtypes, check_fsdp_resume_export, check_multi_process, worker_run
from tests.gpu.conftest import DEVICES

FSDP = ["strategy=fsdp", "checkpoint.every_n_steps=2", "checkpoint.keep_last=4"]
STEPS, RESUME_STEP = 4, 2


@pytest.fixture(scope="module", params=DEVICES)
def fsdp(request, tmp_path_factory, fp32_cpu_reference):
    device = request.param
    root = tmp_path_factory.mktemp(f"fsdp_{device}")
    ranks = 2 if device == "cpu" else torch.cuda.device_count()
    accumulate = max(ranks, 2)
    precision = "bf16" if device == "cuda" else "fp32"  # FSDP's mixed precision is GPU-only
    # Enough batches that no rank reaches the end of the epoch (batch 8, 3 questions per image); as many
    # as the bf16 test's run (32 images) where that is enough, so the two share their fp32 reference.
    samples = max(32, 8 * accumulate * STEPS // 3 + 8)
    data = [f"data.max_samples={samples}"] if samples != 32 else []
    common = [*FSDP, *data]
    single = worker_run(root / "single", device, precision, steps=STEPS,
                        extra=[*common, f"trainer.accumulate_grad_batches={accumulate}"])
    checkpoint = single.run_dir / "checkpoints" / f"step-{RESUME_STEP:08d}.ckpt"
    assert checkpoint.is_dir(), sorted(p.name for p in (single.run_dir / "checkpoints").iterdir())
    resumed = worker_run(root / "resumed", device, precision, steps=STEPS,
                         extra=[*common, f"trainer.accumulate_grad_batches={accumulate}", "resume=auto"],
                         copy_checkpoint=checkpoint)
    multi = worker_run(root / "multi", device, precision, steps=STEPS, devices=ranks, extra=common) \
        if ranks >= 2 else None
    reference = fp32_cpu_reference(STEPS, [f"trainer.accumulate_grad_batches={accumulate}", *data])
    return dict(device=device, precision=precision, ranks=ranks, single=single, resumed=resumed, multi=multi,
                reference=reference)


def test_fsdp_dtypes(fsdp, record):
    record(check_dtypes(fsdp["single"].dtypes, fsdp["precision"], fsdp["device"], name="fsdp_dtypes"))


def test_fsdp_one_rank_tracks_fp32_cpu_resumes_and_exports(fsdp, record):
    record(check_fsdp_resume_export(fsdp["single"], fsdp["resumed"], fsdp["reference"], RESUME_STEP))


def test_fsdp_several_ranks_match_one_rank_accumulating_the_same_batches(fsdp, record):
    if fsdp["multi"] is None:
        pytest.skip(f"needs at least 2 GPUs; {fsdp['ranks']} present")
    record(check_multi_process(fsdp["multi"], fsdp["single"], fsdp["ranks"]))
