"""Data loaders whose position survives a resume, and the wiring from the data config.

Lightning 2.6 saves ``state_dict()`` of every train loader that has ``state_dict``/``load_state_dict``
(in the fit loop's checkpoint state) and calls ``load_state_dict`` on resume *before* creating the
iterator. Lightning itself does not skip consumed batches: a plain loader would replay the epoch from
its start. The loader's own sampler cannot tell what was consumed (the fetcher and workers prefetch),
so the position saved is the trainer's count of batches fetched in this epoch, bound with
:meth:`ResumableDataLoader.bind_progress`; on load the batch sampler continues right after it.

Epochs: Lightning calls ``set_epoch`` on ``loader.sampler`` but never on a batch sampler, and it stops
a sized loader after ``len`` batches without exhausting it, so a batch sampler that advances its epoch
at the end of its own iteration never does. The loader therefore sets the batch sampler's epoch from
the trainer each time a new epoch's iterator is created.

Why not torchdata's ``StatefulDataLoader``: it records the batches it has *yielded*, and Lightning's
fetcher has always taken one more than the model has consumed (prefetch), so a resume would skip that
batch; and Lightning drops loader states restored after ``trainer.estimated_stepping_batches`` ran
(Lightning issue #20550; :meth:`ChameleonLitModule.configure_optimizers` therefore never calls it).

Another world size: the position is also saved as a count of the epoch's batches consumed by all ranks
(the batch order does not depend on the rank count, see
:class:`~chameleon_ft.data.sampler.LengthGroupedBatchSampler`). A run resumed with the same global
batch (per-device batch x devices x accumulation) continues with the very next batch of that order, and
the trainer's batch counters are rescaled to this rank's share. With another global batch it continues
after the same number of samples and warns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader


def private_generator(seed: int = 0) -> torch.Generator:
    """A generator for a ``DataLoader``: without one, every ``iter(loader)`` draws from the global RNG,
    so a resumed run (one extra iterator after the RNG restore) would drift from an uninterrupted one."""
    return torch.Generator().manual_seed(int(seed))


log = logging.getLogger(__name__)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a stateful batch sampler (``set_epoch``, ``resume_at``, ``state_dict``).

    It never draws from the global RNG (a private ``generator`` is used unless one is given).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("generator", private_generator(0))
        super().__init__(*args, **kwargs)

    def bind_progress(self, fn: Callable[[], tuple[int, int]]) -> None:
        """``fn() -> (epoch, batches consumed in that epoch)``, read when a checkpoint is saved."""
        self._progress_fn = fn

    def __iter__(self):
        fn = getattr(self, "_progress_fn", None)
        if getattr(self, "_resumed", False):
            self._resumed = False  # load_state_dict already placed the sampler
        elif fn is not None:
            self._set_epoch(fn()[0])
        return super().__iter__()

    def _set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)
        # The dataset's per-epoch randomness (classifier-free-guidance dropout) follows the same epoch.
        target = getattr(self.dataset, "samples", self.dataset)
        if hasattr(target, "set_epoch"):
            target.set_epoch(epoch)

    def _layout(self) -> dict[str, int | None]:
        """This run's data-parallel layout: ranks, accumulation, batch size (per rank and micro-batch)."""
        fn = getattr(self, "_progress_fn", None)
        world, accumulation = fn.layout() if hasattr(fn, "layout") else (1, 1)
        return {"world_size": int(world), "accumulation": int(accumulation),
                "batch_size": getattr(self.batch_sampler, "batch_size", None)}

    def state_dict(self) -> dict:
        fn = getattr(self, "_progress_fn", None)
        if fn is None:
            raise RuntimeError("ResumableDataLoader.state_dict() needs bind_progress() first")
        epoch, done = fn()
        layout = self._layout()
        return {"epoch": int(epoch), "batches_done": int(done), "sampler": self.batch_sampler.state_dict(),
                **layout, "global_batches_done": int(done) * layout["world_size"]}

    def _batches_done_here(self, state: dict) -> int:
        """This rank's position in the epoch for a checkpoint saved with another layout (or the same)."""
        done = int(state["batches_done"])
        now = self._layout()
        then = {k: state.get(k) for k in now}
        if "world_size" not in state or then == now:
            return done
        consumed = int(state["global_batches_done"])  # batches of the epoch's one order, all ranks together
        step_now = now["world_size"] * now["accumulation"]
        same_global_batch = (then["batch_size"] == now["batch_size"]
                             and then["world_size"] * then["accumulation"] == step_now)
        if same_global_batch:
            log.info("resuming with %d rank(s) x %d accumulation, saved with %d x %d: the same global batch and "
                     "data order", now["world_size"], now["accumulation"], then["world_size"], then["accumulation"])
            return consumed // now["world_size"]
        # Another global batch: whole steps of the new layout covering at most the samples consumed.
        samples = consumed * int(then["batch_size"] or 1)
        per_step = int(now["batch_size"] or 1) * step_now
        local = samples // per_step * now["accumulation"]
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"the global batch changed: the checkpoint was saved with {_samples(then)} samples per optimizer step "
            f"(per-device batch {then['batch_size']} x {then['world_size']} device(s) x {then['accumulation']} "
            f"accumulation), this run takes {_samples(now)} ({now['batch_size']} x {now['world_size']} x "
            f"{now['accumulation']}). Epoch {int(state['epoch'])} continues after "
            f"{local // now['accumulation'] * per_step} of the {samples} samples it had consumed"
            + ("" if then["batch_size"] == now["batch_size"] else
               " (another per-device batch size groups other samples into the epoch's batches)")
            + "; the learning-rate schedule still counts optimizer steps.")
        return local

    def load_state_dict(self, state: dict) -> None:
        sampler = self.batch_sampler
        saved_seed = state.get("sampler", {}).get("seed")
        if saved_seed is not None and getattr(sampler, "seed", saved_seed) != saved_seed:
            raise ValueError(
                f"resuming with data seed {sampler.seed}, but the checkpoint's data order used seed {saved_seed}"
            )
        epoch, done = int(state["epoch"]), self._batches_done_here(state)
        fn = getattr(self, "_progress_fn", None)
        if done != int(state["batches_done"]) and hasattr(fn, "set_batches_done"):
            # The trainer's counters follow this rank's new share of the epoch's batches.
            now = self._layout()
            then_b, now_b = state.get("batch_size") or 1, now["batch_size"] or 1
            fn.set_batches_done(done, (state["world_size"] * then_b) / (now["world_size"] * now_b))
        self._set_epoch(epoch)
        if done >= len(sampler):  # saved on the epoch's last batch: continue with the next epoch
            epoch, done = epoch + 1, 0
            self._set_epoch(epoch)
        sampler.resume_at(epoch, done)
        self._resumed = True


def _samples(layout: dict) -> str:
    if layout["batch_size"] is None:
        return "?"
    return str(int(layout["batch_size"]) * layout["world_size"] * layout["accumulation"])


class TrainerProgress:
    """Progress function for :meth:`ResumableDataLoader.bind_progress` over ``trainer``'s loop counters.

    ``progress()`` is ``(epoch, batches fetched by this rank in it)``; ``layout()`` is ``(ranks,
    accumulation)``; ``set_batches_done(n)`` moves the fit loop's batch counters of the current epoch (and
    the running totals by as much) to ``n``, for a checkpoint saved with another layout.
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def __call__(self) -> tuple[int, int]:
        return self.trainer.current_epoch, self.trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def layout(self) -> tuple[int, int]:
        return int(self.trainer.world_size), int(self.trainer.accumulate_grad_batches)

    def set_batches_done(self, n: int, earlier_scale: float = 1.0) -> None:
        """Move this epoch's batch counters to ``n``; the batches of earlier epochs in the running totals are
        multiplied by ``earlier_scale`` (this rank's share of an epoch, new layout over old)."""
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        current, total = progress.current, progress.total
        earlier = round((total.ready - current.ready) * earlier_scale)
        # started/processed/completed trail ready by 0 or 1 (saved between the hooks of one batch).
        lags = {name: current.ready - getattr(current, name) for name in ("ready", "started", "processed", "completed")}
        for name, lag in lags.items():
            setattr(current, name, int(n) - lag)
            setattr(total, name, earlier + int(n) - lag)


def trainer_progress(trainer) -> TrainerProgress:
    """:class:`TrainerProgress` of ``trainer`` (for :meth:`ResumableDataLoader.bind_progress`)."""
    return TrainerProgress(trainer)


def build_dataloaders(cfg, assets, *, world_size: int, rank: int, run_dir=None):
    """Train and validation loaders from ``cfg.data``: cached tokenized splits, seeded length-grouped
    batches (each rank takes its share), classifier-free-guidance dropout, and optional packing.

    Returns ``(train_loader, val_loader)``.
    """
    from omegaconf import OmegaConf

    from chameleon_ft.data.collator import ConversationCollator, PackedRows, pack_by_length
    from chameleon_ft.data.pipeline import TrainingSamples, tokenized_split
    from chameleon_ft.data.sampler import LengthGroupedBatchSampler
    from chameleon_ft.model.assets import as_assets
    from chameleon_ft.model.attention import takes_documents

    assets = as_assets(assets)
    data = cfg.data
    collate = ConversationCollator(pad_id=assets.tokens.pad, max_length=int(data.max_length))
    # Packed rows in the documents layout (no T x T mask) when the attention implementation reads it.
    packed_collate = ConversationCollator(pad_id=assets.tokens.pad, max_length=int(data.max_length),
                                          flatten=takes_documents(training_attn_implementation(cfg)))
    accumulation = int(OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1))
    loaders = []
    for split, bs, train in (("train", data.batch_size, True), ("val", data.eval_batch_size, False)):
        samples = TrainingSamples(tokenized_split(data, assets, split, run_dir=run_dir),
                                  cfg_dropout=float(data.cfg_dropout) if train else 0.0, seed=int(cfg.seed))
        dataset, lengths = samples, samples.lengths
        if data.packing and train:
            # Rows of several samples up to max_length; batch_size then counts rows.
            bins = pack_by_length(samples.lengths, int(data.max_length))
            dataset, lengths = PackedRows(samples, bins), [sum(samples.lengths[i] for i in b) for b in bins]
        sampler = LengthGroupedBatchSampler(lengths, int(bs), seed=int(cfg.seed), shuffle=train,
                                            num_replicas=world_size, rank=rank,
                                            accumulation=accumulation if train else 1)
        cls = ResumableDataLoader if train else DataLoader
        loaders.append(cls(dataset, batch_sampler=sampler, collate_fn=collate if dataset is samples else packed_collate,
                           num_workers=0, generator=private_generator(int(cfg.seed))))
    return tuple(loaders)


def training_attn_implementation(cfg) -> str:
    """The attention implementation a run of ``cfg`` trains with (``auto`` resolved for its accelerator)."""
    from omegaconf import OmegaConf

    from chameleon_ft.model.attention import DEFAULT_ATTN_IMPLEMENTATION, resolve_attn_implementation
    from chameleon_ft.training.strategy import resolve_accelerator

    name = OmegaConf.select(cfg, "model.attn_implementation", default=DEFAULT_ATTN_IMPLEMENTATION)
    accelerator = resolve_accelerator(str(OmegaConf.select(cfg, "trainer.accelerator", default="auto")))
    return resolve_attn_implementation(name, "cuda" if accelerator == "gpu" else "cpu")
