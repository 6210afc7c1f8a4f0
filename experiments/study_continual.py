"""The paper's continual pre-training comparisons at small scale, on the demo's synthetic world.

    python bench/study_continual.py --quick                 # minutes on a CPU: checks the harness, not the claims
    python bench/study_continual.py --seeds 0 --pretrain-steps 1500 --continual-steps 250 --lr 1e-3 --prompts 6
                                                             # the committed run (CPU: ~35 min a seed)
Finished arms are kept under --work (result.json each) and reused; --report-only tabulates them.

Every arm starts from the same model pre-trained on domain A (the demo's stages 1-5, reused from --work) and
gets the same continual step x batch budget on domain B. Arms: Base (no continual training), Vanilla, LoRA,
Expansion insert / prefix / suffix (k = 1), insert k = 1 training only the new blocks (LLaMA Pro style),
insert with k = 0.5 and 2, Expansion + LLM, Vanilla + LLM, and its
ablations without the chat template and without the T5 -> LLM weight duplication; the Expansion + LLM arm is
also sampled with prompt modes S, L and SL. Metrics: held-out denoising loss on A (forgetting) and B (new
knowledge), and the semantic score of sampled held-out prompts. Output: a markdown table (mean +- std over
seeds) and JSON under bench/results/<device>/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, replace
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import env_info, pick_device, slug  # noqa: E402

from modelgrow.demo import QUICK, Demo, DemoSize  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# name: (train.mode, grow overrides, prompt mode, LLM template)
ARMS: dict[str, tuple[str, list[str], str, bool]] = {
    "vanilla": ("vanilla", [], "S", True),
    "lora": ("lora", [], "S", True),
    "expand-insert-k1": ("expand", ["--grow.strategy", "insert", "--grow.ratio", "1"], "S", True),
    "expand-prefix-k1": ("expand", ["--grow.strategy", "prefix", "--grow.ratio", "1"], "S", True),
    "expand-suffix-k1": ("expand", ["--grow.strategy", "suffix", "--grow.ratio", "1"], "S", True),
    "expand-insert-k1-new-only": ("expand", ["--grow.strategy", "insert", "--grow.ratio", "1", "--grow.train_new_only", "true"], "S", True),
    "expand-insert-k0.5": ("expand", ["--grow.strategy", "insert", "--grow.ratio", "0.5"], "S", True),
    "expand-insert-k2": ("expand", ["--grow.strategy", "insert", "--grow.ratio", "2"], "S", True),
    "expand+llm": ("expand", ["--grow.strategy", "insert", "--grow.ratio", "1", "--grow.llm", "true"], "SL", True),
    "vanilla+llm": ("vanilla", ["--grow.llm", "true"], "SL", True),
    "vanilla+llm-no-template": ("vanilla", ["--grow.llm", "true", "--data.llm_use_template", "false"], "SL", False),
    "vanilla+llm-no-dup": ("vanilla", ["--grow.llm", "true", "--grow.copy_t5_to_llm", "false"], "SL", True),
}


class Study(Demo):
    def llm_cache(self, domain: str, split: str, mode: str, template: bool) -> Path:
        if template:
            return self.cache(domain, split, mode)
        path = self.path("cache", f"{domain}_{split}_{mode}_notemplate")
        if not (path / "index.json").exists():
            from modelgrow.data.cache import build_cache
            from modelgrow.text import LLMEncoder, T5Encoder
            from modelgrow.vae import VideoVAE

            s = self.size
            build_cache(self.manifest(domain, split), path,
                        vae=VideoVAE.from_pretrained(self.path("vae", "model"), micro_batch_size=32),
                        t5=T5Encoder(str(self.path("encoders", "t5")), max_length=s.t5_tokens, device="cpu"),
                        llm=LLMEncoder(str(self.path("encoders", "llm")), max_length=s.llm_tokens, use_template=False, device="cpu"),
                        num_frames=s.frames, frame_interval=1, image_size=(s.size, s.size), prompt_mode=mode,
                        batch_size=16, shard_size=256, device="cpu")
        return path

    def run_base(self) -> dict:
        """The pre-trained model itself (no continual training); deterministic, so one 'seed'."""
        from modelgrow.models import from_pretrained

        done = self.path("study", "base.json")
        if done.exists():
            return json.loads(done.read_text())
        base = from_pretrained(self.path("pretrain", "model"))
        row = {"arm": "base", "seed": 0, "loss": {d: self.heldout_loss(base, d, "S", llm=False) for d in ("A", "B")},
               "semantic": {"S": self.semantic(self.path("pretrain", "model"), False, "S", True)},
               "params": sum(p.numel() for p in base.parameters()), "trainable": 0}
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(row, indent=2))
        return row

    def run_arm(self, name: str, seed: int) -> dict:
        from modelgrow.models import from_pretrained

        mode, grow, prompt_mode, template = ARMS[name]
        out = self.path("study", f"{name}-seed{seed}")
        done = out / "result.json"
        if done.exists():
            return json.loads(done.read_text())
        llm = "--grow.llm" in grow
        extra = ["--train.mode", mode, "--train.seed", str(seed), "--checkpoint.load_weights",
                 str(self.path("pretrain", "model")), "--data.prompt_mode", prompt_mode, *grow]
        if not (out / "model" / "config.json").exists():
            cache = self.llm_cache("B", "train", prompt_mode, template) if llm else self.cache("B", "train", "S")
            cfg = self._config(out / "run", self.size.continual_steps, cache, extra)
            self._train_into(out, cfg)
        model = from_pretrained(out / "model")
        loss = {d: self.heldout_loss(model, d, prompt_mode, llm, cache=self.llm_cache(d, "heldout", prompt_mode, template)
                                     if llm else self.cache(d, "heldout", "S")) for d in ("A", "B")}
        modes = ["S", "L", "SL"] if name == "expand+llm" else [prompt_mode]
        semantic = {m: self.semantic(out / "model", llm, m, template) for m in modes}
        row = {"arm": name, "seed": seed, "loss": loss, "semantic": semantic,
               "params": sum(p.numel() for p in model.parameters()),
               **json.loads((out / "train.json").read_text())}
        done.write_text(json.dumps(row, indent=2))
        return row

    def _train_into(self, out: Path, cfg) -> None:
        from modelgrow.train import Trainer
        from modelgrow.train.checkpoint import latest_checkpoint
        from modelgrow.train.export import export_checkpoint

        trainer = Trainer(cfg, log=lambda *_: None)
        t0 = time.perf_counter()
        history = trainer.fit()
        info = {"train_seconds": round(time.perf_counter() - t0, 1), "trainable": sum(p.numel() for p in trainer.params),
                "final_train_loss": history[-1]["loss"] if history else None}
        export_checkpoint(latest_checkpoint(Path(cfg.train.output_dir) / "checkpoints"), out / "model", "ema")
        (out / "train.json").write_text(json.dumps(info))

    def semantic(self, model_dir: Path, llm: bool, mode: str, template: bool) -> dict:
        from modelgrow.data.synthetic import heldout_prompts
        from modelgrow.evaluate.semantic import train_classifier

        s = self.size
        clf = train_classifier(("A", "B"), n_train=s.classifier_train, steps=s.classifier_steps, seed=0,
                               cache=self.path("evaluate", "classifier.safetensors"))
        pipe = self._pipeline(model_dir, llm)
        if llm and not template:
            pipe.llm_encoder.use_template = False
        out = {}
        for d in ("A", "B"):
            prompts = heldout_prompts(d, s.sample_prompts, seed=2)
            res = pipe([p["short"] for p in prompts], long_prompt=[p["long"] for p in prompts], prompt_mode=mode,
                       num_frames=s.frames, height=s.size, width=s.size, generator=torch.Generator().manual_seed(0),
                       progress=False)
            sc = clf.score(res.videos, prompts)
            out[d] = {k: sc[k] for k in ("semantic_score", "shape", "color", "direction")}
        return out


def table(rows: list[dict]) -> str:
    def ms(vals):
        return f"{statistics.mean(vals):.4f}" + (f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else "")

    lines = ["| arm | prompt mode | loss A (forgetting) | loss B (new) | semantic A | semantic B | seeds |",
             "|---|---|---|---|---|---|---|"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        rs = [r for r in rows if r["arm"] == arm]
        for mode in rs[0]["semantic"]:
            lines.append(f"| {arm} | {mode} | {ms([r['loss']['A'] for r in rs])} | {ms([r['loss']['B'] for r in rs])} | "
                         f"{ms([r['semantic'][mode]['A']['semantic_score'] for r in rs])} | "
                         f"{ms([r['semantic'][mode]['B']['semantic_score'] for r in rs])} | {len(rs)} |")
    lines += ["", "Semantic score by attribute (accuracy of the classifier's shape / colour / direction against the prompt):", "",
              "| arm | prompt mode | A shape | A colour | A direction | B shape | B colour | B direction |",
              "|---|---|---|---|---|---|---|---|"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        rs = [r for r in rows if r["arm"] == arm]
        for mode in rs[0]["semantic"]:
            cells = [f"{statistics.mean(r['semantic'][mode][d][a] for r in rs):.3f}"
                     for d in ("A", "B") for a in ("shape", "color", "direction")]
            lines.append(f"| {arm} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="demo directory to reuse/create (default runs/study[-quick])")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--pretrain-steps", type=int, default=None, help="override the demo size's pre-training steps")
    ap.add_argument("--continual-steps", type=int, default=None, help="override the continual step budget (every arm)")
    ap.add_argument("--lr", type=float, default=None, help="override the learning rate (pre-training and every arm)")
    ap.add_argument("--prompts", type=int, default=None, help="held-out prompts sampled per domain for the semantic score")
    ap.add_argument("--report-only", action="store_true", help="tabulate the arms already finished under --work; train nothing")
    args = ap.parse_args(argv)
    size = QUICK if args.quick else DemoSize()
    over = {"pretrain_steps": args.pretrain_steps, "continual_steps": args.continual_steps, "lr": args.lr,
            "sample_prompts": args.prompts}
    size = replace(size, **{k: v for k, v in over.items() if v is not None})
    work = args.work or Path("runs/study-quick" if args.quick else "runs/study")
    saved = work / "study_size.json"
    if saved.exists() and json.loads(saved.read_text()) != json.loads(json.dumps(asdict(size))):
        raise SystemExit(f"{work} was made with other sizes ({saved}); use the same flags or another --work")
    work.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(asdict(size), indent=2))
    study = Study(work, size, log=print)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    if args.report_only:
        rows = [json.loads(p.read_text()) for p in [work / "study" / "base.json"] +
                [work / "study" / f"{a}-seed{s}" / "result.json" for s in seeds for a in arms] if p.exists()]
    else:
        study.run(["data", "encoders", "vae", "cache", "pretrain"])
        rows = [study.run_base()]
        for seed in seeds:
            for arm in arms:
                print(f"[study] {arm} seed {seed}", flush=True)
                rows.append(study.run_arm(arm, seed))
    md = table(rows)
    print(md)
    device = pick_device()
    env = env_info(device)
    out_dir = RESULTS / slug(env["device"])
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "study_continual_quick" if args.quick else "study_continual"
    (out_dir / f"{name}.json").write_text(json.dumps({"bench": name, "env": env, "size": asdict(size), "seeds": seeds,
                                                      "command": " ".join(sys.argv), "rows": rows}, indent=2, default=str))
    (out_dir / f"{name}.md").write_text(f"# {name}\n\n{md}\n")
    print("wrote", out_dir / f"{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
