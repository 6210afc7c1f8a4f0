"""Bookkeeping of bench/gpu_suite.sh: the environment, each stage's status and the summary, rewritten after
every stage so a suite cut short still returns a complete summary of what it did.

    python bench/gpu_suite_report.py env OUT [--dry-run]
    python bench/gpu_suite_report.py stage OUT NAME RC SECONDS LIMIT [--junit XML] [--copy JSON] [--note TEXT]

Files in OUT (at most 8, the device tool's limit): summary.json, summary.md, suite.log (written by the shell
script), kernel_tests.json, bench_kernels.json, bench_train.json, bench_sample.json, bench_sample_nocompile.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

STAGES = ("env", "kernel_tests", "bench_kernels", "bench_train", "bench_sample_nocompile", "bench_sample")


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def junit_to_json(xml_path: Path, out: Path) -> dict[str, Any]:
    """pytest's junit XML -> {"passed", "failed", "errors", "skipped", "tests": [{"name", "outcome", "seconds", "message"}]}."""
    res: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "tests": []}
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as e:
        res["error"] = f"no junit report: {e}"
        _write(out, res)
        return res
    for case in root.iter("testcase"):
        outcome, msg = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            el = case.find(tag)
            if el is not None:
                outcome, msg = name, (el.get("message") or "")[:300]
                break
        res[outcome] += 1
        res["tests"].append({"name": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                             "seconds": float(case.get("time") or 0.0), "message": msg})
    _write(out, res)
    return res


def env(out: Path, dry_run: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from utils import env_info, pick_device

    import mgkernels

    device = pick_device()
    info = env_info(device)
    info["csrc_extension"] = "built" if mgkernels.ext_available() else f"not available: {mgkernels.ext_error()}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = p.total_memory / 2**30
        info["multiprocessors"] = p.multi_processor_count
    summary = {"dry_run": dry_run, "env": info, "stages": [{"stage": "env", "status": "ok"}]}
    _write(out / "summary.json", summary)
    write_markdown(out, summary)


def stage(out: Path, name: str, rc: int, seconds: float, limit: float, junit: str | None, note: str | None,
          copy: str | None = None) -> None:
    summary = _load(out / "summary.json") or {"stages": []}
    status = "ok" if rc == 0 else "timeout" if rc in (124, 137) else "skipped" if rc == -1 else "failed"
    entry: dict[str, Any] = {"stage": name, "status": status, "rc": rc, "seconds": round(seconds, 1), "limit_s": limit}
    if note:
        entry["note"] = note
    if copy:  # a JSON the stage's command wrote elsewhere becomes OUT/<stage>.json
        src = Path(copy)
        if src.is_file():
            (out / f"{name}.json").write_bytes(src.read_bytes())
        elif status == "ok":
            entry["note"] = (entry.get("note", "") + f" missing {src.name}").strip()
    if junit:
        kt = junit_to_json(Path(junit), out / "kernel_tests.json")
        entry["tests"] = {k: kt[k] for k in ("passed", "failed", "errors", "skipped")}
        if status == "failed" and kt["failed"] + kt["errors"] == 0 and kt["passed"] > 0:
            entry["note"] = (entry.get("note", "") + f" pytest exit {rc}").strip()
    summary["stages"] = [s for s in summary["stages"] if s["stage"] != name] + [entry]
    summary["highlights"] = highlights(out)
    _write(out / "summary.json", summary)
    write_markdown(out, summary)


def highlights(out: Path) -> dict[str, Any]:
    h: dict[str, Any] = {}
    kt = _load(out / "kernel_tests.json")
    if kt:
        h["kernel_tests"] = {k: kt.get(k, 0) for k in ("passed", "failed", "errors", "skipped")}
        h["kernel_tests"]["failures"] = [t["name"] for t in kt.get("tests", []) if t["outcome"] in ("failed", "errors")][:20]
    bk = _load(out / "bench_kernels.json")
    if bk:
        per = {}
        for r in bk["rows"]:
            if r["provider"] not in ("eager", "compile") and "x_vs_eager" in r:
                per.setdefault(f"{r['op']}/{r['provider']}", []).append(r["x_vs_eager"])
        h["bench_kernels_x_vs_eager_median"] = {k: statistics.median(v) for k, v in per.items()}
    bt = _load(out / "bench_train.json")
    if bt:
        rows = []
        for r in bt["rows"]:
            item = {k: r.get(k) for k in ("model", "provider", "ac", "batch", "samples_per_s", "mfu", "pred_mfu", "meas/pred",
                                          "peak_mem_gib", "first_step_s", "error")}
            rows.append({k: v for k, v in item.items() if v is not None})
        h["bench_train"] = rows
        for model in {r["model"] for r in bt["rows"]}:
            ok = [r for r in bt["rows"] if r["model"] == model and "error" not in r]
            ref = [r for r in ok if r["provider"] == "ref"]
            if ok:
                best = max(ok, key=lambda r: r["samples_per_s"])
                h.setdefault("bench_train_best", {})[model] = {
                    "config": f"{best['provider']} AC {best['ac']} batch {best['batch']}", "mfu": best["mfu"],
                    "samples_per_s": best["samples_per_s"], "pred_mfu": best.get("pred_mfu"),
                    "x_vs_ref": best["samples_per_s"] / ref[0]["samples_per_s"] if ref else None}
    for name in ("bench_sample_nocompile", "bench_sample"):
        bs = _load(out / f"{name}.json")
        if bs:
            h[name] = [{k: r.get(k) for k in ("case", "guidance", "provider", "ms_p50", "s_per_video", "mfu", "speedup")}
                       for r in bs["rows"]]
    return h


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}%"


def write_markdown(out: Path, s: dict[str, Any]) -> None:
    e = s.get("env", {})
    lines = [f"# GPU suite{' (DRY RUN: CPU, tiny shapes)' if s.get('dry_run') else ''}", "",
             f"{e.get('device', '?')} | torch {e.get('torch', '?')} | triton {e.get('triton', '?')} | "
             f"git {e.get('git_sha', '?')} | {e.get('date', '?')} | csrc {e.get('csrc_extension', '?')}", "",
             "| stage | status | seconds | limit | note |", "|---|---|---|---|---|"]
    for st in s.get("stages", []):
        note = st.get("note", "") + (f" tests {st['tests']}" if "tests" in st else "")
        lines.append(f"| {st['stage']} | {st['status']} | {st.get('seconds', '')} | {st.get('limit_s', '')} | {note} |")
    h = s.get("highlights", {})
    if "kernel_tests" in h:
        k = h["kernel_tests"]
        lines += ["", f"**Kernel tests**: {k['passed']} passed, {k['failed']} failed, {k['errors']} errors, {k['skipped']} skipped"
                  + (f"; failing: {', '.join(k['failures'])}" if k["failures"] else "")]
    if "bench_kernels_x_vs_eager_median" in h:
        lines += ["", "**Kernels vs eager** (median speed-up over modes): " +
                  ", ".join(f"{k} {v:.2f}x" for k, v in sorted(h["bench_kernels_x_vs_eager_median"].items()))]
    if "bench_train" in h:
        lines += ["", "**Training step** (targets: XL/2 and grown >= 45% MFU, >= 2.5x the eager reference)", "",
                  "| model | provider | AC | batch | samples/s | MFU | predicted MFU | measured/predicted time | peak GiB | first step s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in h["bench_train"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['provider']} | {r['ac']} | {r['batch']} | {r['error'][:80]} | | | | | |")
                continue
            lines.append(f"| {r['model']} | {r['provider']} | {r['ac']} | {r['batch']} | {r['samples_per_s']:.2f} | {_pct(r.get('mfu'))} | "
                         f"{_pct(r.get('pred_mfu'))} | {r.get('meas/pred', 0):.2f} | {r.get('peak_mem_gib', 0):.1f} | "
                         f"{r.get('first_step_s', 0):.1f} |")
        for m, b in h.get("bench_train_best", {}).items():
            x = f"{b['x_vs_ref']:.2f}x the eager reference" if b.get("x_vs_ref") else "no reference row"
            lines.append(f"\nbest {m}: {b['config']}: MFU {_pct(b['mfu'])} (predicted {_pct(b.get('pred_mfu'))}), {x}")
    for name in ("bench_sample_nocompile", "bench_sample"):
        if name in h:
            lines += ["", f"**Sampling ({name})** (target: two-condition >= 2x the reference)", ""]
            for r in h[name]:
                sp = f", {r['speedup']:.2f}x" if r.get("speedup") else ""
                lines.append(f"- {r['case']} {r['guidance']} {r['provider']}: {r['ms_p50']:.2f} ms/step, "
                             f"{r['s_per_video']:.2f} s/video{sp}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("env", "stage"):
        print(__doc__)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if argv[0] == "env":
        env(out, "--dry-run" in argv)
        return 0
    name, rc, seconds, limit = argv[2], int(argv[3]), float(argv[4]), float(argv[5])
    opts = dict(zip(argv[6::2], argv[7::2], strict=False))
    stage(out, name, rc, seconds, limit, opts.get("--junit"), opts.get("--note"), opts.get("--copy"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
