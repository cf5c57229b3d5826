"""`anybind extract --engine ray`: a store's missing shards computed by an actor pool on a Ray cluster.

The driver (the process that called `extract`) plans as a local run does: the request, the missing
shards, the compute precision (decided once, there). The dataset index's rows become a Ray Dataset
with one row per store shard (its number and its items' references); an actor pool (one actor per
GPU, or per CPU slot) decodes, batches and encodes each shard with the local engine's own shard
loop (`extract._run_shards`: the same batches in the same order), and the driver writes each shard
as it arrives with the local engine's writer. So the store is the local one, bit for bit, and the
workers need no access to the store's folder.

A lost actor is restarted by Ray and its shard computed again (nothing of it was written); a killed
driver leaves its finished shards, and the next run computes only the others. Ray is imported
here only (`pip install 'anybind[scale]'`).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import warnings
from dataclasses import dataclass

from .._deps import require
from ..checks import integer, number
from ..errors import AnybindError, StoreError

log = logging.getLogger("anybind.extract")

# a lost actor (a killed process, a lost node) is restarted and its shard retried this often; an
# exception inside an actor is the code's error and is not retried
RESTARTS = 3


def require_ray():
    """`ray` with Ray Data, or a MissingDependencyError naming the `scale` extra."""
    require("ray", "extract --engine ray", package="ray[data]", extra="scale")
    return require("ray.data", "extract --engine ray (Ray Data)", package="ray[data]", extra="scale")


@dataclass
class RayRunner:
    """How the shards of one extraction are spread over a Ray cluster."""

    source: object  # an encoder spec string (rebuilt in each actor) or an Encoder (pickled to them)
    actors: int | None  # None: one per GPU (num_gpus > 0) or per CPU of the cluster
    num_gpus: float | None  # GPUs per actor; None: 1 when the cluster has GPUs, else 0
    address: str | None  # None: RAY_ADDRESS, else a cluster `ray start` runs here, else a new local one
    num_workers: int | None  # decoding processes inside each actor (default 0: the pool is the parallelism)
    device: str | None  # as for a local run, resolved inside each actor
    pool: tuple[float, int] | None = None  # (GPUs per actor, actors), once `plan` has seen the cluster

    @classmethod
    def create(cls, encoder, *, actors=None, num_gpus=None, address=None, num_workers=None,
               device=None) -> RayRunner:
        """Options checked and Ray imported, before any work."""
        if actors is not None:
            integer("actors", actors, minimum=1, error=AnybindError)
        if num_gpus is not None:
            number("num_gpus", num_gpus, minimum=0, error=AnybindError)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise AnybindError("engine 'ray' runs from one driver process; do not start it under torchrun "
                               "(WORLD_SIZE is set): the actor pool spreads the shards")
        require_ray()
        return cls(encoder, actors, num_gpus, address, num_workers, None if device is None else str(device))

    def plan(self, num_shards: int) -> None:
        """Join the cluster and size the pool for `num_shards` (before the store's folder is made:
        a pool the cluster cannot hold is refused, not waited for)."""
        if num_shards:
            self.pool = self._pool_size(_connect(self.address), num_shards)

    def run(self, refs, pending: list[int], request: dict, precision: str, write, progress: bool) -> None:
        """Compute the `pending` shards on the cluster; `write(shard, tensors, metadata)` each here."""
        if not pending:
            return
        if self.pool is None:
            self.plan(len(pending))
        ray = _connect(self.address)
        num_gpus, actors = self.pool
        log.info("engine ray: %d shards on %d actor(s) (%s GPU each), cluster %s", len(pending), actors,
                 num_gpus, ray.get_runtime_context().gcs_address)
        ray.data.DataContext.get_current().enable_progress_bars = progress
        if not progress:  # quiet: Ray Data's own lines too (its errors still show)
            logging.getLogger("ray.data").setLevel(logging.ERROR)
        shards = _shards_dataset(ray, refs, pending, request["shard_size"])
        with warnings.catch_warnings():  # Ray Data names no other way to bound the restarts (it defaults to forever)
            warnings.simplefilter("ignore", DeprecationWarning)
            encoded = shards.map_batches(
                _ShardEncoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                fn_constructor_kwargs={"source": self.source, "request": request, "precision": precision,
                                       "device": self.device, "num_workers": self.num_workers},
                num_cpus=1, num_gpus=num_gpus, max_restarts=RESTARTS, max_task_retries=RESTARTS)
        done = 0
        for row in encoded.iter_rows():
            result = pickle.loads(row["payload"])
            if "error" in result:
                raise _raised(result["error"])
            write(int(row["shard"]), result["tensors"], result["meta"])
            done += 1
        if done != len(pending):
            raise StoreError(f"the Ray job returned {done} of {len(pending)} shards; run extract again to finish them")

    def _pool_size(self, ray, num_shards: int) -> tuple[float, int]:
        """(GPUs per actor, actors): one actor per GPU, or per CPU slot, never more than shards."""
        cluster = ray.cluster_resources()
        gpus = float(cluster.get("GPU", 0))
        num_gpus = self.num_gpus
        if num_gpus is None:
            num_gpus = 1.0 if gpus and self.device != "cpu" else 0.0
        cpus = float(cluster.get("CPU", 0))
        actors = self.actors or (int(gpus // num_gpus) if num_gpus else int(cpus))
        actors = max(1, min(actors, num_shards))
        # an actor the cluster cannot place would be waited for forever: said now instead
        if actors * num_gpus > gpus:
            raise AnybindError(f"{actors} actor(s) x --num-gpus {num_gpus:g}, but the Ray cluster has {gpus:g} GPUs")
        if actors > cpus:
            raise AnybindError(f"--actors {actors}: each actor takes a CPU, and the Ray cluster has {cpus:g}")
        return num_gpus, actors


def _connect(address: str | None):
    """The running Ray session, or one joined at `address` / RAY_ADDRESS, or a local cluster."""
    require_ray()
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=True,
                     logging_level=logging.WARNING)
        except ConnectionError as e:
            raise AnybindError(
                f"could not join the Ray cluster at {address or os.environ.get('RAY_ADDRESS')}: {e}. Is "
                "`ray start --head` running there, with the same Ray version? A cluster with token "
                "authentication (Ray's default) also needs RAY_AUTH_MODE=token here") from e
    return ray


class _ShardRefs:
    """One shard's references, indexed by dataset row like the whole list (what `_run_shards` reads)."""

    def __init__(self, refs: list, offset: int, num_rows: int):
        self.refs, self.offset, self.num_rows = refs, offset, num_rows

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, row: int):
        return self.refs[row - self.offset]


def _shards_dataset(ray, refs, pending: list[int], shard_size: int):
    """The dataset index as a Ray Dataset: a row per shard, its references pickled (any kind of ref:
    paths, bytes, arrays, missing values), one block per shard so each is one task."""
    items = [{"shard": s, "num_rows": len(refs),
              "refs": pickle.dumps(list(refs[s * shard_size:(s + 1) * shard_size]))} for s in pending]
    return ray.data.from_items(items, override_num_blocks=len(items))


class _ShardEncoder:
    """An actor: the encoder on this worker's device, checked to be the driver's, then shard after shard.

    An anybind error (a worker missing a package, a bad adapter) goes back as a result, so the
    driver raises it as itself rather than as a Ray traceback or a retried actor."""

    def __init__(self, source, request: dict, precision: str, device: str | None, num_workers: int | None):
        self.request, self.precision = request, precision
        self.num_workers = 0 if num_workers is None else num_workers
        self.error = None
        try:
            self.enc, self.device = _worker_encoder(source, request, precision, device)
        except AnybindError as e:
            self.error = e

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        shards, payloads = [], []
        for shard, num_rows, blob in zip(batch["shard"], batch["num_rows"], batch["refs"]):
            try:
                if self.error is not None:
                    raise self.error
                result = self._encode(int(shard), int(num_rows), pickle.loads(blob))
            except AnybindError as e:
                result = {"error": (type(e).__module__, type(e).__qualname__, str(e))}
            shards.append(int(shard))
            payloads.append(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        return {"shard": np.array(shards, dtype=np.int64), "payload": np.array(payloads, dtype=object)}

    def _encode(self, shard: int, num_rows: int, refs: list) -> dict:
        """One shard by the local engine's loop: its tensors and metadata, as the local run writes them."""
        from .extract import _run_shards

        found = []
        refs = _ShardRefs(refs, shard * self.request["shard_size"], num_rows)
        _run_shards(self.enc, refs, [shard], self.request, None, self.device, self.precision,
                    self.request["batch_size"], self.num_workers, False,
                    sink=lambda s, tensors, meta: found.append((tensors, meta)))
        return {"tensors": found[0][0], "meta": found[0][1]}


def _worker_encoder(source, request: dict, precision: str, device: str | None):
    """(the encoder on this worker's device, the device); refused when it is not the driver's encoder."""
    from ..device import select_device
    from ..encoders import create_encoder

    enc = create_encoder(source) if isinstance(source, str) else source
    device = select_device(device)
    enc.to(device)
    mine = json.loads(json.dumps(enc.fingerprint(request["key"]["encoder"]["pooling"], precision)))
    if mine != request["key"]["encoder"]:
        raise StoreError(f"the encoder built on Ray worker {os.uname().nodename} differs from the driver's "
                         f"(another version of its weights or packages?): {mine} != {request['key']['encoder']}")
    return enc, device


def _raised(error: tuple[str, str, str]) -> AnybindError:
    """An actor's anybind error, rebuilt with its class and message (whatever its __init__ takes)."""
    module, name, message = error
    cls = importlib.import_module(module)
    for part in name.split("."):
        cls = getattr(cls, part)
    if not (isinstance(cls, type) and issubclass(cls, AnybindError)):
        cls = AnybindError
    rebuilt = cls.__new__(cls)
    Exception.__init__(rebuilt, message)
    return rebuilt
