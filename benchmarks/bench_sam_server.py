"""Masks per second of the SAM server (classical backend) over real HTTP, for 1, 8 and 64
prompts per image, and the server's peak memory.

    python benchmarks/bench_sam_server.py [--masks 128] [--size 480x640] [--backend classical]
    python benchmarks/bench_sam_server.py --backend sam3 -o device=cuda -o load_from_hf=false \
        -o confidence_threshold=-1 --prompt text      # SAM3 on a GPU (random weights)
    python benchmarks/bench_sam_server.py --tiny-hf --batch-compare 64 --prompt text
        # transformers' SAM3, tiny random weights on CPU: prompts looped vs batched

`--batch-compare N` starts two servers, `-o max_batch=1` (every prompt in a forward pass of its
own, the loop) and `-o max_batch=N`, sends each row to one and then the other (the same images
and prompts), and prints both masks/s per prompts-per-image and their ratio, measured in one
run. `--tiny-hf` serves the torch tier's tiny random Sam3Model
(tests/servers/sam_tiny_hf.py, saved to a temporary folder) with the hf backend; its figures
are CPU figures of a tiny model, not a GPU's.

Every request carries a new image (base64 PNG), so each one pays upload, decode, digest and
encode once; more prompts per image spread that fixed cost over more masks. A last row sends the
64-prompt requests again with the images named by sha256 (no upload, decode or encode).
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def scene(seed: int, height: int, width: int) -> tuple[np.ndarray, list[list[float]]]:
    """Noise with six flat-coloured rectangles/ellipses; their boxes (padded 10 %)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(60, 140, size=(height, width, 3), dtype=np.uint8)
    boxes = []
    for i in range(6):
        h = int(rng.integers(height // 8, height // 3))
        w = int(rng.integers(width // 8, width // 3))
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        colour = tuple(int(c) for c in rng.integers(0, 255, size=3))
        if i % 2:
            cv2.ellipse(img, (x + w // 2, y + h // 2), (w // 2, h // 2), 0, 0, 360, colour, -1)
        else:
            cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), colour, -1)
        dx, dy = 0.1 * w, 0.1 * h
        boxes.append([max(0.0, x - dx), max(0.0, y - dy), min(width, x + w + dx),
                      min(height, y + h + dy)])
    return img, boxes


WORDS = ["red", "green", "blue", "yellow", "small", "large", "round", "square", "left", "right"]


def prompts_for(boxes: list[list[float]], n: int, seed: int, kind: str = "box") -> list[dict]:
    """n distinct prompts of `kind` (box | text | points): the scene's boxes jittered, short
    phrases, or a click in each box."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x1, y1, x2, y2 = boxes[i % len(boxes)]
        j = rng.uniform(-4, 4, size=4) if i >= len(boxes) else np.zeros(4)
        if kind == "text":
            a, b = rng.choice(len(WORDS), size=2, replace=False)
            out.append({"text": f"{WORDS[a]} {WORDS[b]} shape {i}"})
        elif kind == "points":
            out.append({"points": [[float((x1 + x2) / 2 + j[0]), float((y1 + y2) / 2 + j[1])]],
                        "point_labels": [1]})
        else:
            out.append({"box": [float(x1 + j[0]), float(y1 + j[1]), float(x2 + j[2]),
                                float(y2 + j[3])]})
    return out


def png_b64(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """A SAM server subprocess with `options`, ready to answer (its log in a temp folder)."""

    def __init__(self, args: argparse.Namespace, options: list[str], env: dict) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkdtemp(prefix="bench_sam_")) / "server.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "servers.sam_server", "--backend", args.backend,
                 "--port", str(self.port), "--log-level", "warning", "--image-cache-size", "8",
                 *(a for o in options for a in ("-o", o))],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
        self.client = httpx.Client(timeout=600)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 900
        while True:
            try:
                if self.client.get(self.url + "/health").json().get("ready"):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"server did not start; see {self.log}")
            time.sleep(0.1)
        self.idle_mb = vm_hwm_mb(self.proc.pid)
        self.info = self.client.get(self.url + "/v1/info").json()

    def encodes(self) -> int:
        return int(self.client.get(self.url + "/v1/info").json()["stats"]["encodes"])

    def row(self, name: str, requests: list[tuple[dict, list[dict]]], max_instances: int
            ) -> tuple:
        """Send the requests one after another: (name, requests, masks, seconds, encodes,
        summed server timings) and the digests of the images."""
        enc0 = self.encodes()
        parts = {"decode": 0.0, "encode": 0.0, "segment": 0.0}
        n_masks, shas = 0, []
        c0, t0 = cpu_s(self.proc.pid), time.perf_counter()
        for image, prompts in requests:
            r = self.client.post(self.url + "/v1/segment", json={
                "image": image, "prompts": prompts, "max_instances": max_instances})
            r.raise_for_status()
            body = r.json()
            shas.append(body["image_sha256"])
            n_masks += sum(len(x["instances"]) for x in body["results"])
            for k in parts:
                parts[k] += body["timing_ms"][k]
        dt, cpu = time.perf_counter() - t0, cpu_s(self.proc.pid) - c0
        return (name, len(requests), n_masks, dt, self.encodes() - enc0, parts, cpu), shas

    def stop(self) -> None:
        self.peak_mb = vm_hwm_mb(self.proc.pid)
        try:
            self.stats = self.client.get(self.url + "/v1/info").json()["stats"]
        except httpx.HTTPError:
            self.stats = {"peak_rss_mb": float("nan")}
        self.client.close()
        self.proc.terminate()
        self.proc.wait(30)


def measure(args: argparse.Namespace, servers: list[Server]) -> list[list[tuple]]:
    """The rows on every server, each row sent to one server after the other (the same images
    and prompts), so that a change of load on a shared machine hits both alike."""
    height, width = (int(v) for v in args.size.split("x"))
    rows: list[list[tuple]] = [[] for _ in servers]
    seed = 1000
    for per_image in (1, 8, 64):
        requests = []
        for _ in range(max(1, args.masks // per_image)):
            img, boxes = scene(seed, height, width)
            requests.append(({"b64": png_b64(img)},
                             prompts_for(boxes, per_image, seed, args.prompt)))
            seed += 1
        for out, server in zip(rows, servers, strict=True):
            row, shas = server.row(f"{per_image} / image", requests, args.max_instances)
            out.append(row)
            if per_image == 64:
                # the same requests again, the images named by digest: no upload, no decode,
                # no encode; the difference to the row above is the per-image fixed cost
                again = [({"sha256": sha}, prompts)
                         for sha, (_, prompts) in zip(shas, requests, strict=True)]
                out.append(server.row("64 / image, sha256", again, args.max_instances)[0])
    return rows


def print_rows(rows: list[tuple], server: Server) -> None:
    hdr = (f"{'prompts':22s} {'requests':>8s} {'masks':>6s} {'masks/s':>8s} {'prompts/s':>9s} "
           f"{'ms/request':>10s} "
           f"{'encodes':>7s} {'decode ms':>9s} {'encode ms':>9s} {'segment ms':>10s} "
           f"{'server CPU s':>12s}")
    print(hdr)
    print("-" * len(hdr))
    for name, n_req, n_masks, dt, encodes, parts, cpu in rows:
        n_prompts = n_req * int(name.split(" ")[0])
        print(f"{name:22s} {n_req:8d} {n_masks:6d} {n_masks / dt:8.1f} {n_prompts / dt:9.1f} "
              f"{1e3 * dt / n_req:10.1f} "
              f"{encodes:7d} {parts['decode'] / n_req:9.1f} {parts['encode'] / n_req:9.2f} "
              f"{parts['segment'] / n_req:10.1f} {cpu:12.2f}")
    print(f"\nserver peak RSS: {server.peak_mb:.0f} MB (VmHWM; {server.idle_mb:.0f} MB when idle "
          f"and ready; server's own ru_maxrss {server.stats['peak_rss_mb']:.0f} MB)")


def tiny_hf_options() -> tuple[list[str], dict]:
    """The torch tier's tiny random Sam3Model saved to a temporary folder, as hf options."""
    sys.path.insert(0, str(REPO / "tests" / "servers"))
    from sam_tiny_hf import save_tiny_sam3

    folder = save_tiny_sam3(tempfile.mkdtemp(prefix="tiny_sam3_"))
    # threshold 0: random weights score every query near 0; keep them, one mask per prompt
    return ([f"model={folder}", "local_files_only=true", "threshold=0.0"],
            {"HF_HUB_OFFLINE": "1"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--masks", type=int, default=128, help="prompts per row (default 128)")
    ap.add_argument("--size", default="480x640", help="HxW of the images")
    ap.add_argument("--backend", default="classical")
    ap.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                    help="backend option passed to the server (repeatable)")
    ap.add_argument("--prompt", choices=("box", "text", "points"), default="box")
    ap.add_argument("--max-instances", type=int, default=1,
                    help="instances returned per prompt (default 1, a client's top1)")
    ap.add_argument("--tiny-hf", action="store_true",
                    help="the hf backend over a tiny random Sam3Model (CPU; needs the torch tier)")
    ap.add_argument("--batch-compare", type=int, default=0, metavar="N",
                    help="run with -o max_batch=1 and -o max_batch=N, print both and the ratio")
    args = ap.parse_args()
    options, env = list(args.option), {}
    if args.tiny_hf:
        args.backend = "hf"
        tiny, env = tiny_hf_options()
        options = tiny + options
        # one torch thread per server unless told otherwise: on a shared 2-core machine the
        # 2-thread pool spins at every tiny op's barrier (64 looped text prompts took 24 s of
        # CPU with 2 threads, 2.2 s with 1), which measures the scheduler, not the model
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    height, width = (int(v) for v in args.size.split("x"))
    threads = env.get("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "default"))
    header = (f"{os.cpu_count()} CPUs (OMP_NUM_THREADS {threads}), images {width}x{height}, "
              f"{args.prompt} prompts, {args.masks} prompts a row")
    configs = ([("", options)] if not args.batch_compare else
               [("looped", [*options, "max_batch=1"]),
                ("batched", [*options, f"max_batch={args.batch_compare}"])])
    servers = [Server(args, opts, env) for _, opts in configs]
    try:
        for server in servers:
            server.wait_ready()
        rows = measure(args, servers)
    finally:
        for server in servers:
            server.stop()
    for (label, opts), server, got in zip(configs, servers, rows, strict=True):
        info = server.info
        batch = f", {opts[-1].replace('=', ' ')}" if label else ""
        print(f"{label or 'server'}: backend {info['backend']} ({info['backend_version']}, model "
              f"{info['model']}) on {info['device']}{batch}, {header}\n")
        print_rows(got, server)
        print()
    if args.batch_compare:
        (loop, loop_cpu), (batched, batched_cpu) = (
            ({r[0]: r[2] / r[3] for r in got}, {r[0]: r[2] / r[6] for r in got}) for got in rows)
        print("the two servers measured row by row in turn; masks per second of wall time and "
              "per second of server CPU:")
        print(f"{'prompts':22s} {'looped':>8s} {'batched':>8s} {'ratio':>6s}   "
              f"{'looped/CPU-s':>12s} {'batched/CPU-s':>13s} {'ratio':>6s}")
        for name in loop:
            print(f"{name:22s} {loop[name]:8.1f} {batched[name]:8.1f} "
                  f"{batched[name] / loop[name]:6.2f}   {loop_cpu[name]:12.1f} "
                  f"{batched_cpu[name]:13.1f} {batched_cpu[name] / loop_cpu[name]:6.2f}")


if __name__ == "__main__":
    main()
