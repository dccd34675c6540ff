"""Bits per character of the text runs, side by side, next to the text8 papers' figures (a different corpus).

    python benchmarks/text_bpc.py --runs=/work/runs/i33 > benchmarks/results/<date>-text-bpc.md
    python benchmarks/text_bpc.py --curve=/work/runs/i33/text_mdlm   # every checkpoint of one run

Each run directory under ``--runs`` (trained by ``python -m diffax.main --config=experiments/text_*.py``,
then evaluated by ``python -m diffax.evaluate``) gives one row from its newest ``eval/step_*.json`` and
its ``config.json``; ``<run>.time`` beside it (``/usr/bin/time`` output) gives the CPU seconds of
training. Measured, never asserted: the held-out corpus is the last 10% of CPython 3.11.7's
``pydoc_data/topics.py`` in text8 normalisation, not text8.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re

# Test-set bits per character on text8 (upper bounds for the diffusion models), as compiled in the
# text8 table of RDLM (arXiv 2502.11564) "from the corresponding papers"; RADD reports no text8 number.
TEXT8 = {
    "autoregressive": ("Transformer AR", "1.23"),
    "mdlm": ("MDLM", "≤ 1.40"),
    "sedd": ("SEDD absorb", "≤ 1.39"),
    "radd_lambda_dce": ("RADD", "—"),
    "d3pm_uniform": ("D3PM uniform", "≤ 1.61"),
    "d3pm_absorbing": ("D3PM absorb", "≤ 1.45"),
}


def _train_cpu(timing: str) -> str:
    """``"CPU-s (wall min)"`` of training from ``/usr/bin/time -v`` output (or the one-line
    ``train wall W s user U s sys S s`` format); ``""`` when neither is found."""
    short = re.search(r"train wall ([0-9.]+) s user ([0-9.]+) s sys ([0-9.]+) s", timing)
    if short:
        wall, user, sys_ = (float(x) for x in short.groups())
        return f"{user + sys_:.0f} ({wall / 60:.0f})"
    user = re.search(r"User time \(seconds\): ([0-9.]+)", timing)
    sys_ = re.search(r"System time \(seconds\): ([0-9.]+)", timing)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([0-9:.]+)", timing)
    if not (user and sys_ and wall):
        return ""
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.group(1).split(":"))))
    return f"{float(user.group(1)) + float(sys_.group(1)):.0f} ({seconds / 60:.0f})"


def _row(run: str) -> dict | None:
    evals = sorted(glob.glob(os.path.join(run, "eval", "step_*.json")))
    if not evals or not os.path.exists(os.path.join(run, "config.json")):
        return None
    record = json.load(open(evals[-1]))
    config = json.load(open(os.path.join(run, "config.json")))
    loss, process = config["loss"]["name"], config["process"]["name"]
    key = process if process.startswith("d3pm") else loss
    timing = run.rstrip("/") + ".time"
    cpu = _train_cpu(open(timing).read()) if os.path.exists(timing) else ""
    m = record["metrics"]
    params = config["model"]
    return dict(
        key=key,
        run=os.path.basename(run.rstrip("/")),
        bpc=m["bits_per_char"],
        stderr=m.get("bits_per_char_stderr", 0.0),
        steps=record["step"],
        sampler=f"{record['sampler']} ×{record['sampler_steps']}",
        nfe=m.get("nfe", float("nan")),
        entropy=m.get("sample_entropy", float("nan")),
        cpu=cpu,
        model=f"{params['depth']}×{params['hidden_size']}, L={config['input']['seq_len']}",
        dataset=config["input"]["dataset"],
    )


def curve(run: str, *, passes: int) -> None:
    """Prints the held-out bits/char of every checkpoint of ``run`` (EMA and raw parameters)."""
    import flax.linen as nn
    import jax
    import ml_collections

    from diffax import checkpoint, sharding, train_state
    from diffax import config as config_lib
    from diffax.discrete import system

    checkpoint.quiet_orbax_logs()
    config = config_lib.load(run)
    parts = train_state.build(config)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices=jax.local_devices())
    abstract = nn.meta.unbox(jax.eval_shape(train_state.state_initializer(config, parts)))
    target = checkpoint.abstract_with_shardings(
        abstract, jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
    )
    ckpt = checkpoint.Checkpointer(run, every_steps=config.ckpt.every_steps, keep=config.ckpt.keep)
    bound_fn, tokens = system.make_bound(config, parts), system.heldout_tokens(config)
    passes = 1 if parts.schedule is None else passes
    print(f"{os.path.basename(run.rstrip('/'))}: held-out bits/char per checkpoint ({passes} passes)")
    print("| step | EMA (± s.e.) | raw (± s.e.) |\n|---|---|---|")
    steps = sorted(int(d) for d in os.listdir(ckpt.directory) if d.isdigit())
    for step in steps:
        state = ckpt.restore(step, target, None)
        cells = [
            system.bits_per_char(
                bound_fn,
                params,
                tokens,
                batch_size=config.evals.batch_size,
                passes=passes,
                key=jax.random.key(step),
            )
            for params in (state.sampling_params(), state.params)
        ]
        print(f"| {step} | " + " | ".join(f"{bpc:.4f} ± {se:.4f}" for bpc, se in cells) + " |", flush=True)
    ckpt.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", help="Directory holding one run directory per experiment.")
    parser.add_argument("--curve", help="Instead: one run directory, scored at every checkpoint.")
    parser.add_argument("--passes", type=int, default=2, help="With --curve: passes of the bound.")
    args = parser.parse_args()
    if args.curve:
        return curve(args.curve, passes=args.passes)
    if not args.runs:
        parser.error("--runs or --curve is required.")
    rows = [r for r in (_row(d) for d in sorted(glob.glob(os.path.join(args.runs, "*/")))) if r]
    ar = {r["dataset"]: r["bpc"] for r in rows if r["key"] == "autoregressive"}
    print(
        "| run | method | held-out bits/char (± s.e.) | ratio to AR | train steps | train CPU-s (wall min) |"
        " model | sampler | NFE | sample entropy (nats) | text8, papers |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name, paper = TEXT8.get(r["key"], (r["key"], ""))
        ratio = f"{r['bpc'] / ar[r['dataset']]:.3f}" if r["dataset"] in ar else ""
        bound = "" if r["key"] == "autoregressive" else "≤ "
        print(
            f"| {r['run']} | {name} | {bound}{r['bpc']:.4f} ± {r['stderr']:.4f} | {ratio} | {r['steps']} |"
            f" {r['cpu']} | {r['model']} | {r['sampler']} | {r['nfe']:.1f} | {r['entropy']:.3f} | {paper} |"
        )


if __name__ == "__main__":
    main()
