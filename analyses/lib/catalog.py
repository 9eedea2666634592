"""ONE catalog of runs: every run the analyses use, by name, as overrides over the scale's preset.

Every script trains (or reuses) runs from :func:`catalog`, so ``run_all.py`` trains each run once
and every figure and table reads the same run directories (``runs/analyses/<scale>/<name>``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.setting import QUICK_EVAL_BATCH, SMOKE_CONFIG, SMOKE_DATA, Setting
from robustdrop.data import ImageData, load_dataset, make_synthetic
from robustdrop.engine import PRESETS, TrackConfig, make_config


def base_values(setting: Setting) -> dict[str, Any]:
    """Overrides every run of the setting gets on top of its preset."""
    # No referee unless the run is one of Figure 2's (config_for), whatever the preset ships.
    values: dict[str, Any] = {"threads": setting.threads, "device": setting.device, "seed": setting.seed,
                              "reference": None}
    if setting.scale == "quick":
        # Evaluation only: on a CPU, cnn1's attacks run 2-3x faster per example in batches of 128 than
        # in the default 500 (measured); training is unchanged.
        values["eval_batch_size"] = QUICK_EVAL_BATCH
    if setting.smoke:
        values.update(SMOKE_CONFIG[setting.scale])
    elif setting.scale == "paper":
        values.update(dataset=setting.dataset or "cifar10", data_dir=setting.data_dir)
    elif setting.dataset:
        values.update(dataset=setting.dataset, data_dir=setting.data_dir)
    return values


def make_run_config(setting: Setting, **overrides: Any) -> TrackConfig:
    """``make_config(<scale>, **base_values, **overrides)`` — the preset is always read, never copied."""
    return make_config(setting.scale, **{**base_values(setting), **overrides})


def preset_config(setting: Setting) -> TrackConfig:
    return make_run_config(setting)


@dataclass(frozen=True)
class RunSpec:
    """One run of the catalog: overrides over the setting's preset config."""

    name: str
    overrides: dict[str, Any]
    uses_reference: bool = False  # strength-ref against Figure 2's referee (reference_for)
    what: str = ""  # one line for captions and READMEs


def ref_name(setting: Setting) -> str:
    return f"pgd{setting.knobs['ref_steps']}"


def reference_for(setting: Setting) -> str:
    """Figure 2's referee: at quick scale the one the quick preset ships (``builtin:quick``, what
    ``robustdrop track --preset quick`` uses; docs/referee.md); otherwise the catalog's PGD run
    (paper scale: PGD-10, as the paper; --smoke: the tiny PGD run, so the path is exercised)."""
    if setting.scale == "quick" and not setting.smoke:
        return "builtin:quick"
    return str(setting.runs_dir / ref_name(setting))


def reference_deferred(setting: Setting) -> bool:
    """The one referee rule of Figure 2's runs. A shipped referee (quick scale: ``builtin:quick``)
    is attached during training. A referee that is a catalog run (paper scale: PGD-10; --smoke) is
    not waited for: Figure 2's runs train without it, keep every epoch's weights, and are measured
    on it once both are finished (:mod:`lib.deferred`; the rows an attached referee logs).
    ``Setting.deferred_reference`` True/False forces one way (tests that compare the two)."""
    shipped = reference_for(setting).startswith("builtin:")
    if setting.deferred_reference is None:
        return not shipped
    return bool(setting.deferred_reference) and not shipped


def reference_run(setting: Setting) -> str | None:
    """The catalog run Figure 2's measurement needs (trained alongside them, :func:`reference_deferred`),
    or None when their referee is shipped."""
    return None if reference_for(setting).startswith("builtin:") else ref_name(setting)


def catalog(setting: Setting) -> dict[str, RunSpec]:
    """Every run the analyses use, by name."""
    k = setting.knobs
    preset = preset_config(setting)
    eps = preset.epsilon
    steps = int(k["ref_steps"])
    ref = dict(method="pgd", pgd_steps=steps, alpha=2.5 * eps / steps)
    if int(k["ref_eval_every"]) != 1:
        ref["eval_every"] = int(k["ref_eval_every"])
    if setting.ref_epochs:
        ref["epochs"] = int(setting.ref_epochs)
    specs = [
        RunSpec(ref_name(setting), ref, what=f"PGD-{steps} (step 2.5ε/{steps}; also the reference model)"),
        # Figure 2's runs measure their strength on the referee (reference_for; during training or
        # after it, reference_deferred). The table-only runs do not: a diagnostic never changes the
        # training, and without it they need not wait for a reference.
        RunSpec("fgsm", dict(method="fgsm"), True, "FGSM adversarial training"),
        RunSpec("rs-fgsm", dict(method="rs-fgsm"), False, "RS-FGSM (Wong et al. 2020; step 1.25ε)"),
        RunSpec("fgsm+", dict(method="fgsm+"), True, "FGSM+ (our reading, a hypothesis: APART without layer-wise perturbations)"),
        RunSpec("apart", dict(method="apart"), True, "APART"),
        RunSpec("apart-no-init", dict(method="apart", learned_init=False), False, "APART without learned init"),
        RunSpec("apart-no-step", dict(method="apart", learned_step=False), False, "APART without learned step"),
        # The field's single-step baselines (docs/baselines.md), with robustdrop's defaults.
        RunSpec("n-fgsm", dict(method="n-fgsm"), False,
                f"N-FGSM (de Jorge et al. 2022; noise {preset.nfgsm_noise:g}ε, step ε, no projection)"),
        RunSpec("gradalign", dict(method="gradalign"), False,
                f"GradAlign (Andriushchenko & Flammarion 2020; FGSM + alignment term, λ={preset.gradalign_lambda:g})"),
    ]
    ls = int(k["long_steps"])
    long_common = dict(schedule="cyclic-repeat", cycle_epochs=int(k["long_cycle"]), epochs=int(k["long_epochs"]),
                       train_subset=int(k["long_subset"]), eval_every=int(k["long_eval_every"]))
    if k["long_test_every"] is not None:  # paper: the full test set every 2 epochs, as the paper's curve
        long_common["test_every"] = int(k["long_test_every"])
    specs += [
        RunSpec(f"long-pgd{ls}", dict(method="pgd", pgd_steps=ls, alpha=2.5 * eps / ls, **long_common),
                what=f"PGD-{ls}, repeating cyclic schedule"),
        RunSpec("long-apart", dict(method="apart", **long_common), what="APART, repeating cyclic schedule"),
    ]
    # The GPU plan's bf16-vs-fp32 training pair (FGSM, a few epochs; amp is the only difference)
    # and APART with every value of the authors' released code (preset apart-authors).
    prec = dict(method="fgsm", epochs=int(k["prec_epochs"]), train_subset=int(k["prec_subset"]),
                diagnostics=["none"])
    specs += [
        RunSpec("prec-bf16", dict(prec, amp=True), what="FGSM, bf16 autocast (the precision comparison)"),
        RunSpec("prec-fp32", dict(prec, amp=False), what="FGSM, fp32 (the precision comparison)"),
        RunSpec("apart-authors", authors_overrides(setting), what="APART, the authors' released recipe"),
    ]
    # Timing runs (table_cost): same subset and epochs, no diagnostics, a cheap final evaluation.
    cost_common = dict(train_subset=int(k["cost_subset"]), epochs=int(k["cost_epochs"]), diagnostics=["none"],
                       eval_every=int(k["cost_epochs"]), probe_size=min(100, preset.probe_size),
                       eval_pgd_steps=1)
    for name, (method, extra) in zip(cost_run_names(), COST_METHODS):
        specs.append(RunSpec(name, dict(method=method, **_cost_extra(extra, eps), **cost_common),
                             what=f"timing run ({name[5:]})"))
    return {s.name: s for s in specs}


def authors_overrides(setting: Setting) -> dict[str, Any]:
    """The ``apart-authors`` preset's values as overrides over the scale's preset (the setting's
    dataset kept; the full test set only at the end instead of every 2 epochs, which changes no
    training; with --smoke, the smoke sizes and epochs kept)."""
    keep = {"dataset", "data_dir", "test_every"} | (set(SMOKE_CONFIG[setting.scale]) if setting.smoke else set())
    values = {k: v for k, v in PRESETS["apart-authors"].items() if k not in keep}
    if not setting.smoke:
        values["test_every"] = 0
    return values


# (method, extra overrides) of the timing runs; PGD-10 is the cost unit.
COST_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("fgsm", {}), ("rs-fgsm", {}), ("pgd", {"pgd_steps": 10}), ("fgsm+", {}), ("apart", {}), ("n-fgsm", {}),
    ("gradalign", {}),
]


def _cost_extra(extra: dict[str, Any], eps: float) -> dict[str, Any]:
    out = dict(extra)
    if "pgd_steps" in out:
        out["alpha"] = 2.5 * eps / out["pgd_steps"]
    return out


def cost_run_names() -> list[str]:
    return [f"cost-{m}" + (f"{x['pgd_steps']}" if "pgd_steps" in x else "") for m, x in COST_METHODS]


def long_run_names(setting: Setting) -> list[str]:
    return [f"long-pgd{setting.knobs['long_steps']}", "long-apart"]


def config_for(setting: Setting, spec: RunSpec) -> TrackConfig:
    """The run's config: its overrides, Figure 2's referee (attached, or every epoch's weights kept
    for the deferred measurement), and the best validation PGD epoch's model kept for the tables
    (probe PGD when the run has no validation split)."""
    overrides = dict(spec.overrides)
    if spec.uses_reference and not reference_deferred(setting):
        overrides.setdefault("reference", reference_for(setting))
    elif spec.uses_reference:
        overrides.setdefault("save_weights_every", 1)
    cfg = make_run_config(setting, **overrides)
    return dataclasses.replace(cfg, keep_best=f"{'val' if cfg.val_size else 'probe'}/acc/pgd")


def run_dir(setting: Setting, name: str) -> Path:
    return setting.runs_dir / name


def data_for(setting: Setting) -> ImageData | None:
    """The in-memory data of --smoke (``None``: the run loads its config's dataset)."""
    return make_synthetic(**SMOKE_DATA) if setting.smoke else None


def load_data(setting: Setting, cfg: dict[str, Any]) -> ImageData:
    return make_synthetic(**SMOKE_DATA) if setting.smoke else load_dataset(cfg["dataset"], data_dir=cfg.get("data_dir"))
