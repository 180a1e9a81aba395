"""The driver's listing as a Ray Data source: each read task turns one shard of SampleRefs into rows.

Why not `ray.data.from_items`: that builds every block in Arrow on the driver and puts it in the object store
before the first task can start (30-45 ms for 600 refs here, a serial cost paid by every run). Here a read task
carries only its shard (a small pickled list) and builds its rows on a worker, in parallel.
"""
from __future__ import annotations

import functools

import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from pipeline.io.sources import SampleRef


def ref_rows(shard: list[SampleRef]) -> list[pa.Table]:
    """One block of ref rows (the columns of SampleRef.to_row)."""
    return [pa.Table.from_pylist([ref.to_row() for ref in shard])]


class RefsDatasource(Datasource):
    """SampleRefs split in order into `parallelism` shards of near-equal size, one read task each.

    Read it with an explicit `override_num_blocks` (refs_dataset does): it has no size estimate to pick one from.
    """

    def __init__(self, refs: list[SampleRef]):
        super().__init__()
        self._refs = list(refs)

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        count = len(self._refs)
        shards = min(parallelism, count)
        size, remainder = divmod(count, max(shards, 1))
        # The first `remainder` shards hold one ref more: the blocks ray.data.from_items makes, so a training
        # run's workers get the same rows as before this source existed.
        bounds = [i * size + min(i, remainder) for i in range(shards + 1)]
        return [ReadTask(functools.partial(ref_rows, self._refs[start:end]),
                         BlockMetadata(num_rows=end - start, size_bytes=None, exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for start, end in zip(bounds, bounds[1:])]
