"""Images/s preprocessed beside images/s encoded by the vision encoder (issue #17, item 10).

For JPEGs of 448x448, 1024x768 and 1920x1080 (one image per request, max_num 12, thumbnail on), prints:

- ``official``: the path before this change (``dynamic_preprocess`` + ``build_transform`` per tile +
  ``torch.stack``, then the float32 blake2b content hash ``ImageInput.from_tiles`` takes), one thread;
- ``exact``: ``image_tiles.tile_pixel_values`` (bit-identical pixel values; checked here), serial and with
  a pool of N threads for the thumbnail and the tiles' normalisation (``--threads``);
- ``exact xC``: C requests at once, each on its own thread as the server's workers are, sharing a 4-thread
  pool (``--concurrency``): the host's throughput when requests arrive together;
- ``device``: ``image_device.device_pixel_values`` on ``--device`` (torch resize; not bit-identical);
- ``encoder``: InternVL2-1B's vision encoder + mlp1 (random weights, the real shapes, ``--device``, bf16 on
  CUDA, the loader's compute plan on the CPU) as images/s at each size's tile count;
- with ``--compare``: the device path's pixel differences to the exact one at each size, and its first-step
  logit differences on the tiny checkpoint (``--checkpoint``, default tests/fixtures/ckpt/tiny-1B).

Every time is the best of ``--rounds``, the columns timed in turn within each round (a decoded image each
time: decode is part of preprocessing).

    python benchmarks/preprocess.py [--device cpu|cuda] [--rounds 5] [--threads 2,4] [--concurrency 8]
                                    [--encoder-tiles 13] [--skip-encoder] [--compare]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from internvl_runtime.hardware import describe_host  # noqa: E402
from internvl_runtime.processing.grid import count_tiles  # noqa: E402
from internvl_runtime.processing.image import build_transform, dynamic_preprocess, open_image  # noqa: E402
from internvl_runtime.processing.image_device import device_pixel_values  # noqa: E402
from internvl_runtime.processing.image_tiles import tile_pixel_values  # noqa: E402

SIZES = [(448, 448), (1024, 768), (1920, 1080)]
MAX_NUM = 12
TILE = 448


def make_jpeg(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG: smooth colour fields plus fine noise (quality 90)."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((height // 16 + 1, width // 16 + 1, 3)) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), np.int16)
    noisy = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def official(data: bytes) -> tuple[torch.Tensor, str]:
    """The path before: per-tile transform, stack, float32 hash (``ImageInput.from_tiles``)."""
    image = open_image(data)
    transform = build_transform(TILE)
    pixels = torch.stack([transform(t) for t in dynamic_preprocess(image, max_num=MAX_NUM, use_thumbnail=True)])
    return pixels, hashlib.blake2b(pixels.numpy().tobytes(), digest_size=16).hexdigest()


def best(fn: Callable[[], object], rounds: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()                              # warm-up (first-call costs: thread start, allocator, kernels)
    sync()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved(columns: list[Callable[[], object]], rounds: int, sync: Callable[[], None]) -> list[float]:
    """Best seconds of each column, the columns timed in turn within each round (so that other work on a
    shared host slows them alike)."""
    times = [float("inf")] * len(columns)
    for round_ in range(rounds + 1):                 # round 0 warms up
        for i, fn in enumerate(columns):
            start = time.perf_counter()
            fn()
            sync()
            if round_:
                times[i] = min(times[i], time.perf_counter() - start)
    return times


def encoder(device: torch.device, tiles: int, rounds: int) -> float:
    """Seconds per tile of InternVL2-1B's vision encoder + mlp1 (random weights) on ``device``."""
    from internvl_runtime.compute_plan import apply_plan, choose_plan
    from internvl_runtime.config import InternVLConfig
    from internvl_runtime.models.internvl import InternVLModel
    from internvl_runtime.testing.checkpoints import make_config

    raw = make_config("1B", scale="real")
    raw["llm_config"].update(num_hidden_layers=1, vocab_size=1024)      # the encoder is what is timed
    config = InternVLConfig.from_dict(raw)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.bfloat16 if _cpu_bf16() else torch.float32
    with torch.device(device):
        model = InternVLModel(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    if device.type == "cpu":
        apply_plan(model, choose_plan(dtype, device))
    pixels = torch.randn(tiles, 3, TILE, TILE, device=device)
    with torch.inference_mode():
        seconds = best(lambda: model.extract_feature(pixels), rounds, _sync(device))
    return seconds / tiles


def _cpu_bf16() -> bool:
    from internvl_runtime.hardware import cpu_flags

    return "avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags()


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def concurrent_rate(datas: list[bytes], concurrency: int, pool: concurrent.futures.Executor, rounds: int) -> float:
    """Images/s with ``concurrency`` requests at once, each on its own worker thread (as the server's)."""
    with concurrent.futures.ThreadPoolExecutor(concurrency) as workers:
        def wave() -> None:
            list(workers.map(lambda d: tile_pixel_values(open_image(d), max_num=MAX_NUM, image_size=TILE,
                                                         executor=pool), datas))
        return len(datas) / best(wave, rounds)


def compare(checkpoint: Path, device: torch.device, datas: dict[tuple[int, int], bytes]) -> None:
    """The device path against the exact one: pixels at each size, first-step logits on ``checkpoint``."""
    from internvl_runtime import AutoModel, AutoTokenizer

    print("\ndevice path vs exact, pixel values (normalised units; one uint8 step is 0.0171-0.0175):")
    for size, data in datas.items():
        image = open_image(data)
        exact = tile_pixel_values(image, max_num=MAX_NUM, image_size=TILE).pixel_values
        dev = device_pixel_values(image, max_num=MAX_NUM, image_size=TILE, device=device).pixel_values.cpu()
        diff = (dev - exact).abs()
        print(f"  {size[0]}x{size[1]}: max {diff.max():.4f}, mean {diff.mean():.5f}, "
              f"{100 * float((diff > 0).float().mean()):.2f}% of values differ")
    model = AutoModel.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    size = model.config.image_size
    print(f"\nfirst-step logits on {checkpoint.name} (random weights, float32, CPU encoder and LLM):")
    for (w, h), data in datas.items():
        image = open_image(data)
        rows = []
        for pixels in (tile_pixel_values(image, max_num=MAX_NUM, image_size=size).pixel_values,
                       device_pixel_values(image, max_num=MAX_NUM, image_size=size, device=device).pixel_values):
            _, query = model.build_chat_query(pixels.cpu(), "<image>\nDescribe the image.", None, None)
            ids = torch.tensor(tokenizer(query)["input_ids"])
            with torch.inference_mode():
                rows.append(model(pixel_values=pixels.cpu(), input_ids=ids).logits[0, -1])
        exact, dev = rows
        rel = float((dev - exact).norm() / exact.norm())
        print(f"  {w}x{h}: rel. err {rel:.2e}, max abs {float((dev - exact).abs().max()):.2e}, "
              f"argmax equal {bool(dev.argmax() == exact.argmax())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: the device path and the encoder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default="2,4", help="pool sizes for the exact path (comma list)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests at once for the 'exact xC' row")
    parser.add_argument("--encoder-tiles", type=int, default=None,
                        help="tiles per encoder batch (default 13 on CUDA, 1 on the CPU)")
    parser.add_argument("--skip-encoder", action="store_true")
    parser.add_argument("--compare", action="store_true", help="the device path's pixel and logit differences")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "tests" / "fixtures" / "ckpt" / "tiny-1B")
    args = parser.parse_args()
    device = torch.device(args.device)
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    print(describe_host())
    print(f"device {device}; one image per request, max_num {MAX_NUM}, tile {TILE}, best of {args.rounds}")
    datas = {size: make_jpeg(*size, seed=i) for i, size in enumerate(SIZES)}

    per_tile = None
    if not args.skip_encoder:
        tiles = args.encoder_tiles or (13 if device.type == "cuda" else 1)
        per_tile = encoder(device, tiles, max(1, min(args.rounds, 3 if device.type == "cpu" else args.rounds)))
        print(f"vision encoder + mlp1 (InternVL2-1B shapes, batch {tiles}): {per_tile * 1e3:.1f} ms/tile, "
              f"{1 / per_tile:.1f} tiles/s")

    pools = {n: concurrent.futures.ThreadPoolExecutor(n) for n in threads}
    shared = concurrent.futures.ThreadPoolExecutor(4)
    sync = _sync(device)
    print("\n| image | tiles | official | exact, 1 thread | " + " | ".join(f"exact, {n} threads" for n in threads)
          + f" | exact x{args.concurrency} requests | device ({device}) | encoder ({device}) |")
    print("|---" * (6 + len(threads)) + "|---|")
    for (w, h), data in datas.items():
        tiles = count_tiles(w, h, min_num=1, max_num=MAX_NUM, use_thumbnail=True, image_size=TILE)
        want = official(data)[0]
        got = tile_pixel_values(open_image(data), max_num=MAX_NUM, image_size=TILE).pixel_values
        assert torch.equal(want, got), "the exact path is not bit-identical"
        columns: list[Callable[[], object]] = [
            lambda d=data: official(d),
            lambda d=data: tile_pixel_values(open_image(d), max_num=MAX_NUM, image_size=TILE),
            *[lambda d=data, n=n: tile_pixel_values(open_image(d), max_num=MAX_NUM, image_size=TILE,
                                                    executor=pools[n]) for n in threads],
            lambda d=data: device_pixel_values(open_image(d), max_num=MAX_NUM, image_size=TILE, device=device)]
        *cells, dev = interleaved(columns, args.rounds, sync)
        rate = concurrent_rate([data] * args.concurrency, args.concurrency, shared, args.rounds)
        row = [f"{w}x{h} JPEG", str(tiles)] + [f"{1 / s:.1f}/s ({s * 1e3:.1f} ms)" for s in cells]
        row += [f"{rate:.1f}/s", f"{1 / dev:.1f}/s ({dev * 1e3:.1f} ms)"]
        row.append(f"{1 / (per_tile * tiles):.3g}/s" if per_tile else "skipped")
        print("| " + " | ".join(row) + " |")
    print("(images/s, and ms per image; 'exact xC' is C requests at once over C worker threads)")
    for pool in [*pools.values(), shared]:
        pool.shutdown()
    if args.compare:
        compare(args.checkpoint, device, datas)


if __name__ == "__main__":
    main()
