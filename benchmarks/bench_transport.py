"""How tensors cross between the server and a model worker process.

    python benchmarks/bench_transport.py [--quick]

Round trips (server → worker → server) of float32 arrays of the sizes the
server moves: a batch of 32 MiniLM embeddings (32×384), 8 BERT-base rows
(8×768), one and eight preprocessed ResNet images (3×224×224 each). Two
transports, each over one socket pair like ``tallow.serve.workers``:

- ``pipe``: the array pickled with protocol 5 (one raw copy of its bytes)
  and sent through the socket as one framed message each way;
- ``arena``: tallow's shared memory (``tallow.worker.Arena``, ``to_wire`` /
  ``from_wire``), forced for every size to find where it starts to pay
  (tallow sends arrays under ``SHM_MIN_BYTES`` in the pickle): one
  pre-allocated shared-memory file per direction; the
  sender writes the array into it, only offset/shape/dtype go through the
  socket, the receiver copies it out (no acknowledgement of its own: see
  ``Arena``'s docstring);
- ``shm``: the floor: one ``multiprocessing.shared_memory`` segment written
  and modified in place, no acks, no tensors (what no real protocol gets).
- (measured once and dropped: a fresh ``/dev/shm`` file per message was
  slower than the pickle — 574 vs 178 µs for 32x384 — creating and freeing
  tmpfs pages costs more than the copy it saves; and an arena freed by an
  explicit ack message each way, 302 µs: the extra wake-ups cost more.)

Both sides do the same work a real call needs: the sender builds the
message, the receiver gets an array it may keep (shm: a copy out of the
segment, since the segment is reused by the next call).
"""

from __future__ import annotations

import argparse
import json
import pickle
import socket
import sys
import time
from multiprocessing import Process, shared_memory
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import environment, percentile, results_dir  # noqa: E402

SHAPES = {"embeddings 32x384": (32, 384), "bert rows 8x768": (8, 768), "image 1x3x224x224": (1, 3, 224, 224),
          "images 8x3x224x224": (8, 3, 224, 224)}
SEGMENT_BYTES = 8 * 3 * 224 * 224 * 4


def echo_pipe(fd: int) -> None:
    conn = Connection(fd)
    while True:
        msg = pickle.loads(conn.recv_bytes())
        if msg is None:
            return
        conn.send_bytes(pickle.dumps(msg + 1.0, protocol=5))


def echo_arena(fd: int, paths: dict) -> None:
    """The worker's side of tallow's protocol (``tallow.worker.serve``)."""
    import tallow.worker
    from tallow.worker import ARENA_BYTES, Arena, from_wire, to_wire

    tallow.worker.SHM_MIN_BYTES = 0  # every size through the arena: where does it start to pay?
    conn = Connection(fd)
    theirs, ours = (Arena(paths[side], ARENA_BYTES, create=False) for side in ("server", "worker"))
    written = 0
    while True:
        msg = pickle.loads(conn.recv_bytes())
        if msg is None:
            return
        payload, in_arena, answers_read = msg
        if answers_read >= written:
            ours.release()
        x = from_wire(payload, theirs)
        value, used = to_wire(x.numpy() + 1.0, ours)  # numpy, like the other echoes (a torch op wakes its threads)
        written += used
        conn.send_bytes(pickle.dumps((value, used), protocol=5))


def echo_shm(fd: int, name: str) -> None:
    conn = Connection(fd)
    seg = shared_memory.SharedMemory(name=name)
    try:
        while True:
            head = pickle.loads(conn.recv_bytes())
            if head is None:
                return
            shape = head
            n = int(np.prod(shape))
            view = np.ndarray(shape, dtype=np.float32, buffer=seg.buf[: n * 4])
            view += 1.0  # in place: the answer goes back in the same segment
            del view
            conn.send_bytes(pickle.dumps(shape, protocol=5))
    finally:
        seg.close()


def round_trips(kind: str, shape: tuple, n: int) -> list[float]:
    a, b = socket.socketpair()
    seg = shared_memory.SharedMemory(create=True, size=SEGMENT_BYTES) if kind == "shm" else None
    arenas = {}
    args = (b.fileno(),)
    if kind == "shm":
        args = (b.fileno(), seg.name)
    elif kind == "arena":
        import tallow.worker
        from tallow.worker import Arena

        tallow.worker.SHM_MIN_BYTES = 0
        arenas = {side: Arena.create(f"bench-transport-{side}") for side in ("server", "worker")}
        args = (b.fileno(), {side: a.path for side, a in arenas.items()})
    proc = Process(target={"shm": echo_shm, "arena": echo_arena}.get(kind, echo_pipe), args=args)
    proc.start()
    b.close()
    conn = Connection(a.detach())
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    times = []
    answers_read = 0
    try:
        for i in range(n + 5):
            t0 = time.perf_counter()
            if kind == "arena":
                from tallow.worker import from_wire, to_wire

                payload, in_arena = to_wire(x, arenas["server"])
                conn.send_bytes(pickle.dumps((payload, in_arena, answers_read), protocol=5))
                value, used = pickle.loads(conn.recv_bytes())
                arenas["server"].release()  # the answer came: the worker copied our arena out
                y = from_wire(value, arenas["worker"]).numpy()
                answers_read += used
            elif kind != "shm":
                conn.send_bytes(pickle.dumps(x, protocol=5))
                y = pickle.loads(conn.recv_bytes())
            else:
                size = x.size
                np.ndarray(shape, dtype=np.float32, buffer=seg.buf[: size * 4])[...] = x
                conn.send_bytes(pickle.dumps(shape, protocol=5))
                pickle.loads(conn.recv_bytes())
                y = np.ndarray(shape, dtype=np.float32, buffer=seg.buf[: size * 4]).copy()
            dt = time.perf_counter() - t0
            if i >= 5:
                times.append(dt)
            assert y[(0,) * len(shape)] == x[(0,) * len(shape)] + 1.0
    finally:
        conn.send_bytes(pickle.dumps(None))
        proc.join(10)
        if seg is not None:
            seg.close()
            seg.unlink()
        for arena in arenas.values():
            arena.close()
            arena.unlink()
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 50 if args.quick else 400
    rows = []
    for name, shape in SHAPES.items():
        for kind in ("pipe", "arena", "shm"):
            t = round_trips(kind, shape, n)
            rows.append({"case": name, "transport": kind, "bytes": int(np.prod(shape)) * 4,
                         "p50_us": percentile(t, 0.5) * 1e6, "p99_us": percentile(t, 0.99) * 1e6})
            print(f"{name:22s} {kind:5s} p50 {rows[-1]['p50_us']:8.1f} µs  p99 {rows[-1]['p99_us']:8.1f} µs",
                  flush=True)
    env = environment()
    out = results_dir(env["machine"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "transport.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    lines = ["| payload | bytes | pipe (pickle 5) p50 µs | arena (tallow) p50 µs | bare shared segment p50 µs |",
             "|---|---|---|---|---|"]
    for name in SHAPES:
        got = {r["transport"]: r for r in rows if r["case"] == name}
        lines.append(f"| {name} | {got['pipe']['bytes']:,} | {got['pipe']['p50_us']:.0f} | "
                     f"{got['arena']['p50_us']:.0f} | {got['shm']['p50_us']:.0f} |")
    (out / "transport.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
