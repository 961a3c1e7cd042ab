"""``transfer-many --ray``: the batch's per-file work as Ray tasks (Ray is an optional extra).

**How the factors are shared: through the content-addressed SVD cache on storage the workers
share, not Ray's object store.** Why:

* a worker needs the factors of the layers its file touches, nothing else; from the cache it
  reads exactly those entries (by content digest). Through the object store the driver would
  have to put every factor there first — an SDXL pair at k = 320 is 6.8 GB, held and shipped
  per node — or run an actor that serves them, a second cache with none of the first's checks;
* the cache is already validated on every read (a torn or stale entry is recomputed, never
  trusted) and written atomically, so concurrent readers on NFS and the like are safe;
* it outlives the job: the next batch onto the same target, a scan, or a node in ComfyUI pointed
  at the same folder decomposes nothing. Objects in Ray's store die with the job.

**How a run goes.** (1) The driver loads the two checkpoints and reads the files by their headers
(:func:`nodes.library.decompose_for_batch`): one transfer of the pooled zero deltas of the ordinary
LoRAs, and one per LoRA-X adapter, asks the engine for exactly the layers and ranks the real
transfers will — so every distinct layer touched by the batch is decomposed once, side by side on
the driver's cores (or its GPU), into the shared cache, and read once on a warm cache. Files found
damaged or foreign are reported then and not sent out; files with a complete output are skipped. (2) Every other file becomes one Ray task
(1 CPU). A worker process loads the two checkpoints on its first task and keeps them for the
next, transfers the file with an engine on the same cache (every factor a hit; the workers'
decompositions are counted and reported, and are 0), and writes the output atomically into
``--out``. N workers move N files at a time.

**On a multi-node cluster** (``--ray ADDRESS``) the same holds if every node sees the same paths:
the SVD cache folder (``LORAX_SVD_CACHE``, required there), the checkpoints, the LoRA folder and
``--out`` on a shared file system, and this pack and ComfyUI installed at the same place (the
workers import the pack from the driver's pack folder, put on their ``PYTHONPATH``). Each worker
reads the two checkpoints once, its LoRA files, and the factors of the layers they touch; it
writes only its outputs. The driver node does the decompositions — the one node worth giving a
GPU; the workers need none.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict

from lorax.errors import LoraxError
from lorax.library_scan import BatchRow, complete_output, distinct_layers, provenance_settings
from lorax.transfer import TransferSettings

from .common import PACK_ROOT, backend, batch_engine, make_engine

_WORKER: dict = {}


def _worker_state(source: str, target: str, exact: bool, threads: int) -> dict:
    """The worker process's host, models and engine, loaded on its first task and kept.

    The worker computes with the driver's number of threads, not the one CPU Ray sets: a
    projection's float64 products are summed in an order that depends on the BLAS thread count,
    and the last bit of a float32 output with it (measured: relative differences of 1e-9 with one
    thread against two). With the same count the outputs equal the single-process run's bit for
    bit on the same kind of CPU. The projections are a small part of a file's time, so the
    oversubscription costs little.
    """
    key = (source, target, exact, threads)
    if _WORKER.get("key") != key:
        _WORKER.clear()
        import torch

        torch.set_num_threads(threads)
        torch.set_grad_enabled(False)  # as python -m lorax does: nothing here trains
        be = backend()
        _WORKER.update(key=key, be=be, source=be.load_model(source), target=be.load_model(target),
                       engine=make_engine(exact))
    return _WORKER


def transfer_task(job, source: str, target: str, exact: bool, settings: dict, strength: float, overwrite: bool,
                  layer_map_mode: str, user_map, threads: int):
    """One file on a worker: (its BatchRow, layers the worker decomposed for it, worker pid)."""
    state = _worker_state(source, target, exact, threads)
    engine = state["engine"]
    before = engine.stats.layers_decomposed
    name, path, out = job
    row = state["be"].transfer_file(name, path, out, state["source"], state["target"], TransferSettings(**settings),
                                    engine, strength=strength, overwrite=overwrite, layer_map_mode=layer_map_mode,
                                    user_map=user_map)
    return row, engine.stats.layers_decomposed - before, os.getpid()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise LoraxError("--ray needs Ray, an optional extra of this pack: pip install ray "
                         "(or pip install 'comfyui-lorax[ray]')") from None
    return ray


def run_on_ray(jobs, args, settings: TransferSettings, user_map):
    """The batch on Ray (module docstring): (rows in job order, the SVD line of the summary)."""
    ray = _import_ray()
    from lorax.svd_cache import cache_from_env

    local = args.ray == "local"
    store = cache_from_env(os.path.expanduser(os.path.join("~", ".cache", "lorax", "svd")))
    tmp = None
    if store is None:
        if not local:
            raise LoraxError("--ray on a cluster needs the SVD cache on storage every worker sees; set "
                             "LORAX_SVD_CACHE to a shared folder")
        tmp = tempfile.TemporaryDirectory(prefix="lorax-ray-svd-")
        cache_folder = tmp.name
    else:
        cache_folder = store.folder
    os.environ["LORAX_SVD_CACHE"] = cache_folder  # the driver's engine, and (below) the workers'
    try:
        return _run(ray, jobs, args, settings, user_map, cache_folder, local)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(ray, jobs, args, settings, user_map, cache_folder, local):
    import torch

    be = backend()
    expected = provenance_settings(settings, args.strength)
    rows: dict[int, BatchRow] = {}
    todo = []
    for i, (name, path, out) in enumerate(jobs):
        why = None if args.overwrite else complete_output(out, os.path.basename(path), expected)
        if why is None and not args.overwrite:
            rows[i] = BatchRow(file=name, output=out, status="skipped", why="complete output exists")
        else:
            todo.append(i)

    # (1) Every distinct layer the files touch, decomposed once into the shared cache.
    t0 = time.perf_counter()
    source, target = be.load_model(args.source), be.load_model(args.target)
    with batch_engine(args.exact) as engine:
        errors = be.decompose_for_batch([jobs[i] for i in todo], source, target, settings, engine,
                                        layer_map_mode=args.layer_map, user_map=user_map)
        send = []
        for n, i in enumerate(todo):
            if n in errors:
                name, _, out = jobs[i]
                rows[i] = BatchRow(file=name, output=out, status="failed", error=errors[n], why="before sending")
                print(f"[{len(rows)}/{len(jobs)}] failed: {name} ({rows[i].error})", flush=True)
            else:
                send.append(i)
        driver_decomposed = engine.stats.layers_decomposed
    prepare_s = time.perf_counter() - t0
    del source, target

    # (2) One Ray task per file.
    env = {"PYTHONPATH": os.pathsep.join([str(PACK_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p]), "LORAX_SVD_CACHE": cache_folder,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if os.environ.get("COMFYUI_PATH"):
        env["COMFYUI_PATH"] = os.environ["COMFYUI_PATH"]
    init = dict(runtime_env={"env_vars": env}, logging_level="ERROR", log_to_driver=False)
    if local:
        init.update(num_cpus=max(1, args.workers), include_dashboard=False, object_store_memory=256 << 20)
    else:
        init.update(address=args.ray)
    t1 = time.perf_counter()
    ray.init(**init)
    try:
        threads = torch.get_num_threads()  # see _worker_state
        task = ray.remote(num_cpus=1, max_retries=0)(transfer_task)
        pending = {task.remote(jobs[i], args.source, args.target, args.exact, asdict(settings), args.strength,
                               args.overwrite, args.layer_map, user_map, threads): i for i in send}
        worker_decomposed, pids = 0, set()
        stall = max(1.0, 60 * args.ray_stall_minutes)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=stall)
            if not ready:
                # Seen on a machine out of memory: the workers died while loading the models and
                # Ray started no others, so the tasks waited for ever. List them instead.
                for ref, i in pending.items():
                    name, _, out = jobs[i]
                    rows[i] = BatchRow(file=name, output=out, status="failed", error=(
                        f"no Ray task finished in {args.ray_stall_minutes:g} min; the workers may have died "
                        "(out of memory?) or the cluster has no free CPU: see `ray status` and the Ray logs"))
                    try:
                        ray.cancel(ref, force=True)
                    except Exception:  # a task Ray has lost already
                        pass
                break
            i = pending.pop(ready[0])
            try:
                row, decomposed, pid = ray.get(ready[0])
                worker_decomposed += decomposed
                pids.add(pid)
            except Exception as e:  # a worker that died: the file is listed, the rest go on
                name, _, out = jobs[i]
                row = BatchRow(file=name, output=out, status="failed", error=f"Ray task failed: {e}")
            rows[i] = row
            print(f"[{len(rows)}/{len(jobs)}] {row.status}: {row.file}"
                  + (f" -> {row.output}" if row.status == "written" else "")
                  + (f" ({row.error})" if row.error else ""), flush=True)
    finally:
        ray.shutdown()
    ray_s = time.perf_counter() - t1
    ordered = [rows[i] for i in range(len(jobs))]
    line = (f"SVD: the driver decomposed {driver_decomposed} layers (every distinct layer the files touch: "
            f"{distinct_layers(ordered)}) in {prepare_s:.1f} s; {len(pids)} Ray workers decomposed "
            f"{worker_decomposed} and moved {len(send)} files in {ray_s:.1f} s")
    return ordered, line
