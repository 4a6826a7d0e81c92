"""Which slice of the input table one extraction process owns.

A run can be split into `count` shards. Shard `index` owns the table rows whose 0-based position
(after `--limit`) satisfies `position % count == index`: a strided split, so that every shard gets
a mix of the table's early and late rows (tables are often sorted by source or question type, and
question length drives cost). The split depends only on the table and `count`, never on timing, so
a rerun of a shard asks for exactly the rows it owned before.

Where the shard comes from, in this order:

1. `--num-shards K --shard-index I` (schedulers that start independent jobs: SLURM job arrays, ...);
2. the environment a torch launcher sets for each process (`torchrun`, `python -m torch.distributed.run`,
   `accelerate launch`): `WORLD_SIZE` shards, this process is `RANK`, its GPU on this node is `LOCAL_RANK`;
3. otherwise one shard: the single-process run.

Giving flags under a launcher that starts several processes is refused: each process would get the
same flags, and silently composing the two splits would be a guess.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from halp.errors import ShardError

Item = TypeVar("Item")

#: Set by torchrun / torch.distributed.run / accelerate launch for every process they start.
LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    #: GPU index on this node, when a torch launcher started the process (it owns that one device).
    local_rank: int | None = None
    #: "flags", "launcher" or "single": where the split came from (for messages and exit codes).
    source: str = "single"

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ShardError(f"the number of shards must be at least 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ShardError(f"shard index {self.index} is outside 0..{self.count - 1} for {self.count} shard(s)")

    @property
    def name(self) -> str:
        """Directory name of the shard inside RUN_DIR/shards/, e.g. '0-of-4'."""
        return f"{self.index}-of-{self.count}"

    @property
    def is_sharded(self) -> bool:
        return self.count > 1

    def owns(self, position: int) -> bool:
        return position % self.count == self.index

    def select(self, items: Sequence[Item]) -> list[tuple[int, Item]]:
        """(table position, item) for every item this shard owns, in table order."""
        # One slice, not an index per row: a table's rows (halp.data.TableRows) make their samples a chunk at a time.
        return list(zip(range(self.index, len(items), self.count), self.share(items), strict=True))

    def share(self, items: Sequence[Item]) -> Sequence[Item]:
        """The items this shard owns, in table order (a slice: a view of a table's rows)."""
        return items[self.index :: self.count]


SINGLE = Shard(0, 1)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ShardError(f"environment variable {name}={raw!r} is not an integer") from None


def resolve_shard(
    num_shards: int | None = None, shard_index: int | None = None, environ: Mapping[str, str] | None = None
) -> Shard:
    """The shard of this process, from explicit flags or from a torch launcher's environment (see module doc)."""
    environ = os.environ if environ is None else environ
    world_size = _env_int(environ, "WORLD_SIZE")
    rank = _env_int(environ, "RANK")
    local_rank = _env_int(environ, "LOCAL_RANK")
    launched = world_size is not None and world_size > 1

    if num_shards is not None or shard_index is not None:
        if num_shards is None or shard_index is None:
            raise ShardError("num_shards= and shard_index= go together: give both, or neither")
        if launched:
            raise ShardError(
                f"num_shards= and shard_index= were given inside a launcher that started {world_size} processes "
                "(WORLD_SIZE is set): every process would get the same flags. Use one or the other: drop the flags "
                "under torchrun/accelerate, or start independent processes with the flags."
            )
        return Shard(shard_index, num_shards, source="flags" if num_shards > 1 else "single")

    if launched:
        if rank is None:
            raise ShardError(f"WORLD_SIZE={world_size} is set but RANK is not; cannot tell which shard this is")
        return Shard(rank, world_size, local_rank=local_rank, source="launcher")
    return SINGLE
