"""Masks per second of the SAM server (classical backend) over real HTTP, for 1, 8 and 64
prompts per image, and the server's peak memory.

    python benchmarks/bench_sam_server.py [--masks 128] [--size 480x640] [--backend classical]
    python benchmarks/bench_sam_server.py --backend sam3 -o device=cuda -o load_from_hf=false \
        -o confidence_threshold=-1 --prompt text      # SAM3 on a GPU (random weights)

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
    args = ap.parse_args()
    height, width = (int(v) for v in args.size.split("x"))

    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="bench_sam_")) / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "servers.sam_server", "--backend", args.backend, "--port",
             str(port), "--log-level", "warning", "--image-cache-size", "8",
             *(a for o in args.option for a in ("-o", o))],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=600) as client:
            deadline = time.monotonic() + 900
            while True:
                try:
                    if client.get(url + "/health").json().get("ready"):
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"server did not start; see {log}")
                time.sleep(0.1)
            idle_mb = vm_hwm_mb(proc.pid)
            info = client.get(url + "/v1/info").json()
            print(f"server: backend {info['backend']} ({info['backend_version']}) on "
                  f"{info['device']}, {os.cpu_count()} CPUs, images {width}x{height}, "
                  f"{args.prompt} prompts, {args.masks} prompts a row\n")
            rows = []
            seed = 1000
            for per_image in (1, 8, 64):
                n_images = max(1, args.masks // per_image)
                imgs = []
                for _ in range(n_images):
                    img, boxes = scene(seed, height, width)
                    imgs.append((png_b64(img), prompts_for(boxes, per_image, seed, args.prompt)))
                    seed += 1
                enc0 = client.get(url + "/v1/info").json()["stats"]["encodes"]
                t0 = time.perf_counter()
                parts = {"decode": 0.0, "encode": 0.0, "segment": 0.0}
                n_masks = 0
                shas = []
                for b64, prompts in imgs:
                    r = client.post(url + "/v1/segment",
                                    json={"image": {"b64": b64}, "prompts": prompts,
                                          "max_instances": args.max_instances})
                    r.raise_for_status()
                    body = r.json()
                    shas.append(body["image_sha256"])
                    n_masks += sum(len(x["instances"]) for x in body["results"])
                    for k in parts:
                        parts[k] += body["timing_ms"][k]
                dt = time.perf_counter() - t0
                encodes = client.get(url + "/v1/info").json()["stats"]["encodes"] - enc0
                rows.append((f"{per_image} / image", n_images, n_masks, dt, encodes, parts))

            # the same 64-prompt requests again, the images named by digest: no upload, no
            # decode, no encode; the difference to the row above is the per-image fixed cost
            t0 = time.perf_counter()
            parts = {"decode": 0.0, "encode": 0.0, "segment": 0.0}
            enc0 = client.get(url + "/v1/info").json()["stats"]["encodes"]
            n_masks = 0
            for sha, (_, prompts) in zip(shas, imgs, strict=True):
                body = client.post(url + "/v1/segment", json={
                    "image": {"sha256": sha}, "prompts": prompts,
                    "max_instances": args.max_instances}).json()
                n_masks += sum(len(x["instances"]) for x in body["results"])
                for k in parts:
                    parts[k] += body["timing_ms"][k]
            dt = time.perf_counter() - t0
            encodes = client.get(url + "/v1/info").json()["stats"]["encodes"] - enc0
            reps = len(imgs)
            rows.append((f"{len(prompts)} / image, sha256", reps, n_masks, dt, encodes, parts))
            stats = client.get(url + "/v1/info").json()["stats"]
    finally:
        peak_mb = vm_hwm_mb(proc.pid)
        proc.terminate()
        proc.wait(30)

    hdr = (f"{'prompts':22s} {'requests':>8s} {'masks':>6s} {'masks/s':>8s} {'prompts/s':>9s} "
           f"{'ms/request':>10s} "
           f"{'encodes':>7s} {'decode ms':>9s} {'encode ms':>9s} {'segment ms':>10s}")
    print(hdr)
    print("-" * len(hdr))
    for name, n_req, n_masks, dt, encodes, parts in rows:
        n_prompts = n_req * int(name.split(" ")[0])
        print(f"{name:22s} {n_req:8d} {n_masks:6d} {n_masks / dt:8.1f} {n_prompts / dt:9.1f} "
              f"{1e3 * dt / n_req:10.1f} "
              f"{encodes:7d} {parts['decode'] / n_req:9.1f} {parts['encode'] / n_req:9.2f} "
              f"{parts['segment'] / n_req:10.1f}")
    print(f"\nserver peak RSS: {peak_mb:.0f} MB (VmHWM; {idle_mb:.0f} MB when idle and ready; "
          f"server's own ru_maxrss {stats['peak_rss_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
