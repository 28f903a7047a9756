"""Is DRIP correct and fast on this GPU? One command, about 8 minutes, a report at the end.

    python gpu_check.py                          # writes out/gpu_check/report.md and gpu_check.json
    python gpu_check.py --out_dir out/gpu_check_h100 --batch_size 128

Steps, in this order (a step that fails or runs past its limit is reported, and the rest still run):
  1. the GPU tests: varlen attention against the padded fallback (DRIP_VARLEN=0), bf16, also past
     128 tokens an image
  2. flops.py's benchmark of the ViT-B/16 image tower at batch 256, bf16: compress 1, 2, 4, 10 eager,
     the padded fallback at 4, the CLIP step (image and text tower) at 1 and 4
  3. a short bf16 CLIP run on the built-in data, then the same with --compile
  4. a one-rank --fsdp --cpu_offload LLaVA run on that tower, then the same run --resume'd further
  5. the image tower at compress 1 and 4 under torch.compile (each in a subprocess with a time limit)
The report states each target (the README's): compress 4 at >= 2.1x the compress-1 step and <= 0.5x
its memory, the CLIP step >= 1.7x, compiled compress 4 >= 2.6x eager compress 1; and the card,
driver and torch version. Without a CUDA GPU it says so and exits with an error.
"""
import json
import os
import subprocess
import sys
import time

import torch

from common import ArgumentParser, check_writable, die
from flops import bench_row

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = [  # (name, what is compared, the bound, ">=" or "<=")
    ("compress 4 step speed-up", "step time of compress 1 / compress 4, image tower, eager", 2.1, ">="),
    ("compress 4 memory ratio", "peak memory of compress 4 / compress 1, image tower, eager", 0.5, "<="),
    ("CLIP step speed-up", "step time of compress 1 / compress 4, image and text tower, eager", 1.7, ">="),
    ("compiled speed-up", "step time of eager compress 1 / compiled compress 4, image tower", 2.6, ">="),
]


def machine():
    """Card, driver, torch, CUDA and cuDNN versions."""
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    return {"card": torch.cuda.get_device_name(), "driver": driver, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "python": sys.version.split()[0]}


def run_step(name, command, limit, out_dir, env=None):
    """A subprocess with a time limit; its output goes to out_dir/<name>.log. Returns a result dict."""
    start = time.time()
    with open(os.path.join(out_dir, f"{name}.log"), "w") as log:
        try:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=limit, cwd=HERE,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    with open(os.path.join(out_dir, f"{name}.log")) as log:
        tail = log.read().splitlines()[-3:]
    return {"command": " ".join(command), "exit": code, "seconds": round(time.time() - start, 1), "tail": tail}


def bench(rows, key, compress, tower="image", varlen=True, batch_size=256, model="ViT-B-16"):
    """One flops.bench_row, recorded under `key` (an exception is recorded instead of a row)."""
    os.environ["DRIP_VARLEN"] = "1" if varlen else "0"
    start = time.time()
    try:
        rows[key] = bench_row(model, compress, 0, tower, batch_size, torch.device("cuda"), False, steps=20, warmup=10)
    except Exception as e:  # a kernel failure is a finding, not a reason to stop the check
        rows[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
    rows[key]["seconds"] = round(time.time() - start, 1)
    os.environ["DRIP_VARLEN"] = "1"
    torch.cuda.empty_cache()


def targets(rows):
    """Each target's measured value and whether it is met (None where a row is missing)."""
    def ratio(a, b, field="step_ms"):
        if field in rows.get(a, {}) and field in rows.get(b, {}):
            return rows[a][field] / rows[b][field]
        return None
    values = [ratio("eager c1", "eager c4"), ratio("eager c4", "eager c1", "peak_memory_gib"),
              ratio("clip c1", "clip c4"), ratio("eager c1", "compiled c4")]
    return [{"target": name, "what": what, "bound": f"{op} {bound}", "value": value,
             "met": None if value is None else (value >= bound if op == ">=" else value <= bound)}
            for (name, what, bound, op), value in zip(TARGETS, values)]


def report(result, path):
    """The markdown report: machine, steps, benchmark rows, targets."""
    m = result["machine"]
    lines = ["# DRIP GPU check", "", f"{m['card']}, driver {m['driver']}, torch {m['torch']} (CUDA {m['cuda']}, "
             f"cuDNN {m['cudnn']}), Python {m['python']}; `python gpu_check.py`, {result['date']}", "",
             "| step | exit | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {s['exit']} | {s['seconds']} |" for name, s in result["steps"].items()]
    lines += ["", f"Benchmark: ViT-B/16 at batch {result['batch_size']}, bf16 autocast, fused AdamW, a training step "
              "(forward, backward, optimizer); ceiling = the same model with evenly fixed boundaries (no padding); "
              "memory = peak allocated.", "",
              "| row | step ms | images/s | of ceiling | peak GiB | real tokens | inference images/s |",
              "|---|---|---|---|---|---|---|"]
    for key, r in result["bench"].items():
        if "error" in r:
            lines.append(f"| {key} | error: {r['error'][:120]} | | | | | |")
            continue
        ceiling = f"{r['of_ceiling']:.2f}" if "of_ceiling" in r else "-"
        lines.append(f"| {key} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} | {ceiling} | {r['peak_memory_gib']:.2f} "
                     f"| {r['real_token_fraction']:.1%} | {r['infer_images_per_s']:.0f} |")
    lines += ["", "| target | measured | bound | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"| {t['target']}: {t['what']} | {value} | {t['bound']} | "
                     f"{'-' if t['met'] is None else 'yes' if t['met'] else 'no'} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    parser = ArgumentParser(__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default="out/gpu_check", help="where report.md, gpu_check.json and the logs go")
    parser.add_argument("--batch_size", type=int, default=256, help="images per benchmark step")
    args = parser.parse_args()
    if args.batch_size < 1:
        die(f"--batch_size must be >= 1, got {args.batch_size}")
    check_writable(args.out_dir, "--out_dir")
    if not torch.cuda.is_available():
        die("no CUDA GPU is visible: gpu_check.py measures a GPU; run it on a machine with one")
    os.makedirs(args.out_dir, exist_ok=True)
    out_dir = os.path.abspath(args.out_dir)
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "batch_size": args.batch_size,
              "steps": {}, "bench": {}, "targets": []}

    def save():
        result["targets"] = targets(result["bench"])
        with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
            json.dump(result, f, indent=2)
        report(result, os.path.join(out_dir, "report.md"))

    steps, rows, py = result["steps"], result["bench"], sys.executable
    steps["GPU tests"] = run_step("tests", [py, "-m", "pytest", "-q", "test_model.py", "-k", "gpu"], 150, out_dir)
    save()
    for c in (1, 2, 4, 10):
        bench(rows, f"eager c{c:g}", c, batch_size=args.batch_size)
    bench(rows, "padded fallback c4", 4, varlen=False, batch_size=args.batch_size)
    for c in (1, 4):
        bench(rows, f"clip c{c:g}", c, tower="clip", batch_size=args.batch_size)
    save()
    clip_dir = os.path.join(out_dir, "clip_run")
    clip = [py, "train_clip.py", "--compress", "4", "--epochs", "1", "--data_dir", os.path.join(out_dir, "data")]
    steps["CLIP run"] = run_step("clip_run", clip + ["--out_dir", clip_dir], 120, out_dir)
    steps["CLIP run, --compile"] = run_step("clip_compile", clip + ["--compile", "--max_steps", "40", "--out_dir",
                                                                    os.path.join(out_dir, "clip_compile")], 120, out_dir)
    save()
    llava = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train_llava.py",
             "--init_from", os.path.join(clip_dir, "ckpt.pt"), "--fsdp", "--cpu_offload", "--steps_stage0", "20",
             "--eval_samples", "64", "--out_dir", os.path.join(out_dir, "llava_run"), "--data_dir", os.path.join(out_dir, "data")]
    steps["LLaVA --fsdp --cpu_offload"] = run_step("llava_run", llava + ["--max_steps", "10"], 150, out_dir)
    steps["LLaVA --fsdp --cpu_offload --resume"] = run_step("llava_resume", llava + ["--max_steps", "20", "--resume"],
                                                            150, out_dir)
    save()
    for c in (1, 4):  # compile can take minutes (and recompiles as packed lengths change): a subprocess with a limit
        code = (f"import json, torch, flops; print('ROW', json.dumps(flops.bench_row('ViT-B-16', {c}, 0, 'image', "
                f"{args.batch_size}, torch.device('cuda'), True, steps=20, warmup=10)))")
        steps[f"compiled c{c}"] = run_step(f"compiled_c{c}", [py, "-c", code], 150, out_dir)
        with open(os.path.join(out_dir, f"compiled_c{c}.log")) as log:
            row = [line[4:] for line in log if line.startswith("ROW ")]
        rows[f"compiled c{c}"] = json.loads(row[0]) if row else {"error": f"no result ({steps[f'compiled c{c}']['exit']})"}
        save()
    print(open(os.path.join(out_dir, "report.md")).read())
    print(f"report: {out_dir}/report.md, numbers: {out_dir}/gpu_check.json")


if __name__ == "__main__":
    main()
