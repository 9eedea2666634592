"""``strength``: how much stronger than random noise the FGSM perturbation is, without a reference.

On the first ``n`` probe examples, every ``every`` epochs, with the current model in eval mode:

* ``acc`` and ``loss_increase`` (mean CE(x+δ) − CE(x)) for δ = FGSM and δ = random signs ±ε
  (``attack`` = ``fgsm`` / ``noise-sign``);
* ``strength_ratio`` = loss_increase(fgsm) / loss_increase(noise-sign) (the denominator floored
  at 1e-3 nats, so a noise that changes nothing gives a large finite ratio): far above 1 while FGSM finds adversarial directions, about 1 or below once FGSM is no
  stronger than noise — the collapse in one number;
* ``cos_fgsm_pgd`` and ``sign_agreement_fgsm_pgd``: per-example cosine and fraction of equal signs
  between the FGSM δ and a PGD-``pgd_steps`` δ, averaged;
* ``grad_alignment``: mean cos(∇ₓL(x), ∇ₓL(x+η)), η ~ U(−ε, ε) (GradAlign's measure);
* ``delta_abs_mean``, ``delta_frac_at_eps``, ``delta_autocorr`` of the FGSM δ.

And, every ``train_every`` optimizer steps, the same three δ statistics of the training
perturbation on the batch's first ``train_n`` examples (``split=train``,
``attack=train-perturbation``), logged as means at the epoch's end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from robustdrop.attacks import PGD, AttackSpec, project, sign_noise, uniform_noise
from robustdrop.diagnostics.base import Diagnostic, Options, option
from robustdrop.diagnostics.measures import (
    Mean,
    delta_stats,
    loss_and_grad,
    losses,
    per_example_cos,
    sign_agreement,
    take,
)

if TYPE_CHECKING:
    from robustdrop.data import Batch
    from robustdrop.engine import RunContext
    from robustdrop.methods import StepOutput

RATIO_FLOOR = 1e-3  # nats: below this, random signs are taken to change the loss by nothing


@dataclass(frozen=True)
class StrengthOptions(Options):
    every: int = option(1, "epochs between measurements", minimum=1)
    n: int = option(500, "probe examples used (0 = all)")
    pgd_steps: int = option(5, "steps of the PGD compared with FGSM (step 2.5ε/steps)", minimum=1)
    train_every: int = option(10, "optimizer steps between training-perturbation samples (0 = off)")
    train_n: int = option(32, "examples of each sampled training batch (0 = all)")


class StrengthDiagnostic(Diagnostic):
    """See the module docstring; options: :class:`StrengthOptions`."""

    name = "strength"
    Options = StrengthOptions

    def __init__(self, **options: Any):
        o = StrengthOptions(**options)
        super().__init__(o, every_n_steps=o.train_every, every_n_epochs=o.every)
        self._train = Mean()
        self._train_time = 0.0

    def on_run_start(self, run: RunContext) -> None:
        # (the training-perturbation means are not reset here: a run resumed mid-epoch restores them)
        # Sample at least once per epoch even when an epoch has fewer steps than train_every.
        if self.options.train_every > 0 and run.steps_per_epoch:
            self.every_n_steps = min(self.options.train_every, run.steps_per_epoch)

    # -- training perturbations -----------------------------------------------------------------
    def on_train_step(self, run: RunContext, batch: Batch, out: StepOutput) -> None:
        start = time.perf_counter()
        n = self.options.train_n
        delta = out.delta[:n] if n > 0 else out.delta
        self._train.add(**delta_stats(delta, _epsilon(run)))
        self._train_time += time.perf_counter() - start

    # -- probe measurements ---------------------------------------------------------------------
    def on_epoch_end(self, run: RunContext, epoch: int) -> None:
        if self._train:
            start = time.perf_counter()
            spec = AttackSpec("train-perturbation", *_spec_tail(run.method.perturbation_spec()))
            n = self._train.count
            for k, v in self._train.means().items():
                self.log(run, k, v, split="train", spec=spec, n=n)
            # time_s on split=train: the sampling in on_train_step plus this summary
            self.log(run, "time_s", self._train_time + time.perf_counter() - start, split="train")
            self._train, self._train_time = Mean(), 0.0
        with self.timer(run):
            self._measure(run)

    def _measure(self, run: RunContext) -> None:
        model, eps, autocast = run.model, run.config.epsilon, run.autocast
        steps = self.options.pgd_steps
        pgd = PGD(eps, steps=steps, step_size=2.5 * eps / steps)
        gen = run.generator(self.name)
        fgsm_spec = AttackSpec("fgsm", eps, 1, eps, 0)
        noise_spec = AttackSpec("noise-sign", eps, 0, eps, 0)
        acc = {"fgsm": Mean(), "noise-sign": Mean()}
        rest = Mean()
        for x, y in take(run.probe_batches(), self.options.n):
            loss0, grad0, _ = loss_and_grad(model, x, y, autocast)
            d_fgsm = project(x, eps * grad0.sign(), eps)
            d_noise = project(x, sign_noise(x, eps, gen), eps)
            for name, d in (("fgsm", d_fgsm), ("noise-sign", d_noise)):
                loss, logits = losses(model, x + d, y, autocast)
                acc[name].add(acc=(logits.argmax(1) == y).float(), loss_increase=loss - loss0)
            with autocast():
                d_pgd = pgd(model, x, y, gen)
            eta = project(x, uniform_noise(x, eps, gen), eps)
            _, grad_eta, _ = loss_and_grad(model, x + eta, y, autocast)
            rest.add(cos_fgsm_pgd=per_example_cos(d_fgsm, d_pgd),
                     sign_agreement_fgsm_pgd=sign_agreement(d_fgsm, d_pgd),
                     grad_alignment=per_example_cos(grad0, grad_eta),
                     **delta_stats(d_fgsm, eps))
        if not rest:
            return
        n = rest.count
        fgsm, noise = acc["fgsm"].means(), acc["noise-sign"].means()
        values = rest.means()
        ratio = fgsm["loss_increase"] / max(noise["loss_increase"], RATIO_FLOOR)
        for spec, m in ((fgsm_spec, fgsm), (noise_spec, noise)):
            self.log(run, "acc", m["acc"], spec=spec, n=n)
            self.log(run, "loss_increase", m["loss_increase"], spec=spec, n=n)
        self.log(run, "strength_ratio", ratio, spec=fgsm_spec, n=n)
        self.log(run, "cos_fgsm_pgd", values["cos_fgsm_pgd"], spec=pgd.spec(), n=n)
        self.log(run, "sign_agreement_fgsm_pgd", values["sign_agreement_fgsm_pgd"], spec=pgd.spec(), n=n)
        self.log(run, "grad_alignment", values["grad_alignment"], spec=AttackSpec("noise-uniform", eps, 0, eps, 0), n=n)
        for k in ("delta_abs_mean", "delta_frac_at_eps", "delta_autocorr"):
            self.log(run, k, values[k], spec=fgsm_spec, n=n)
        self.publish(run, strength_ratio=ratio, grad_alignment=values["grad_alignment"],
                     cos_fgsm_pgd=values["cos_fgsm_pgd"], fgsm_delta_autocorr=values["delta_autocorr"])


    # -- state: the epoch's training-perturbation means so far (a mid-epoch checkpoint) ----------
    def state_dict(self) -> dict[str, Any]:
        return {"train_sums": {k: v.detach().cpu() for k, v in self._train.sums.items()},
                "train_count": self._train.count, "train_time": self._train_time}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._train = Mean()
        self._train.sums = dict(state.get("train_sums", {}))  # 0-d CPU tensors add to device values exactly
        self._train.count = int(state.get("train_count", 0))
        self._train_time = float(state.get("train_time", 0.0))


def _epsilon(run: RunContext) -> float:
    eps = run.method.perturbation_spec().epsilon
    return float(eps) if eps == eps and eps > 0 else float(run.config.epsilon)


def _spec_tail(spec: AttackSpec) -> tuple:
    return (spec.epsilon, spec.steps, spec.step_size, spec.restarts)
