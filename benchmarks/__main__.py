"""``python -m benchmarks [--quick] [--sections quality,search,serving,load]``: run the benchmark
sections and write docs/benchmarks.md, docs/benchmarks.json and docs/img/*.png."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from . import report
from .common import BENCH_DIR, machine

SECTIONS = ("quality", "search", "serving", "load")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a few-minute version (smaller budgets)")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--out", default="docs")
    p.add_argument("--merge", action="store_true",
                   help="keep the other sections of the last run (output/bench/last_results.json)")
    p.add_argument("--update-docs", action="store_true",
                   help="replace only these sections in the existing docs/benchmarks.md and .json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    os.makedirs(BENCH_DIR, exist_ok=True)
    results: dict = {}
    last = os.path.join(BENCH_DIR, "last_results.json")
    if args.merge:
        if not os.path.isfile(last):  # without it the report would hold only these sections
            p.error(f"--merge needs the previous run's {last}; run the other sections too "
                    "(python -m benchmarks), or leave out --merge")
        with open(last) as f:
            results = {k: v for k, v in json.load(f).items() if k not in sections}
    img = os.path.join(args.out, "img")
    for name in sections:
        try:  # a failing section is reported, the others still run
            results[name] = _run_section(name, args.quick, img)
        except Exception as exc:
            logging.exception("section %s failed", name)
            results[name] = {"notes": [f"section {name} could not be measured: {exc}"[:500]]}
    with open(os.path.join(BENCH_DIR, "last_results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.update_docs:
        md = report.update_sections({k: results[k] for k in sections}, command.strip(), args.out)
        print(f"updated sections {', '.join(sections)} of {md} and "
              f"{os.path.join(args.out, 'benchmarks.json')}")
        return 0
    if args.merge:
        command += " (other sections kept from the previous full run: python -m benchmarks)"
    md = report.write(results, machine(), command.strip(), args.out)
    print(f"wrote {md} and {os.path.join(args.out, 'benchmarks.json')}")
    return 0


def _run_section(name: str, quick: bool, img: str) -> dict:
    if name == "quality":
        from . import quality

        q = quality.run(quick=quick)
        q["curve_plot"] = report.learning_curve_plot(q["runs"], os.path.join(img, "learning_curve.png"),
                                                     machine())
        return q
    if name == "search":
        from . import search

        return search.run(quick=quick, item_vectors=_trained_vectors(), out_img_dir=img)
    if name == "serving":
        # Its own process: Paddle Serving needs protobuf's pure-Python backend chosen before any
        # other import of google.protobuf (paddle, pymilvus), which this process has already done.
        import subprocess
        import tempfile

        with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
            code = ("import json, sys; from benchmarks import serving; "
                    f"json.dump(serving.run(quick={quick!r}), open(sys.argv[1], 'w'), default=str)")
            subprocess.run([sys.executable, "-c", code, out.name], check=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            return json.load(out)
    if name == "load":
        # Its own process too: it imports bench_serving (which picks protobuf's pure-Python backend
        # for this process) and starts servers and load generators as child processes.
        import subprocess
        import tempfile

        with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
            code = ("import json, sys; from benchmarks import serving_load; "
                    f"json.dump(serving_load.run(quick={quick!r}, out_img_dir={img!r}), "
                    "open(sys.argv[1], 'w'), default=str)")
            subprocess.run([sys.executable, "-c", code, out.name], check=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            return json.load(out)
    raise ValueError(f"unknown section {name!r}; expected {SECTIONS}")


def _trained_vectors():
    """Item vectors of the last trained amazon-book-1m model from the quality section, if any."""
    import glob

    import numpy as np
    import paddle

    ckpts = sorted(glob.glob(os.path.join(BENCH_DIR, "runs", "amazon_book_1m_tuned", "ckpt", "*",
                                          "rec.pdparams")), key=lambda p: int(p.split(os.sep)[-2]))
    if not ckpts:
        return None
    state = paddle.load(ckpts[-1])
    return np.asarray(state["item_emb.weight"].numpy()[1:], dtype=np.float32)


if __name__ == "__main__":
    sys.exit(main())
