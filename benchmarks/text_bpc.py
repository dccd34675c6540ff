"""Bits per character of the text runs, side by side, next to the text8 papers' figures (a different corpus).

    python benchmarks/text_bpc.py --runs=/work/runs/i33 > benchmarks/results/<date>-text-bpc.md

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


def _row(run: str) -> dict | None:
    evals = sorted(glob.glob(os.path.join(run, "eval", "step_*.json")))
    if not evals or not os.path.exists(os.path.join(run, "config.json")):
        return None
    record = json.load(open(evals[-1]))
    config = json.load(open(os.path.join(run, "config.json")))
    loss, process = config["loss"]["name"], config["process"]["name"]
    key = process if process.startswith("d3pm") else loss
    cpu = ""
    timing = run.rstrip("/") + ".time"
    if os.path.exists(timing):
        found = re.search(r"train wall ([0-9.]+) s user ([0-9.]+) s sys ([0-9.]+) s", open(timing).read())
        if found:
            wall, user, sys_ = (float(x) for x in found.groups())
            cpu = f"{(user + sys_) / 60:.1f} ({wall / 60:.0f})"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="Directory holding one run directory per experiment.")
    args = parser.parse_args()
    rows = [r for r in (_row(d) for d in sorted(glob.glob(os.path.join(args.runs, "*/")))) if r]
    ar = {r["dataset"]: r["bpc"] for r in rows if r["key"] == "autoregressive"}
    print(
        "| run | method | held-out bits/char (± s.e.) | ratio to AR | train steps | train CPU min (wall) |"
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
