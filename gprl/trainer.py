"""The GPRL loop: rollouts → GPM scoring → per-axis advantages → clipped update → drift monitor.

Control (axis weights m, β_KL, ε) decided after step t is applied from step t+1: the step boundary.
Checkpoints are written atomically; a run resumes from its newest one with the same data order,
RNG state, optimizer, drift-monitor state and control.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gprl.algo import DriftMonitor, advantages, axis_variance
from gprl.algo.drift import Control
from gprl.checkpoint import atomic_dir
from gprl.config import RunSpec, atomic_write_text, dump_config, parse_config
from gprl.data import PromptSampler, load_prompts
from gprl.gpm import GeneralPreferenceModel
from gprl.learner import TorchLearner
from gprl.metrics import TrainerMetrics
from gprl.rollout import HFRollout
from gprl.sources import Sources, resolve_sources

# Fields a checkpoint must agree on with the config that resumes it. Others (steps, learning rate,
# drift thresholds, outputs) may change between a run and its resume.
RESUME_FIELDS = (
    "seed",
    "model.policy",
    "model.reference",
    "model.dtype",
    "model.lora",
    "data.prompts",
    "data.split",
    "data.shuffle",
    "gpm.path",
    "gpm.axes",
    "algo.group_size",
    "algo.prompts_per_step",
    "algo.normalization",
    "learner.backend",
)


class CheckpointMismatch(ValueError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class StepTimer:
    timings: dict[str, float] = field(default_factory=dict)

    def __call__(self, phase: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.timings[phase] = timer.timings.get(phase, 0.0) + time.perf_counter() - self.t0

        return _Phase()


class Trainer:
    def __init__(self, spec: RunSpec, log: Callable[[str], None] = print, sources: Sources | None = None):
        self.spec = spec
        self.log = log
        self.out = Path(spec.output.dir)
        self.sources = sources or resolve_sources(spec, log=log)
        seed_everything(spec.seed)
        self._build()

    # ------------------------------------------------------------------ set-up

    def _build(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        spec, src = self.spec, self.sources
        dtype = getattr(torch, spec.model.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(src.policy)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        policy = AutoModelForCausalLM.from_pretrained(src.policy, dtype=dtype)
        reference = None
        if spec.model.lora.enabled:
            from peft import LoraConfig, get_peft_model

            lora = spec.model.lora
            policy = get_peft_model(
                policy,
                LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules),
            )
            if src.reference != src.policy:
                reference = AutoModelForCausalLM.from_pretrained(src.reference, dtype=dtype)
        else:
            reference = AutoModelForCausalLM.from_pretrained(src.reference, dtype=dtype)
        if reference is not None:
            reference.eval().requires_grad_(False)
        self.policy = policy.eval()
        self.reference = reference

        self.gpm = GeneralPreferenceModel.from_pretrained(src.gpm).eval().requires_grad_(False)
        if self.gpm.config.axes != spec.gpm.axes:
            raise ValueError(
                f"gpm.axes is {spec.gpm.axes} but the GPM at {src.gpm} has k = {self.gpm.config.axes}; "
                f"set gpm.axes: {self.gpm.config.axes}"
            )
        gpm_tok_path = src.gpm if Path(src.gpm, "tokenizer_config.json").exists() else src.policy
        self.gpm_tokenizer = AutoTokenizer.from_pretrained(gpm_tok_path)

        prompts = load_prompts(spec.data, self.tokenizer, spec.model.chat_template, src.train_prompts)
        self.sampler = PromptSampler(prompts, spec.seed, spec.data.shuffle)
        self.rollout = HFRollout(self.policy, self.tokenizer, spec.rollout, spec.data.max_prompt_tokens)
        self.learner = TorchLearner(self.policy, self.reference, spec)
        k = spec.gpm.axes
        self.monitor = DriftMonitor(spec.drift, k, spec.algo.kl_coef, spec.algo.eps_low, spec.algo.eps_high)
        self.control: Control = self.monitor.control
        self.step = 0
        self.policy_version = 0
        self.metrics = TrainerMetrics(run=os.environ.get("GPRL_RUN_NAME", self.out.name))
        if spec.output.metrics_port:
            self.metrics.serve(spec.output.metrics_port)

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict:
        spec, algo = self.spec, self.spec.algo
        timer = StepTimer()
        t0 = time.perf_counter()
        control = self.control  # fixed for the whole step
        with timer("generate"):
            prompts = self.sampler.next(algo.prompts_per_step)
            batch = self.rollout.generate(prompts, algo.group_size)
        with timer("score"):
            out = self.gpm.score(self.gpm_tokenizer, batch.prompts, batch.responses, batch_size=spec.gpm.batch_size)
        with timer("advantages"):
            k, G = spec.gpm.axes, algo.group_size
            v = out.embeddings.view(-1, G, out.embeddings.shape[-1])
            lam = out.eigenvalues.view(-1, G, k)[:, 0]
            adv, scores = advantages(v, lam, torch.tensor(control.weights), algo.normalization, algo.std_eps)
            axis_var = axis_variance(scores)
        with timer("update"):
            stats = self.learner.update(batch, adv.detach().reshape(-1), control)
            self.policy_version += 1
            self.rollout.sync_weights(self.policy, self.policy_version)
        with timer("monitor"):
            if spec.drift.mode == "in_process":
                self.control = self.monitor.update(axis_var.tolist())
            state = self.monitor.state
        self.step += 1
        lengths = batch.response_mask.sum(dim=1).float()
        elapsed = time.perf_counter() - t0
        rec = {
            "step": self.step,
            "policy_version": self.policy_version,
            "loss": stats.loss,
            "policy_loss": stats.policy_loss,
            "kl": stats.kl,
            "clip_fraction": stats.clip_fraction,
            "entropy": stats.entropy,
            "grad_norm": stats.grad_norm,
            "learning_rate": stats.learning_rate,
            "response_length": float(lengths.mean()),
            "tokens": batch.num_tokens,
            "tokens_per_second": batch.num_tokens / elapsed,
            "advantage_abs_mean": float(adv.abs().mean()),
            "axis_variance": axis_var.tolist(),
            "eigenvalues": lam.mean(dim=0).tolist(),
            "spectrum": state.spectrum,
            "spectrum_baseline": state.baseline,
            "divergence": state.divergence,
            "tau": spec.drift.tau,
            "triggered": int(state.triggered),
            "trigger_events": sum(e["type"] == "trigger" for e in state.events) if spec.drift.mode == "in_process" else 0,
            "interventions": state.interventions,
            "applied_control": control.to_dict(),
            "weights": self.control.weights,
            "kl_coef": self.control.kl_coef,
            "eps_low": self.control.eps_low,
            "eps_high": self.control.eps_high,
            "step_seconds": elapsed,
        }
        if self.sources.oracle is not None:
            with timer("oracle"):
                rec.update(self.sources.oracle_stats(batch.prompts, batch.responses))
        rec["timings"] = dict(timer.timings)
        return rec

    # ------------------------------------------------------------------ evaluation

    def _eval_prompts(self) -> list[str]:
        pool = self.sources.heldout_prompts or self.sampler.prompts
        return list(pool[: self.spec.output.eval_prompts])

    def evaluate(self) -> dict:
        """Win rate of the current policy against the reference on held-out prompts (same seeds each time)."""
        from gprl.evaluate import gpm_win_rate, oracle_win_rate, sample

        spec = self.spec
        prompts = self._eval_prompts()
        args = (spec.output.eval_samples, spec.rollout.max_new_tokens, spec.rollout.temperature, spec.seed + 1)
        if getattr(self, "_reference_samples", None) is None:
            ref_model = self.reference
            if ref_model is None:
                with self.policy.disable_adapter():
                    self._reference_samples = sample(self.policy, self.tokenizer, prompts, *args)[1]
            else:
                self._reference_samples = sample(ref_model, self.tokenizer, prompts, *args)[1]
        rep, mine = sample(self.policy, self.tokenizer, prompts, *args[:3], spec.seed + 2)
        ref = self._reference_samples
        rec = {"step": self.step, "gpm_win_rate": gpm_win_rate(self.gpm, self.gpm_tokenizer, rep, mine, ref)}
        if self.sources.oracle is not None:
            rec["oracle_win_rate"] = oracle_win_rate(self.sources.oracle, rep, mine, ref)
            rec.update({f"policy_{k}": v for k, v in self.sources.oracle_stats(rep, mine).items()})
            rec.update({f"reference_{k}": v for k, v in self.sources.oracle_stats(rep, ref).items()})
        return rec

    # ------------------------------------------------------------------ the run

    def train(self) -> list[dict]:
        spec = self.spec
        self.out.mkdir(parents=True, exist_ok=True)
        if spec.checkpoint.resume:
            self.resume()
        dump_config(spec, self.out / "config.yaml")
        log_path = self.out / "steps.jsonl"
        self._truncate_log(log_path)
        self._truncate_log(self.out / "evals.jsonl")
        if self.step == 0 and spec.output.eval_every:
            self._append(self.out / "evals.jsonl", self.evaluate())
        bar = None
        if spec.output.progress:
            from tqdm import tqdm

            bar = tqdm(total=spec.algo.steps, initial=self.step, desc="gprl", unit="step", dynamic_ncols=True)
        records = []
        with open(log_path, "a") as fh:
            while self.step < spec.algo.steps:
                rec = self.train_step()
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                self.metrics.record(rec)
                records.append(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        kl=f"{rec['kl']:.3f}", D=f"{rec['divergence']:.3f}", len=f"{rec['response_length']:.1f}",
                        tok_s=f"{rec['tokens_per_second']:.0f}", refresh=False,
                    )
                every = spec.output.eval_every
                if (every and self.step % every == 0) or self.step == spec.algo.steps:
                    self._append(self.out / "evals.jsonl", self.evaluate())
                if self.step % spec.checkpoint.every_steps == 0 or self.step == spec.algo.steps:
                    self.save_checkpoint()
        if bar is not None:
            bar.close()
        if spec.output.report:
            from gprl.report import write_report

            write_report(self.out)
        return records

    @staticmethod
    def _append(path: Path, rec: dict) -> None:
        with open(path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def _truncate_log(self, path: Path) -> None:
        """Drop log lines of steps after the checkpoint we resumed from (they will be re-run)."""
        if not path.exists():
            return
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= self.step]
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        path = self.checkpoint_root / f"step-{self.step:08d}"
        with atomic_dir(path) as tmp:
            self.policy.save_pretrained(tmp / "policy")
            torch.save(
                {
                    "step": self.step,
                    "policy_version": self.policy_version,
                    "learner": self.learner.state_dict(),
                    "monitor": self.monitor.state_dict(),
                    "control": self.control.to_dict(),
                    "sampler": self.sampler.state_dict(),
                    "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
                },
                tmp / "trainer_state.pt",
            )
            dump_config(self.spec, tmp / "config.yaml")
        for old in sorted(self.checkpoint_root.glob("step-*"))[: -self.spec.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def latest_checkpoint(self) -> Path | None:
        done = sorted(p for p in self.checkpoint_root.glob("step-*") if (p / "trainer_state.pt").exists())
        return done[-1] if done else None

    def resume(self) -> bool:
        path = self.latest_checkpoint()
        if path is None:
            return False
        import yaml

        saved = parse_config(yaml.safe_load((path / "config.yaml").read_text()), str(path / "config.yaml"))
        diff = self.spec.changed_fields(saved, RESUME_FIELDS)
        if diff:
            raise CheckpointMismatch(
                f"checkpoint {path} was written by an incompatible config; these fields differ (checkpoint -> now):\n  "
                + "\n  ".join(diff)
                + f"\nUse the original values, or a new output.dir to start a fresh run."
            )
        self._load_policy_weights(path / "policy")
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        self.step, self.policy_version = state["step"], state["policy_version"]
        self.learner.load_state_dict(state["learner"])
        self.monitor.load_state_dict(state["monitor"])
        self.control = Control(**state["control"])
        self.sampler.load_state_dict(state["sampler"])
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        self.rollout.sync_weights(self.policy, self.policy_version)
        self.log(f"resumed from {path} at step {self.step}")
        return True

    def _load_policy_weights(self, folder: Path) -> None:
        from safetensors.torch import load_file

        files = sorted(folder.glob("*.safetensors"))
        state: dict = {}
        for f in files:
            state.update(load_file(str(f)))
        if self.spec.model.lora.enabled:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.policy, state)
        else:
            missing, unexpected = self.policy.load_state_dict(state, strict=False)
            missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied embeddings are saved once
            if missing or unexpected:
                raise CheckpointMismatch(f"{folder}: policy weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
