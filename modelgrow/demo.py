"""``modelgrow demo``: the paper's method end to end on a 2-core CPU machine with nothing downloaded, starting,
as a ModelGrow user does, from a released pre-trained base model (the base bundle shipped in
``modelgrow/assets/demo_base``; ``modelgrow demo --pretrain-base`` rebuilds it).

Stages of ``modelgrow demo`` (each writes ``<out>/<stage>/DONE`` and is skipped when re-run):
 1. data       synthetic clips of moving shapes: domain A (what the base knows) and B (new shapes, colours,
               motions, backgrounds), train and held-out splits, VP9 .webm + manifests with short and long captions
 2. encoders   a tiny Llama (random weights, the real Llama tokenizer shipped in mistral-common) for the LLM condition
 3. base       the base bundle, checked against this run's sizes (its VAE, T5 and evaluator are used throughout)
 4. cache      VAE latents + T5 + LLM states of B's training clips and of both held-out splits
 5. grow       insert expansion k = 1 + the LLM condition; function preservation checked on the spot
 6. continual  continual pre-training of the grown model on B with SL prompts (short + long)
 7. evaluate   held-out denoising loss on A and B before/after; the semantic evaluator's per-attribute scores (shape,
               colour, direction, background) and ``modelgrow evaluate``'s classical dimensions of sampled videos
 8. report     report.md, matplotlib plots (loss vs step of both stages, held-out loss before/after), a contact sheet
               per model (prompt + frames + what the evaluator read), mp4s

``modelgrow demo --pretrain-base`` (stages data, encoders, vae, cache, pretrain, evaluate, release) trains the tiny
VAE on both domains' frames, builds the tiny T5, pre-trains the base STDiT on A with short prompts, scores it on
held-out A prompts and writes the bundle (``--base-dir``) with its training log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from . import workbench as wb
from .workbench import DEFAULT_BASE, QUICK, DemoSize

STAGES = ("data", "encoders", "base", "cache", "grow", "continual", "evaluate", "report")
BASE_STAGES = ("data", "encoders", "vae", "cache", "pretrain", "evaluate", "release")
ATTRS = ("shape", "color", "direction", "background")

__all__ = ["Demo", "STAGES", "BASE_STAGES", "DemoSize", "QUICK", "main", "read_curves", "loss_plot", "heldout_plot",
           "contact_sheet"]


class Demo:
    """Runs the stages of the demo (``build_base=False``, continual pre-training from the bundle at ``base_dir``)
    or of the base bundle (``build_base=True``, written to ``base_dir`` by the release stage)."""

    def __init__(self, out: Path, size: DemoSize, base_dir: Path = DEFAULT_BASE, build_base: bool = False, log=print):
        self.build_base, self.base_dir = build_base, Path(base_dir)
        self.ws = wb.Workspace(out, size, base_dir=None if build_base else self.base_dir)
        self.size, self.log = size, log
        self.timings: dict[str, float] = {}

    @property
    def stages(self) -> tuple[str, ...]:
        return BASE_STAGES if self.build_base else STAGES

    def path(self, *parts: str) -> Path:
        return self.ws.path(*parts)

    def run(self, stages=None) -> Path:
        stages = tuple(stages or self.stages)
        unknown = [s for s in stages if s not in self.stages]
        if unknown:
            raise SystemExit(f"unknown stage(s) {unknown}; the stages are {', '.join(self.stages)}")
        t_all = time.perf_counter()
        for name in stages:
            marker = self.path(name, "DONE")
            if marker.exists():
                self.log(f"[{name}] done already, reusing {marker.parent}")
                self.timings[name] = json.loads(marker.read_text()).get("seconds", 0.0)
                continue
            self.log(f"[{name}] ...")
            t0 = time.perf_counter()
            self.path(name).mkdir(parents=True, exist_ok=True)
            info = getattr(self, f"stage_{name}")() or {}
            self.timings[name] = time.perf_counter() - t0
            marker.write_text(json.dumps({"seconds": self.timings[name], **info}, indent=2))
            self.log(f"[{name}] {self.timings[name]:.1f} s")
        self.log(f"[demo] {time.perf_counter() - t_all:.1f} s in all")
        return self.base_dir / "base.json" if self.build_base else self.path("report.md")

    def _progress(self, desc: str):
        from tqdm.auto import tqdm

        return lambda it: tqdm(it, desc=f"[{desc}]", leave=False, disable=not sys.stderr.isatty())

    def info(self, stage: str) -> dict:
        return json.loads(self.path(stage, "DONE").read_text())

    def stage_seconds(self) -> dict[str, float]:
        """Seconds of each finished stage, read from its DONE marker (so a report re-run alone still lists them)."""
        return {name: json.loads(m.read_text()).get("seconds", 0.0) for name in self.stages
                if (m := self.path(name, "DONE")).exists()}

    def _log_indented(self, line: str) -> None:
        self.log(f"  {line}")

    # -- stages ---------------------------------------------------------------------------------------
    def stage_data(self):
        if self.build_base:  # the VAE and the T5 tokenizer see both domains' training clips
            wb.make_data(self.ws)
        else:
            wb.make_data(self.ws, domains=("B",))
            wb.make_data(self.ws, domains=("A",), splits=("heldout",))

    def stage_encoders(self):
        return {"t5": wb.build_t5(self.ws)} if self.build_base else {"llm": wb.build_llm(self.ws)}

    def stage_vae(self):
        return wb.train_vae(self.ws, progress=self._progress("vae"))

    def stage_base(self):
        info = wb.check_base(self.base_dir, self.size)
        return {"base_dir": str(self.base_dir), "base": info}

    def stage_cache(self):
        if self.build_base:
            wb.build_caches(self.ws, [("A", "train", "S"), ("A", "heldout", "S")], llm=False)
        else:
            wb.build_caches(self.ws, [("B", "train", "SL"), *[(d, "heldout", m) for d in "AB" for m in ("S", "SL")]])

    def stage_pretrain(self):
        s = self.size
        cfg = wb.train_config(self.ws, self.path("pretrain", "run"), s.pretrain_steps, s.lr, self.ws.cache("A", "train", "S"),
                              val_cache=self.ws.cache("A", "heldout", "S"))
        return wb.train_and_export(cfg, self.path("pretrain", "model"), log=self._log_indented)

    def stage_grow(self):
        from .grow import add_llm_condition, expand
        from .models import count_parameters, from_pretrained, save_pretrained

        base = from_pretrained(self.ws.base_model_dir)
        grown = add_llm_condition(expand(base, "insert", 1), 32, self.size.llm_tokens)
        batch = wb.heldout_batch(self.ws.cache("A", "heldout", "SL"))
        t = torch.linspace(0, 999, batch["latent"].shape[0]).round()
        with torch.no_grad():
            before = base(batch["latent"], t, batch["y"], batch["mask"])
            after = grown(batch["latent"], t, batch["y"], batch["mask"], y_llm=batch["y_llm"], llm_mask=batch["llm_mask"])
        save_pretrained(grown, self.path("grow", "model"))
        return {"depth": [len(base.blocks), len(grown.blocks)], "params": [count_parameters(base), count_parameters(grown)],
                "max_abs_diff": (after - before).abs().max().item()}

    def stage_continual(self):
        s = self.size
        cfg = wb.train_config(self.ws, self.path("continual", "run"), s.continual_steps, s.continual_lr,
                              self.ws.cache("B", "train", "SL"),
                              ["--train.mode", "expand", "--grow.llm", "true", "--train.batch_size", str(s.continual_batch),
                               "--checkpoint.load_weights", str(self.path("grow", "model"))],
                              val_cache=self.ws.cache("B", "heldout", "SL"), val_every=s.continual_val_every)
        return wb.train_and_export(cfg, self.path("continual", "model"), log=self._log_indented)

    def _models(self) -> list[tuple[str, Path, bool, str]]:
        """(name, model dir, has the LLM condition, prompt mode) of the models this run evaluates."""
        if self.build_base:
            return [("base", self.path("pretrain", "model"), False, "S")]
        return [("base", self.ws.base_model_dir, False, "S"), ("continual", self.path("continual", "model"), True, "SL")]

    def stage_evaluate(self):
        from .evaluate.run import evaluate_videos, write_report
        from .models import from_pretrained
        from .video_io import write_video

        domains = ("A",) if self.build_base else ("A", "B")
        evaluator = wb.load_evaluator(self.ws)
        losses, reversal, semantic, samples, classical = {}, {}, {}, [], {}
        for name, model_dir, llm, mode in self._models():
            model = from_pretrained(model_dir)
            losses[name] = {d: wb.heldout_loss(model, self.ws.cache(d, "heldout", mode), llm) for d in domains}
            reversal[name] = {d: wb.time_reversal_gain(model, self.ws.cache(d, "heldout", mode), llm, losses[name][d])
                              for d in domains}
            pipe = wb.make_pipeline(self.ws, model_dir, llm)
            semantic[name], items = {}, []
            for d in domains:
                res, prompts, videos = wb.sample_and_score(self.ws, pipe, evaluator, d, mode)
                semantic[name][d] = {k: v for k, v in res.items() if k != "predictions"}
                for i, (p, v, pred) in enumerate(zip(prompts, videos, res["predictions"], strict=True)):
                    rel = f"videos/{name}_{d}_{i}.mp4"
                    write_video(self.path("evaluate", rel), v, fps=8)
                    samples.append({"model": name, "domain": d, "prompt": p["short"], "video": rel,
                                    "truth": {a: p[a] for a in ATTRS}, "read": pred})
                    items.append({"video": str(self.path("evaluate", rel)), "prompt": p["short"]})
            result = evaluate_videos(items, progress=False)  # modelgrow evaluate: the dimensions with no weights
            write_report(result, self.path("evaluate", f"evaluation_{name}"))
            classical[name] = result["summary"]
        return {"heldout_loss": losses, "time_reversal_gain": reversal, "semantic": semantic, "samples": samples,
                "classical": classical, "evaluator": str(self.ws.evaluator_path)}

    def stage_release(self):
        """Copy the VAE, T5, EMA model and evaluator into the bundle; write base.json, train_log.jsonl, samples.png."""
        dst = self.base_dir
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copytree(self.ws.vae_dir, tmp / "vae")
        shutil.copytree(self.ws.t5_dir, tmp / "t5")
        shutil.copytree(self.path("pretrain", "model"), tmp / "model")
        for suffix in (".safetensors", ".json"):
            shutil.copy2(self.ws.evaluator_path.with_suffix(suffix), tmp / f"evaluator{suffix}")
        shutil.copy2(self.path("pretrain", "run", "metrics.jsonl"), tmp / "train_log.jsonl")
        ev, pre, vae = self.info("evaluate"), self.info("pretrain"), self.info("vae")
        sheet = contact_sheet(self.path("evaluate"), ev["samples"], "base", title="base model, held-out A prompts")
        _save(sheet, tmp / "samples.png")
        info = {
            "what": "STDiT pre-trained on domain A of the synthetic world with short prompts (EMA weights), the tiny "
                    "AutoencoderTiny and T5 it was trained with, and the semantic evaluator",
            "command": "modelgrow demo --pretrain-base" + (" --quick" if self.size == QUICK else ""),
            "size": json.loads(json.dumps(asdict(self.size))), "git_sha": wb.git_sha(), "torch": torch.__version__,
            "params": pre["params"],
            "timings_s": {k: round(v, 1) for k, v in self.timings.items()},
            "pretrain_seconds": pre["train_seconds"], "vae": {k: vae[k] for k in ("psnr_heldout_db", "steps", "final_loss")},
            "vae_losses": vae["losses"], "heldout_loss_A": ev["heldout_loss"]["base"]["A"],
            "semantic_A": ev["semantic"]["base"]["A"], "classical_A": ev["classical"]["base"],
        }
        (tmp / "base.json").write_text(json.dumps(info, indent=2))
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
        total = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
        self.log(f"  base bundle: {dst} ({total / 2**20:.1f} MiB)")
        return {"base_dir": str(dst), "bytes": total}

    # -- report ---------------------------------------------------------------------------------------
    def stage_report(self):
        ev, base = self.info("evaluate"), self.info("base")["base"]
        curves = {"base pre-training on A (shipped: train_log.jsonl)": read_curves(self.base_dir / "train_log.jsonl"),
                  "continual pre-training on B (this run)": read_curves(self.path("continual", "run", "metrics.jsonl"))}
        _save(loss_plot(curves), self.path("loss_curves.png"))
        _save(heldout_plot(ev["heldout_loss"]), self.path("heldout_loss.png"))
        for name in ("base", "continual"):
            _save(contact_sheet(self.path("evaluate"), ev["samples"], name,
                                title=f"{name}: mean score " + ", ".join(
                                    f"{d} {ev['semantic'][name][d]['semantic_score']:.2f}" for d in "AB")
                                + f" (first 8 of {self.size.sample_prompts} prompts per domain)"),
                  self.path(f"contact_sheet_{name}.png"))
        self.path("report.md").write_text(self.report(base))

    def report(self, base: dict) -> str:
        grow, ev, cont = self.info("grow"), self.info("evaluate"), self.info("continual")
        L, sem = ev["heldout_loss"], ev["semantic"]
        f4 = lambda v: f"{v:.4f}"  # noqa: E731
        gains = ev.get("time_reversal_gain", {})  # absent in an evaluation made before it existed

        def rev(m):
            return " | ".join(f"{gains[m][d]:+.3f}" if d in gains.get(m, {}) else "–" for d in "AB")

        row = lambda m, d: " | ".join(f"{sem[m][d][a]:.2f}" for a in (*ATTRS, "semantic_score"))  # noqa: E731
        cls = ev["classical"]
        dims = sorted({k for m in cls.values() for k in m if isinstance(m.get(k), (int, float))})
        lines = [
            "# ModelGrow demo report", "",
            f"Sizes: `{json.dumps(asdict(self.size))}`", "",
            "## What ran",
            f"Base bundle `{self.base_dir}` (made by `{base['command']}`: {base['size']['pretrain_steps']} steps of pre-training on A, "
            f"VAE held-out PSNR {base['vae']['psnr_heldout_db']:.1f} dB) -> insert expansion k = 1 + LLM condition ->",
            f"continual pre-training on B with SL prompts ({self.size.continual_steps} steps of batch "
            f"{self.size.continual_batch}, {cont['train_seconds']:.0f} s) ->",
            f"sampling held-out prompts with {self.size.sampler}-{self.size.sample_steps} and two-condition guidance.", "",
            "## Growth",
            f"depth {grow['depth'][0]} -> {grow['depth'][1]}, parameters {grow['params'][0]:,} -> {grow['params'][1]:,};",
            f"function preservation on held-out A inputs: max |grown - base| = {grow['max_abs_diff']:.2e}", "",
            "## Held-out denoising loss (lower is better; `heldout_loss.png`)", "",
            "| model | A (forgetting) | B (new knowledge) | time-reversal gain A | B |", "|---|---|---|---|---|",
            f"| base (pre-trained on A) | {f4(L['base']['A'])} | {f4(L['base']['B'])} | {rev('base')} |",
            f"| grown + LLM, after continual pre-training on B | {f4(L['continual']['A'])} | {f4(L['continual']['B'])} | "
            f"{rev('continual')} |", "",
            "Time-reversal gain: the held-out loss on the same clips played backwards, relative to forwards, minus 1",
            "(`workbench.time_reversal_gain`). A reversed clip contradicts its caption's direction, so a model that reads",
            "the prompted direction scores > 0; 0 means the direction words are ignored (a model that memorised one",
            "clip: 22).", "",
            f"## What the semantic evaluator reads in sampled videos ({self.size.sample_prompts} held-out prompts per domain)", "",
            "Accuracy per attribute against the prompt (shape / colour / direction: the trained classifier; background:",
            "measured), and their mean. Contact sheets (the first 8 prompts of each domain): `contact_sheet_base.png`,",
            "`contact_sheet_continual.png`; every sample is in `evaluate/videos/`.", "",
            "| model | domain | shape | colour | direction | background | mean |", "|---|---|---|---|---|---|---|",
            *[f"| {m} | {d} | {row(m, d)} |" for m in ("base", "continual") for d in "AB"], "",
            "## `modelgrow evaluate` (dimensions with no learned weights)", "",
            "| model | " + " | ".join(dims) + " |", "|---|" + "---|" * len(dims),
            *[f"| {m} | " + " | ".join(f"{cls[m][k]:.4f}" if isinstance(cls[m].get(k), (int, float)) else "–" for k in dims)
              + " |" for m in cls], "",
            "Per-video tables: `evaluate/evaluation_base/`, `evaluate/evaluation_continual/`. Curves: `loss_curves.png`.", "",
            "## Timings (s)", "", "| stage | seconds |", "|---|---|",
            *[f"| {k} | {v:.1f} |" for k, v in self.stage_seconds().items()], "",
            "## Reading these numbers",
            "Tiny models, random-weight text encoders and a few minutes of CPU: this shows every stage of the method working",
            "end to end on a world small enough to check by eye. The paper's comparisons (vanilla vs LoRA vs expansion,",
            "with and without the LLM) are in `experiments/study_continual.py` and its report.",
        ]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------
# plots (matplotlib)
# ------------------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Write a figure as PNG and free it (pyplot keeps every open figure alive)."""
    fig.savefig(path, dpi=100)
    _plt().close(fig)


def read_curves(metrics_jsonl: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of a run's metrics.jsonl: the logged training loss and the validation loss (EMA)."""
    recs = [json.loads(x) for x in Path(metrics_jsonl).read_text().splitlines() if x.strip()]
    return {"training loss (the logged step's batch)": [(r["step"], r["loss"]) for r in recs
                                                          if r.get("kind") is None and "loss" in r],
            "held-out loss, EMA weights (validation)": [(r["step"], r["loss_ema"]) for r in recs
                                                        if r.get("kind") == "val" and "loss_ema" in r]}


def loss_plot(curves: dict[str, dict[str, list]]):
    """Loss vs step, one panel per stage, one line per series."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8), squeeze=False)
    for ax, (name, panel) in zip(axes[0], curves.items(), strict=False):
        for (label, series), style in zip(panel.items(), ({"color": "tab:blue"}, {"color": "tab:red", "marker": "o"}),
                                          strict=False):
            if series:
                x, y = zip(*series, strict=False)
                ax.plot(x, y, label=label, **style)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("IDDPM loss (MSE + VB)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def heldout_plot(losses: dict[str, dict[str, float]]):
    """Held-out denoising loss on A and B, before (base) and after (continual)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    models = list(losses)
    domains = sorted({d for v in losses.values() for d in v})
    w = 0.8 / len(models)
    for k, (m, colour) in enumerate(zip(models, ("tab:blue", "tab:red"), strict=False)):
        xs = np.arange(len(domains)) + (k - (len(models) - 1) / 2) * w
        vals = [losses[m].get(d, np.nan) for d in domains]
        bars = ax.bar(xs, vals, w, color=colour, label={"base": "base (pre-trained on A)",
                                                        "continual": "grown + LLM, continual on B"}.get(m, m))
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(np.arange(len(domains)), [f"held-out {d}" for d in domains])
    ax.set_ylabel("denoising loss (lower is better)")
    ax.set_title("held-out loss before / after continual pre-training", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def contact_sheet(eval_dir: Path, samples: list[dict], model: str, title: str = "", per_domain: int | None = 8):
    """One row per sampled prompt of ``model`` (the first ``per_domain`` of each domain; None: all): the prompt, the
    frames, and per attribute what the evaluator read (green: matches the prompt, red: does not)."""
    from .video_io import read_video

    plt = _plt()
    rows, shown = [], {}
    for s in samples:
        if s["model"] == model and (per_domain is None or shown.get(s["domain"], 0) < per_domain):
            rows.append(s)
            shown[s["domain"]] = shown.get(s["domain"], 0) + 1
    T = len(read_video(eval_dir / rows[0]["video"])[0]) if rows else 1
    fig, axes = plt.subplots(max(len(rows), 1), T + 1, figsize=(1.3 * T + 4.2, 1.25 * max(len(rows), 1) + 0.4),
                             squeeze=False, gridspec_kw={"width_ratios": [3.2] + [1] * T})
    for r, s in enumerate(rows):
        frames = read_video(eval_dir / s["video"])[0]
        ax = axes[r, 0]
        ax.axis("off")
        ax.text(0, 0.95, f"[{s['domain']}] {s['prompt']}", fontsize=7, wrap=True, va="top", transform=ax.transAxes)
        ax.text(0, 0.56, "evaluator read:", fontsize=6, transform=ax.transAxes)
        for k, a in enumerate(ATTRS):  # one line each: "direction: down-right WRONG" does not fit half a column
            ok = s["read"].get(a) == s["truth"].get(a)
            ax.text(0.04, 0.42 - 0.13 * k, f"{a}: {s['read'].get(a)} {'ok' if ok else 'WRONG'}",
                    fontsize=6, transform=ax.transAxes, color="tab:green" if ok else "tab:red")
        for t in range(T):
            axes[r, t + 1].imshow(frames[t] if t < len(frames) else np.zeros_like(frames[0]), interpolation="nearest")
            axes[r, t + 1].axis("off")
            if r == 0:
                axes[r, t + 1].set_title(f"frame {t}", fontsize=7)
    fig.suptitle(title or model, fontsize=9)
    fig.tight_layout()
    return fig


def with_overrides(size: DemoSize, assignments: list[str]) -> DemoSize:
    """``size`` with ``KEY=VALUE`` assignments applied (values parsed by the field's type; tuples comma-separated)."""
    from dataclasses import fields, replace

    types = {f.name: type(getattr(size, f.name)) for f in fields(size)}
    changes = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in types:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        kind = types[key]
        try:
            if kind is tuple:
                changes[key] = tuple(int(v) for v in value.split(",") if v.strip())
            elif kind is bool:
                changes[key] = {"true": True, "1": True, "false": False, "0": False}[value.strip().lower()]
            else:
                changes[key] = kind(value)
        except (ValueError, KeyError):
            raise SystemExit(f"--set {item!r}: {value!r} is not a valid {kind.__name__} for {key} "
                             f"(now {getattr(size, key)!r})") from None
    return replace(size, **changes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="modelgrow demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="run directory (default runs/demo, runs/demo-base)")
    ap.add_argument("--pretrain-base", action="store_true",
                    help="build the base bundle (VAE, T5, STDiT pre-trained on A, evaluator) into --base-dir")
    ap.add_argument("--base-dir", type=Path, default=None,
                    help=f"the base bundle to start from / to write (default: the shipped one, {DEFAULT_BASE}; "
                         "with --quick: <out>/base-bundle, built first if missing)")
    ap.add_argument("--quick", action="store_true", help="minimal sizes (seconds; what the test suite runs)")
    ap.add_argument("--fresh", action="store_true", help="delete the output directory first")
    ap.add_argument("--stages", default=None, help="comma-separated subset, in order")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                    help="torch CPU threads (default: 2, or 1 on a 1-core machine; on a quiet 2-core machine 2 threads "
                         "make a training step 1.55x faster; on a busy one use 1: small convolutions were measured "
                         "5-20x slower with 2)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a DemoSize field (repeatable), e.g. --set pretrain_steps=12000 --set "
                         "vae_channels=32,32,32; a demo run must use its bundle's data, VAE, DiT and text sizes")
    args = ap.parse_args(argv)
    size = with_overrides(QUICK if args.quick else DemoSize(), args.set)
    out = args.out or Path("runs/demo-base" if args.pretrain_base else "runs/demo") / ("quick" if args.quick else "")
    if args.fresh and out.exists():
        shutil.rmtree(out)
    torch.set_num_threads(max(1, args.threads))
    base_dir = args.base_dir or (out / "base-bundle" if args.quick else DEFAULT_BASE)
    stages = [s for s in args.stages.split(",") if s] if args.stages else None
    if args.pretrain_base:
        Demo(out, size, base_dir, build_base=True).run(stages)
        print(f"\nbase bundle: {base_dir}")
        return 0
    if args.quick and not (base_dir / "base.json").exists():
        print(f"[demo] --quick: building a quick base bundle first ({base_dir})")
        Demo(out / "base-build", size, base_dir, build_base=True).run()
    report = Demo(out, size, base_dir).run(stages)
    print(f"\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
