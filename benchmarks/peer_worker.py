"""The peer's side of ``bench.py --suite``: diffusers' own runner, timed one repetition at a time.

Runs in the peer's virtualenv (torch + diffusers), never in diffax's:

  ../peer-venv/bin/python benchmarks/peer_worker.py ../shared/peers/diffusers_bench.py \
      --config small --what train --batch 32

It imports ``make_task`` from the runner (so the work is exactly the runner's), warms up once, prints
``{"ready": {...}}``, then answers each ``run`` line on stdin with ``{"seconds": ..., "cpu_seconds": ...}``
(wall and process CPU seconds, all threads, of one repetition).
"""

import argparse
import importlib.util
import json
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runner")
    p.add_argument("--config", required=True)
    p.add_argument("--what", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args()
    import diffusers

    spec = importlib.util.spec_from_file_location("diffusers_bench", args.runner)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)

    if args.threads:
        runner.torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, run = runner.make_task(args.config, args.what, args.batch)
    run()
    info = {
        "compile_s": time.perf_counter() - start,
        "params": sum(p.numel() for p in model.parameters()),
        "threads": runner.torch.get_num_threads(),
        "versions": f"diffusers {diffusers.__version__} / torch {runner.torch.__version__}",
    }
    print(json.dumps({"ready": info}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds}), flush=True)


if __name__ == "__main__":
    main()
