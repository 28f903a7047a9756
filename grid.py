"""The reducer comparison grid: train_clip.py runs on the built-in data, resumable, then the table and plot.

Each reducer at each compression with each seed, and the plain ViT; flops.py --runs reads them.

    python grid.py                                          # every reducer, 2x 4x 10x, seeds 0 1 2, plain ViT too
    python grid.py --reducer drip uniform --compress 4 --seeds 0 1 2 3 4
    python grid.py --boundaries entropy --reducer drip      # DRIP with entropy-spike boundaries

Run R at compress C with seed S goes to out_dir/R_cC_sS (DRIP with --boundaries entropy:
drip-entropy_cC_sS; the plain ViT: plain_c1_sS), each with one thread, --jobs at a time. A
run whose metrics.jsonl holds its last epoch is skipped; one with a checkpoint continues
from it (--resume), so an interrupted grid is finished by running the same command again.
At the end flops.py --runs prints the table (mean, standard deviation and every seed) and
draws out_dir/accuracy_vs_gflops.png.
"""
import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time

from common import ArgumentParser, check_writable, die
from reducers import REDUCERS

HERE = os.path.dirname(os.path.abspath(__file__))


def finished(out_dir, epochs):
    """Whether the run in out_dir has written the record of its last epoch."""
    try:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            return any(json.loads(line).get("epoch") == epochs for line in f if line.strip())
    except (OSError, ValueError):
        return False


def command(reducer, compress, seed, args, out_dir):
    """train_clip.py's command line for one run, continuing from its checkpoint if it has one."""
    flags = ["--compress", f"{compress:g}", "--seed", str(seed), "--epochs", str(args.epochs), "--out_dir", out_dir]
    if compress > 1:
        flags += ["--reducer", reducer, "--boundaries", args.boundaries]
    if os.path.isfile(os.path.join(out_dir, "ckpt.pt")):
        flags.append("--resume")
    return [sys.executable, os.path.join(HERE, "train_clip.py")] + flags + shlex.split(args.train_args)


def main():
    parser = ArgumentParser(__doc__.split("\n")[0])
    parser.add_argument("--reducer", nargs="+", default=list(REDUCERS), choices=REDUCERS, help="reducers to run")
    parser.add_argument("--compress", type=float, nargs="+", default=[2, 4, 10], help="compressions > 1")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of each setting")
    parser.add_argument("--boundaries", choices=["gumbel", "entropy"], default="gumbel", help="DRIP's predictor")
    parser.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                        help="also the plain ViT (compress 1), each seed")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--epochs", type=int, default=6, help="train_clip.py's --epochs")
    parser.add_argument("--train_args", default="", help="more train_clip.py flags for every run, e.g. "
                        "'--data_dir data --batch_size 64'")
    parser.add_argument("--out_dir", default="out/grid", help="where the runs, the table and the plot go")
    args = parser.parse_args()
    if any(not c > 1 for c in args.compress):
        die("--compress values must be > 1 (the plain ViT is --plain)")
    if args.jobs < 1 or args.epochs < 1 or any(s < 0 for s in args.seeds):
        die("--jobs and --epochs must be >= 1 and --seeds >= 0")
    if args.boundaries == "entropy" and args.reducer != ["drip"]:
        die("--boundaries entropy is DRIP's predictor: give --reducer drip")
    check_writable(args.out_dir, "--out_dir")

    settings = [("plain", "drip", 1.0)] if args.plain else []
    settings += [("drip-entropy" if r == "drip" and args.boundaries == "entropy" else r, r, c)
                 for c, r in itertools.product(args.compress, args.reducer)]
    runs = [(name, reducer, compress, seed, os.path.join(args.out_dir, f"{name}_c{compress:g}_s{seed}"))
            for (name, reducer, compress), seed in itertools.product(settings, args.seeds)]
    todo = [r for r in runs if not finished(r[-1], args.epochs)]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} finished already, {len(todo)} to run, {args.jobs} at a time",
          flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    running, failed = [], []
    while todo or running:
        while todo and len(running) < args.jobs:
            name, reducer, compress, seed, out_dir = todo.pop(0)
            os.makedirs(out_dir, exist_ok=True)
            log = open(os.path.join(out_dir, "train.log"), "a")
            running.append((out_dir, log, subprocess.Popen(command(reducer, compress, seed, args, out_dir), stdout=log,
                                                          stderr=subprocess.STDOUT, env=env, cwd=HERE)))
            print(f"started {out_dir}", flush=True)
        time.sleep(5)
        for item in [r for r in running if r[2].poll() is not None]:
            running.remove(item)
            item[1].close()
            ok = item[2].returncode == 0 and finished(item[0], args.epochs)
            print(f"{'finished' if ok else 'FAILED (see its train.log)'} {item[0]}", flush=True)
            if not ok:
                failed.append(item[0])
    if failed:
        die(f"{len(failed)} run(s) failed, e.g. {failed[0]}; run the same command again to retry them")
    table = subprocess.run([sys.executable, os.path.join(HERE, "flops.py"), "--runs"] + [r[-1] for r in runs]
                           + ["--plot", os.path.join(args.out_dir, "accuracy_vs_gflops.png")], cwd=HERE)
    sys.exit(table.returncode)


if __name__ == "__main__":
    main()
