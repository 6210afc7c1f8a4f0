"""The paper's continual pre-training comparisons at small scale, on the synthetic world (an experiment, not a
benchmark: it measures quality, not speed).

    python experiments/study_continual.py --quick                  # a minute: checks the harness, not the claims
    python experiments/study_continual.py                          # the committed run (see results/README.md)
    python experiments/study_continual.py --report-only            # tabulate what is finished under --work

Every arm starts from the same released base model (the base bundle, ``modelgrow/assets/demo_base`` by default:
STDiT pre-trained on domain A, with its VAE, T5 and evaluator) and gets the same continual step x batch budget on
domain B. Arms: Base (no continual training), Vanilla, LoRA, Expansion insert / prefix / suffix (k = 1), insert
k = 1 training only the new blocks (LLaMA Pro style), insert with k = 0.5 and 2, Expansion + LLM, Vanilla + LLM,
and its ablations without the chat template and without the T5 -> LLM weight duplication; the Expansion + LLM arm
is also sampled with prompt modes S, L and SL. ``--seeds`` applies to the main arms (base / vanilla / LoRA /
expand-insert-k1 / expand+llm); ``--other-seeds`` to the rest. Metrics: held-out denoising loss on A
(forgetting) and B (new knowledge); the semantic evaluator's per-attribute accuracy (shape, colour, direction,
background) on sampled held-out prompts. Finished arms are kept under ``--work`` (``result.json`` each) and
reused. Output: JSON + a markdown table (mean +- std over seeds) under ``experiments/results/<device>/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from modelgrow import workbench as wb
from modelgrow.demo import Demo, with_overrides
from modelgrow.models import from_pretrained

RESULTS = Path(__file__).resolve().parent / "results"
ATTRS = ("shape", "color", "direction", "background")
MAIN_ARMS = ("vanilla", "lora", "expand-insert-k1", "expand+llm")

# name: (train.mode, grow overrides, prompt mode, LLM template)
ARMS: dict[str, tuple[str, list[str], str, bool]] = {
    "vanilla": ("vanilla", [], "S", True),
    "lora": ("lora", [], "S", True),
    "expand-insert-k1": ("expand", ["--grow.strategy", "insert", "--grow.ratio", "1"], "S", True),
    "expand+llm": ("expand", ["--grow.strategy", "insert", "--grow.ratio", "1", "--grow.llm", "true"], "SL", True),
    "expand-prefix-k1": ("expand", ["--grow.strategy", "prefix", "--grow.ratio", "1"], "S", True),
    "expand-suffix-k1": ("expand", ["--grow.strategy", "suffix", "--grow.ratio", "1"], "S", True),
    "expand-insert-k1-new-only": ("expand", ["--grow.strategy", "insert", "--grow.ratio", "1", "--grow.train_new_only",
                                             "true"], "S", True),
    "expand-insert-k0.5": ("expand", ["--grow.strategy", "insert", "--grow.ratio", "0.5"], "S", True),
    "expand-insert-k2": ("expand", ["--grow.strategy", "insert", "--grow.ratio", "2"], "S", True),
    "vanilla+llm": ("vanilla", ["--grow.llm", "true"], "SL", True),
    "vanilla+llm-no-template": ("vanilla", ["--grow.llm", "true", "--data.llm_use_template", "false"], "SL", False),
    "vanilla+llm-no-dup": ("vanilla", ["--grow.llm", "true", "--grow.copy_t5_to_llm", "false"], "SL", True),
}


def prepare(ws: wb.Workspace, base_dir: Path) -> None:
    """Data, the LLM and the caches every arm needs (the demo's stages data, encoders, base, cache)."""
    Demo(ws.out, ws.size, base_dir).run(["data", "encoders", "base", "cache"])
    needed = [(d, sp, "S") for d, sp in (("B", "train"), ("A", "heldout"), ("B", "heldout"))]
    if not all((ws.cache(*k) / "index.json").exists() for k in needed):
        wb.build_caches(ws, needed)


def cache_for(ws: wb.Workspace, domain: str, split: str, mode: str, template: bool) -> Path:
    path = ws.cache(domain, split, mode, template)
    if not (path / "index.json").exists():
        wb.build_caches(ws, [(domain, split, mode)], template=template)
    return path


def semantic(ws: wb.Workspace, evaluator, model_dir: Path, llm: bool, mode: str, template: bool) -> dict:
    pipe = wb.make_pipeline(ws, model_dir, llm, template=template)
    out = {}
    for d in ("A", "B"):
        res, _, _ = wb.sample_and_score(ws, pipe, evaluator, d, mode)
        out[d] = {k: res[k] for k in (*ATTRS, "semantic_score")}
    return out


def run_base(ws: wb.Workspace, evaluator) -> dict:
    done = ws.path("study", "base.json")
    if done.exists():
        return json.loads(done.read_text())
    base = from_pretrained(ws.base_model_dir)
    row = {"arm": "base", "seed": 0,
           "loss": {d: wb.heldout_loss(base, ws.cache(d, "heldout", "S"), llm=False) for d in ("A", "B")},
           "semantic": {"S": semantic(ws, evaluator, ws.base_model_dir, False, "S", True)},
           "params": sum(p.numel() for p in base.parameters()), "trainable": 0}
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(row, indent=2))
    return row


def run_arm(ws: wb.Workspace, evaluator, name: str, seed: int) -> dict:
    mode, grow, prompt_mode, template = ARMS[name]
    out = ws.path("study", f"{name}-seed{seed}")
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    llm = "--grow.llm" in grow
    if not (out / "train.json").exists():
        extra = ["--train.mode", mode, "--checkpoint.load_weights", str(ws.base_model_dir), "--data.prompt_mode",
                 prompt_mode, "--train.batch_size", str(ws.size.continual_batch), *grow]
        cfg = wb.train_config(ws, out / "run", ws.size.continual_steps, ws.size.continual_lr,
                              cache_for(ws, "B", "train", prompt_mode, template), extra, seed=seed)
        info = wb.train_and_export(cfg, out / "model")
        (out / "train.json").write_text(json.dumps({k: v for k, v in info.items() if k != "losses"} |
                                                   {"final_train_loss": info["losses"][-1][1] if info["losses"] else None}))
    model = from_pretrained(out / "model")
    loss = {d: wb.heldout_loss(model, cache_for(ws, d, "heldout", prompt_mode if llm else "S", template), llm)
            for d in ("A", "B")}
    modes = ["S", "L", "SL"] if name == "expand+llm" else [prompt_mode]
    row = {"arm": name, "seed": seed, "loss": loss,
           "semantic": {m: semantic(ws, evaluator, out / "model", llm, m, template) for m in modes},
           "params": sum(p.numel() for p in model.parameters()), **json.loads((out / "train.json").read_text())}
    done.write_text(json.dumps(row, indent=2))
    return row


def _ms(vals) -> str:
    return f"{statistics.mean(vals):.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "")


def table(rows: list[dict]) -> str:
    lines = ["| arm | prompt mode | seeds | loss A (forgetting) | loss B (new) | semantic A | semantic B |",
             "|---|---|---|---|---|---|---|"]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm]
        for mode in rs[0]["semantic"]:
            lines.append(f"| {arm} | {mode} | {len(rs)} | {_ms([r['loss']['A'] for r in rs])} | "
                         f"{_ms([r['loss']['B'] for r in rs])} | "
                         f"{_ms([r['semantic'][mode]['A']['semantic_score'] for r in rs])} | "
                         f"{_ms([r['semantic'][mode]['B']['semantic_score'] for r in rs])} |")
    lines += ["", "Per attribute (mean over seeds; shape / colour / direction: the trained classifier, background: measured):",
              "", "| arm | prompt mode | " + " | ".join(f"{d} {a}" for d in "AB" for a in ATTRS) + " |",
              "|---|---|" + "---|" * 8]
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm]
        for mode in rs[0]["semantic"]:
            cells = [f"{statistics.mean(r['semantic'][mode][d][a] for r in rs):.2f}" for d in "AB" for a in ATTRS]
            lines.append(f"| {arm} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="run directory (default runs/study[-quick])")
    ap.add_argument("--base-dir", type=Path, default=None, help="base bundle (default: the shipped one; --quick: "
                    "<work>/base-bundle, built first if missing)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the main arms (and of nothing else)")
    ap.add_argument("--other-seeds", default="0", help="seeds of the other arms")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--continual-steps", type=int, default=None, help="override the continual step budget (every arm)")
    ap.add_argument("--prompts", type=int, default=None, help="held-out prompts sampled per domain")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a DemoSize field for every arm (repeatable; as modelgrow demo --set), e.g. "
                         "--set high_noise_share=0.5")
    ap.add_argument("--report-only", action="store_true", help="tabulate finished arms under --work; train nothing")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the JSON + markdown go (<results>/cpu|quick)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = with_overrides(wb.QUICK if args.quick else wb.DemoSize(), args.set)
    over = {"continual_steps": args.continual_steps, "sample_prompts": args.prompts}
    size = replace(size, **{k: v for k, v in over.items() if v is not None})
    work = args.work or Path("runs/study-quick" if args.quick else "runs/study")
    base_dir = args.base_dir or (work / "base-bundle" if args.quick else wb.DEFAULT_BASE)
    unknown = sorted(set(args.arms.split(",")) - set(ARMS))
    if unknown:  # before anything is written under --work
        raise SystemExit(f"unknown arm(s) {unknown}; arms: {', '.join(ARMS)}")
    plan = [(a, s) for a in args.arms.split(",")
            for s in (args.seeds if a in MAIN_ARMS else args.other_seeds).split(",") if s != ""]
    saved = work / "study_size.json"
    if saved.exists() and json.loads(saved.read_text()) != json.loads(json.dumps(asdict(size))):
        raise SystemExit(f"{work} was made with other sizes ({saved}); use the same flags or another --work")
    work.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(asdict(size), indent=2))
    if args.quick and not (base_dir / "base.json").exists():
        Demo(work / "base-build", size, base_dir, build_base=True).run()
    ws = wb.Workspace(work, size, base_dir=base_dir)
    if args.report_only:
        rows = [json.loads(p.read_text()) for p in [work / "study" / "base.json"] +
                [work / "study" / f"{a}-seed{s}" / "result.json" for a, s in plan] if p.exists()]
    else:
        prepare(ws, base_dir)
        evaluator = wb.load_evaluator(ws)
        rows = [run_base(ws, evaluator)]
        for arm, seed in sorted(plan, key=lambda p: (int(p[1]), list(ARMS).index(p[0]))):
            print(f"[study] {arm} seed {seed}", flush=True)
            rows.append(run_arm(ws, evaluator, arm, int(seed)))
    md = table(rows)
    print(md)
    env = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
           "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
           "git_sha": wb.git_sha()}
    out_dir = args.results / ("quick" if args.quick else "cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "study_continual.json").write_text(json.dumps(
        {"env": env, "size": asdict(size), "base": json.loads((base_dir / "base.json").read_text()).get("git_sha"),
         "command": " ".join(sys.argv), "rows": rows}, indent=2, default=str))
    (out_dir / "study_continual.md").write_text(f"# Continual pre-training study\n\n`{' '.join(sys.argv)}`\n\n{md}\n")
    print("wrote", out_dir / "study_continual.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
