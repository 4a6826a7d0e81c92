"""The extraction lifecycle, one skeleton for every engine: check -> open -> plan -> execute -> finish.

    check    options, the table, its images and the model source; nothing is written yet
    open     hold the run directory (the whole run, or one shard of it): lock, identity, clean-up, log
    plan     the rows still to do: each row's content digest against what is committed (resume)
    execute  the engine extracts those rows and commits parts: this process's loop (halp.local_engine) or
             Ray actors (halp.ray_engine)
    finish   assemble features.h5 in table order (a shard records that it is done; the last one assembles)

Where the rows are held and how they are executed are the two things that vary: `WholeRun` / `ShardOfRun` hold
the run directory (halp.store does the I/O), an `Engine` (halp.run_records) executes. The per-row input rules sit
below both (halp.inputs).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from halp.compact import RowDigests
from halp.data import ImageSource, Sample, TableRows, as_image_source
from halp.digests import row_digest, table_text_digest
from halp.errors import ParameterError
from halp.inputs import FailureList, load_batch, special_tokens_of, unstorable_text  # noqa: F401  (re-exported)
from halp.layout import ERRORS_FILE, LOG_FILE, append_line_durably, write_text_atomic
from halp.loading import check_model_source, model_fingerprint
from halp.local_engine import (  # noqa: F401  (re-exported: benchmarks and tests import them from here)
    LocalEngine,
    batches_by_size,
    extract_batch,
    prepare_extractor,
    resolve_processor_device,
)
from halp.pipeline import BUCKET_BATCHES  # noqa: F401  (re-exported)
from halp.run_records import (  # noqa: F401  (re-exported: halp.extract is where callers find them)
    PROCESSOR_DEVICES,
    Engine,
    ExtractConfig,
    ExtractPass,
    ExtractSummary,
    Job,
    RunAttributes,
    image_source,
    read_table,
    run_identity,
    validate_options,
)
from halp.shard import Shard, resolve_shard
from halp.store import RunStore

log = logging.getLogger(__name__)

#: Rows whose images are hashed at a time when planning a resume (their bytes are read, hashed and dropped).
DIGEST_WINDOW = 1024


def run_extraction(config: ExtractConfig, engine: Engine | None = None) -> ExtractSummary:
    """Extract features for every row of the table into config.out, resuming what is there.

    `engine`: how the rows are executed, this process's loop by default (halp.ray_engine.RayEngine for Ray)."""
    engine = engine or LocalEngine()
    # check: nothing is written before the options, the table, its images and the model source are known good
    validate_options(config)
    shard = resolve_shard(config.num_shards, config.shard_index)
    if shard.is_sharded and config.overwrite:
        raise ParameterError(
            "overwrite",
            "cannot be combined with several shards: one shard would delete what another has just "
            f"committed. Delete {config.out} first (or run once with overwrite=True and one shard), then start the "
            "shards.",
        )
    engine.check(config, shard)
    samples = read_table(config)  # table problems surface before the model loads
    image_source(config)  # as do missing images: no --images for a table without embedded images
    check_model_source(config.model, config.trust_remote_code)  # a missing or refused model touches no run dir
    run = engine.resolve(config, shard)
    holder = ShardOfRun(run, shard) if shard.is_sharded else WholeRun(run)
    with holder.open(samples, engine) as opened:  # open and plan
        summary = opened.summary
        if opened.current():
            summary.finished = True  # nothing is missing: the assembled file stands, no model needed
            return summary
        failures = FailureLog(opened.store.writer_dir / ERRORS_FILE, summary)
        attributes = None
        if opened.todo:
            job = Job(run, opened.todo, opened.store, failures, summary, holder.label, holder.num_shards,
                      model_loaded=opened.model_loaded)
            attributes = engine.execute(job)
        holder.finish(opened, attributes)
        if opened.todo:
            summary.log_rate()
    return summary


# ----- planning: what is still to do ------------------------------------------------------------------------------
@dataclass
class ResumePlan:
    """What a rerun must do: the table's content digests, and the rows to extract (new, failed or changed)."""

    digests: RowDigests
    todo: Sequence[Sample]  # a view of the table's rows (halp.data.TableRows) or a list
    changed: list[str]


def content_digests(samples: Sequence[Sample], images: ImageSource | Path) -> RowDigests:
    """question_id -> the row's content digest (its text and its image's bytes: a file under --images, or the bytes
    the table embeds), read now, a window of rows at a time; kept compact (halp.compact.RowDigests)."""
    source = as_image_source(images)

    def pairs() -> Iterator[tuple[str, str]]:
        for start in range(0, len(samples), DIGEST_WINDOW):
            window = samples[start : start + DIGEST_WINDOW]
            for sample, digest in zip(window, source.digests(window), strict=True):
                yield sample.question_id, row_digest(sample, digest)

    return RowDigests(pairs())


def plan_resume(
    store: RunStore, samples: Sequence[Sample], images: ImageSource | Path, digests: RowDigests | None = None
) -> ResumePlan:
    """Compare the table's rows (text and image bytes) with what is committed: a row is done only if committed with
    the same content digest. Changed rows are extracted again; their old copies leave at assembly."""
    if digests is None:
        digests = content_digests(samples, images)
    committed = store.committed_digests()
    keep = [
        index
        for index, (question_id, digest) in enumerate(digests.items_in_order())
        if not committed.holds(question_id, digest)
    ]
    todo: Sequence[Sample] = samples.take(keep) if isinstance(samples, TableRows) else [samples[i] for i in keep]
    changed = [sample.question_id for sample in todo if sample.question_id in committed] if len(committed) else []
    if changed:
        log.warning(
            "%d committed row(s) changed in the table or image since they were extracted; extracting them again: %s",
            len(changed), ", ".join(changed[:10]) + (" ..." if len(changed) > 10 else ""),
        )
    return ResumePlan(digests, todo, changed)


# ----- the model's content ---------------------------------------------------------------------------------------
def with_model_fingerprint(identity: dict[str, Any], store: RunStore, model: str) -> dict[str, Any]:
    """The identity plus the checkpoint's content fingerprint (cheap on reruns: the run's file record is reused)."""
    existing = store.read_identity() if store.run_path.exists() else None
    fingerprint, files = model_fingerprint(model, (existing or {}).get("model_files"))
    return {**identity, "model_sha256": fingerprint, "model_files": files}


def recheck_model_after_loading(store: RunStore, model: str) -> None:
    """A hub model not cached before loading has a fingerprint (its snapshot commit) only now."""
    if (store.read_identity() or {}).get("model_sha256") is None:
        fingerprint, files = model_fingerprint(model)
        with store.sync():
            store.check_model(fingerprint, files)


# ----- holding the run directory -----------------------------------------------------------------------------------
class FailureLog(FailureList):
    """Failed rows go to errors.jsonl (this attempt's failures, each line fsynced) and the summary."""

    def __init__(self, path: Path, summary: ExtractSummary) -> None:
        super().__init__()
        self.failed = summary.failed
        self.path = path
        write_text_atomic(path, "")  # a rerun retries every uncommitted row, so only this attempt's failures matter

    def _written(self, entry: dict[str, str]) -> None:
        append_line_durably(self.path, json.dumps(entry))


@contextmanager
def run_log(directory: Path) -> Iterator[None]:
    """halp's log lines also go to `directory`/extract.log while the block runs."""
    handler = logging.FileHandler(directory / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("halp")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


@dataclass
class Opened:
    """A held run directory and its plan: what the lifecycle works with between open and finish."""

    store: RunStore
    samples: list[Sample]
    plan: ResumePlan
    summary: ExtractSummary
    #: The run's rows in table order (a shard: the whole table's, which its done marker lists by position).
    order: list[str]
    #: Whether features.h5 may already be the finished run (a whole run with nothing to do).
    may_be_current: bool
    #: Called by the engine once the model is loaded.
    model_loaded: Callable[[], None]

    @property
    def todo(self) -> Sequence[Sample]:
        return self.plan.todo

    def current(self) -> bool:
        """Nothing to extract and features.h5 already holds the table's rows as they are now: nothing to do."""
        return self.may_be_current and not self.todo and self.store.is_current(self.order, self.plan.digests)


class WholeRun:
    """One writer holds the whole run directory for its life: a single process, or a Ray driver."""

    label = "extract"
    num_shards = None

    def __init__(self, run: ExtractPass) -> None:
        self.run = run

    @contextmanager
    def open(self, samples: list[Sample], engine: Engine) -> Iterator[Opened]:
        config = self.run.config
        store = RunStore(config.out)
        with store.held():
            identity = with_model_fingerprint(self.run.identity(num_shards=1), store, config.model)
            store.open(identity, overwrite=config.overwrite)
            engine.opened(store)
            store.tidy()
            with run_log(store.root):
                plan = plan_resume(store, samples, image_source(config))
                summary = ExtractSummary(store.root, len(samples), len(samples) - len(plan.todo), 0,
                                         changed=plan.changed)
                log.info("%d samples, %d already committed, %d to do", len(samples), summary.already_done,
                         len(plan.todo))

                def model_loaded() -> None:
                    recheck_model_after_loading(store, config.model)
                    store.reopen_finished()  # a finished features.h5 becomes a part: the new rows extend it

                yield Opened(store, samples, plan, summary, [s.question_id for s in samples], True, model_loaded)

    def finish(self, opened: Opened, attributes: RunAttributes | None) -> None:
        """Assemble features.h5: exactly the table's current rows, in its order."""
        store, summary = opened.store, opened.summary
        if attributes is None:  # no model ran here: the parts recorded what produced them
            attributes = store.recorded_attributes()
        attributes.complete = not summary.failed
        attributes.num_failed = len(summary.failed)
        assembled = store.assemble(opened.order, attributes, opened.plan.digests)
        summary.finished = not summary.failed and assembled == len(opened.order)
        if not summary.failed and not summary.finished:
            # A row whose image changed between the start of the run and its loading was committed with the new
            # content's digest and left out of features.h5; the next rerun extracts it.
            log.warning("some rows changed while the run was in progress; rerun the same command to extract them")


class ShardOfRun:
    """Shard i of k holds `RUN_DIR/shards/<i>-of-<k>/` for its life and the run lock only briefly: to open and
    plan, and to assemble once every shard of the layout is done (the last one to finish does it)."""

    def __init__(self, run: ExtractPass, shard: Shard) -> None:
        self.run = run
        self.shard = shard
        self.label = f"extract {shard.name}"
        self.num_shards = shard.count

    @contextmanager
    def open(self, samples: list[Sample], engine: Engine) -> Iterator[Opened]:
        config, shard = self.run.config, self.shard
        store = RunStore.for_shard(config.out, shard.name)
        with store.held():  # one writer per shard directory, for the life of this process
            mine = shard.share(samples)
            digests = content_digests(mine, image_source(config))  # the images are read outside the run lock
            with store.sync():  # the run lock, briefly: identity, clean-up and the committed rows form one view
                whole = RunStore(config.out)
                store.open(with_model_fingerprint(self.run.identity(num_shards=shard.count), whole, config.model))
                engine.opened(store)
                store.tidy()
                plan = plan_resume(store, mine, image_source(config), digests)
                store.clear_done()  # until this pass ends, the run cannot be assembled
            with run_log(store.writer_dir):
                summary = ExtractSummary(store.root, len(mine), len(mine) - len(plan.todo), 0, shard=shard,
                                         changed=plan.changed)
                log.info("shard %s: %d of %d samples, %d already committed", shard.name, len(mine), len(samples),
                         summary.already_done)
                yield Opened(store, samples, plan, summary, [], False,
                             lambda: recheck_model_after_loading(store, config.model))

    def finish(self, opened: Opened, attributes: RunAttributes | None) -> None:
        """Record that this shard's pass ended, then assemble features.h5 if every shard of the layout is done."""
        store, summary, shard, samples = opened.store, opened.summary, self.shard, opened.samples
        mine = shard.select(samples)
        assembly = store.finish_shard(
            {
                "shard": shard.name,
                "table_rows": len(samples),
                "table_sha256": table_text_digest(samples),
                "positions": [position for position, _ in mine],
                "question_ids": [sample.question_id for _, sample in mine],
                "row_sha256": [opened.plan.digests[sample.question_id] for _, sample in mine],
                "failed": summary.failed,
                "processed": summary.processed,
                "ended": datetime.now(timezone.utc).isoformat(),
            },
            shard.count,
        )
        summary.pending_shards = assembly.missing
        summary.assembled = assembly.finished
        summary.run_failed = len(assembly.failed)
        summary.finished = assembly.finished and not assembly.failed
        if assembly.assembled:
            log.info("shard %s was the last: assembled %d rows into features.h5", shard.name, assembly.num_samples)
        elif assembly.missing:
            log.info("shard %s done; waiting for %s", shard.name, ", ".join(assembly.missing))
