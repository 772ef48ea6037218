"""Interleaved before/after of two source trees: vision + mlp1 (one 448 tile) and first token, wall and CPU time.

On a shared host wall times follow the load; each measure is also read as CPU time (``time.process_time``, all
threads), and the trees run in alternating fresh processes (before, after, after, before, ...), best kept.

    python benchmarks/ab_trees.py REPS ROUNDS THREADS WHAT [BEFORE_TREE AFTER_TREE]

WHAT: ``v`` (vision), ``t`` (first token) or ``vt``; the compute plan comes from the environment
(``INTERNVL_COMPUTE``, ``INTERNVL_CPU_KERNEL``, ...). Checkpoint: /tmp/bench/InternVL2-1B (random InternVL2-1B weights).
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def child(tree, rounds, threads, what):
    sys.path.insert(0, tree)
    sys.path.insert(0, tree + "/benchmarks")
    import torch
    torch.set_num_threads(threads)
    from bench_engine import make_image, run_to_first_token
    from internvl_runtime import AutoModel, AutoTokenizer
    from internvl_runtime.engine.engine import EngineConfig, LLMEngine
    from internvl_runtime.processing.inputs import Message
    ck = Path("/tmp/bench/InternVL2-1B")
    model = AutoModel.from_pretrained(ck, torch_dtype=torch.bfloat16)
    engine = LLMEngine(model, AutoTokenizer.from_pretrained(ck),
                       EngineConfig(num_blocks=512, enable_prefix_caching=False, image_cache_bytes=0))
    one = engine.processor.prepare([Message("user", "Describe the image.", [make_image(448, 448, 1)])], max_num=1)
    px = one.images[0].pixel_values
    res = {"vis": [], "vis_cpu": [], "ttft": [], "ttft_cpu": [], "plan": model.compute_plan.describe(),
           "tokens": len(one.prompt_token_ids)}
    with torch.inference_mode():
        model.extract_feature(px)
    if "t" in what:
        run_to_first_token(engine, one, "w")
    for r in range(rounds):
        if "v" in what:
            with torch.inference_mode():
                t, c = time.perf_counter(), time.process_time()
                model.extract_feature(px)
                res["vis"].append(time.perf_counter() - t)
                res["vis_cpu"].append(time.process_time() - c)
        if "t" in what:
            t, c = time.perf_counter(), time.process_time()
            run_to_first_token(engine, one, f"r{r}")
            res["ttft"].append(time.perf_counter() - t)
            res["ttft_cpu"].append(time.process_time() - c)
    print("RESULT " + json.dumps(res))

if __name__ == "__main__":
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    if sys.argv[1] == "child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        sys.exit()
    trees = {"before": sys.argv[5] if len(sys.argv) > 5 else "/tmp/vision-work/base",
             "after": sys.argv[6] if len(sys.argv) > 6 else str(Path(__file__).resolve().parents[1])}
    reps, rounds, threads, what = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    allr = {k: {} for k in trees}
    loads = []
    for rep in range(reps):
        for name, tree in (trees.items() if rep % 2 == 0 else reversed(list(trees.items()))):
            loads.append(os.getloadavg()[0])
            env = dict(os.environ, PYTHONPATH=tree)
            out = subprocess.run([sys.executable, __file__, "child", tree, str(rounds), str(threads), what],
                                 env=env, capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(out.stderr[-3000:])
                sys.exit(1)
            r = json.loads(line[0][7:])
            for k, v in r.items():
                if isinstance(v, list):
                    allr[name].setdefault(k, []).extend(v)
                else:
                    allr[name][k] = v
            print(name, {k: [round(x, 3) for x in v] for k, v in r.items() if isinstance(v, list)}, flush=True)
    print("load averages at each child start:", [round(x, 1) for x in loads])
    for name in trees:
        print(name, allr[name]["plan"], "prompt tokens", allr[name]["tokens"])
        print("  best:", {k: round(min(v), 3) for k, v in allr[name].items() if isinstance(v, list) and v})
    b, a = allr["before"], allr["after"]
    print("after/before (best):", {k: round(min(a[k]) / min(b[k]), 3) for k in b if isinstance(b[k], list) and b[k]})
