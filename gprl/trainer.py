"""The GPRL loop: rollouts → GPM scoring → per-axis advantages → clipped update → drift monitor.

Control (axis weights m, β_KL, ε) decided after step t is applied from step t+1: the step boundary.
Checkpoints are written atomically with a manifest; a run resumes from its newest valid one with the same data
order, RNG state, optimizer, drift-monitor state and control. SIGTERM or SIGINT stops the run at the next step
boundary with a checkpoint of that step. Non-finite GPM outputs and losses are counted and kept away from the
weights, the drift monitor and the checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gprl import distributed as gdist
from gprl.algo import DriftMonitor, advantages, axis_variance
from gprl.algo.drift import Control
from gprl.checkpoint import (
    InvalidCheckpoint, OutputFolderError, OutputLock, atomic_dir, checkpoint_folders, load_state, publish,
    remove_stale_temps, save_state, verify_manifest,
)
from gprl.api.marks import resume_fields
from gprl.config import RunSpec, atomic_write_text, dump_config, parse_config
from gprl.data import PromptSampler, context_length, load_prompts
from gprl.gpm import GeneralPreferenceModel
from gprl.gpm.model import CONFIG_FILE as GPM_CONFIG_FILE
from gprl.learner import make_learner
from gprl.metrics import TrainerMetrics
from gprl.overlap import SideThread
from gprl.rollout import make_rollout
from gprl.sources import Sources, resolve_sources

# Fields a checkpoint must agree on with the config that resumes it: the immutable ones, from the change marks on
# RunSpec's fields (gprl.api.marks), the same marks the CRD's transition rules come from.
RESUME_FIELDS = resume_fields(RunSpec)


class CheckpointMismatch(ValueError):
    pass


# Files of a run folder that belong to one run: `checkpoint.resume: false` refuses a folder holding them unless
# output.overwrite, which deletes them.
RUN_FILES = ("steps.jsonl", "evals.jsonl", "samples.jsonl", "config.yaml", "report", "checkpoints", "tracking.json",
             "tensorboard")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def finite_only(rec: dict) -> dict:
    """The record without its non-finite numbers (a list with one is dropped whole)."""
    def ok(v) -> bool:
        if isinstance(v, float):
            return math.isfinite(v)
        if isinstance(v, list):
            return all(ok(x) for x in v)
        return True

    return {k: v for k, v in rec.items() if ok(v)}


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
        for name, folder in (("model.policy", src.policy), ("model.reference", src.reference)):
            if Path(folder, GPM_CONFIG_FILE).exists():
                raise ValueError(f"{name} {folder} is a GPM folder (it has {GPM_CONFIG_FILE}); point {name} at a "
                                 "causal language model, and gpm.path at the GPM")
        self.tokenizer = AutoTokenizer.from_pretrained(src.policy)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        policy = AutoModelForCausalLM.from_pretrained(src.policy, dtype=dtype)
        if spec.learner.gradient_checkpointing:
            # non-reentrant: gradients reach LoRA adapters without the inputs needing requires_grad
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        reference = None
        if spec.model.lora.enabled:
            from peft import LoraConfig, get_peft_model

            lora = spec.model.lora
            policy = get_peft_model(
                policy,
                LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules),
            )
            # The adapters name their base as the config does (a hub id, a provider source or the path as written),
            # not the absolute folder it resolved to here: `gprl export` and other machines resolve it again.
            policy.peft_config["default"].base_model_name_or_path = spec.model.policy
            if src.reference != src.policy:
                reference = AutoModelForCausalLM.from_pretrained(src.reference, dtype=dtype)
        else:
            reference = AutoModelForCausalLM.from_pretrained(src.reference, dtype=dtype)
        if reference is not None:
            reference.eval().requires_grad_(False)
        # One accelerator per process when there is one (rank r of a node uses cuda:LOCAL_RANK), else the CPU.
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
            policy.to(self.device)
            if reference is not None:
                reference.to(self.device)
        self.policy = policy.eval()
        self.reference = reference

        if spec.gpm.server_url:
            # Disaggregated scoring: a `gprl serve-gpm` server holds the GPM (and its tokenizer).
            from gprl.serving.gpm_client import GPMClient

            self.gpm = GPMClient(spec.gpm.server_url)
            self.gpm_tokenizer = None
            gpm_where = spec.gpm.server_url
        else:
            self.gpm = GeneralPreferenceModel.from_pretrained(src.gpm).eval().requires_grad_(False).to(self.device)
            gpm_tok_path = src.gpm if Path(src.gpm, "tokenizer_config.json").exists() else src.policy
            self.gpm_tokenizer = AutoTokenizer.from_pretrained(gpm_tok_path)
            gpm_where = src.gpm
        self._gpm_thread = SideThread("gprl-gpm")  # a step's scoring runs beside its reference pass
        if self.gpm.config.axes != spec.gpm.axes:
            raise ValueError(
                f"gpm.axes is {spec.gpm.axes} but the GPM at {gpm_where} has k = {self.gpm.config.axes}; "
                f"set gpm.axes: {self.gpm.config.axes}"
            )

        prompts = load_prompts(spec.data, self.tokenizer, spec.model.chat_template, src.train_prompts, log=self.log,
                               max_new_tokens=spec.rollout.max_new_tokens, context=context_length(self.policy.config))
        self.sampler = PromptSampler(prompts, spec.seed, spec.data.shuffle)
        # The learner first: a DeepSpeed learner starts the process group (multi-rank runs under torchrun or an
        # indexed Job). Each rank takes a contiguous share of every step's prompts (whole groups).
        self.learner = make_learner(self.policy, self.reference, spec)
        self.rank, self.world = gdist.rank(), gdist.world_size()
        if self.world > 1 and spec.learner.backend != "deepspeed":
            raise ValueError(f"{self.world} ranks need learner.backend: deepspeed (the torch learner is single-process)")
        if spec.algo.prompts_per_step % self.world:
            raise ValueError(
                f"algo.prompts_per_step ({spec.algo.prompts_per_step}) must be a multiple of the number of learner "
                f"ranks ({self.world})"
            )
        self.rollout = make_rollout(spec, self.policy, self.tokenizer, learner=self.learner)
        k = spec.gpm.axes
        self.monitor = DriftMonitor(spec.drift, k, spec.algo.kl_coef, spec.algo.eps_low, spec.algo.eps_high)
        self.control: Control = self.monitor.control
        # drift.mode operator: statistics go to the GPRLRun status and control comes back from the operator.
        self.channel = None
        if spec.drift.mode == "operator":
            from gprl.control import open_channel

            self.channel = open_channel(spec, self.control)
        self.step = 0
        self.policy_version = 0
        self.samples: list[dict] = []  # this step's rows for samples.jsonl (sample steps only)
        self.stop_signal: str | None = None  # name of the signal that asked the run to stop
        self._grace_warned = False
        # The drift probe rides on the step: see probe_prompts_for().
        d = spec.drift
        self._probing = d.mode != "off" and d.probe_every > 0 and d.lead_tau > 0 and k > 1
        self._probe_width = 0
        if self._probing:
            from gprl.algo import probe_width

            pool = len(self._probe_pool())
            self._probe_width = probe_width(pool, d.probe_every, d.reference_lag, spec.algo.prompts_per_step // self.world)
        self._probe_seen: dict[int, torch.Tensor] = {}  # probe slot -> its last embeddings (p, G, 2k)
        self._probe_wins: dict[int, tuple[list[float], int]] = {}  # probe slot -> (win rates (k,), pairs) of its last visit
        self.metrics = TrainerMetrics(run=os.environ.get("GPRL_RUN_NAME", self.out.name))
        if spec.output.metrics_port and self.rank == 0:
            self.metrics.serve(spec.output.metrics_port)
        # Sampling starts from the seed whatever the set-up consumed (a local GPM's init, DeepSpeed's, or none when
        # the GPM is remote): the same spec samples the same rollouts with any backend.
        seed_everything(spec.seed)

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict:
        spec, algo = self.spec, self.spec.algo
        timer = StepTimer()
        t0 = time.perf_counter()
        if self.channel is not None:
            # Step boundary: a control decided outside (the operator) takes effect here.
            new = self.channel.poll() if self.rank == 0 else None
            new = gdist.broadcast_object(new)  # every rank applies the same control at the same step
            if new is not None:
                self.control = new
        control = self.control  # fixed for the whole step
        with timer("generate"):
            prompts = self.sampler.next(algo.prompts_per_step)  # same draw on every rank; each takes its share
            slot, probe_prompts = self.probe_prompts_for(self.step + 1)
            prompts = probe_prompts + prompts[len(probe_prompts) :]  # in front: rank 0's share
            if self.world > 1:
                per = len(prompts) // self.world
                prompts = prompts[self.rank * per : (self.rank + 1) * per]
            batch = self.rollout.generate(prompts, algo.group_size)
            if self.sources.text is not None:  # a source provider's policy writes in its own text convention
                batch.responses = [self.sources.text(r) for r in batch.responses]
            if batch.sequences.device != self.device:
                batch = batch.to(self.device)
        out, ref_logp = self._score_beside_reference(batch, timer)
        with timer("advantages"):
            k, G = spec.gpm.axes, algo.group_size
            v = out.embeddings.view(-1, G, out.embeddings.shape[-1])
            lam = out.eigenvalues.view(-1, G, k)[:, 0]
            # A group with any non-finite GPM output (a response's embedding, or its prompt's eigenvalues) is left
            # out: zero advantage (only the KL term acts on it) and no part in the drift statistics.
            bad_rows = ~torch.isfinite(v).all(dim=-1) | ~torch.isfinite(lam).all(dim=-1, keepdim=True)  # (B, G)
            bad = bad_rows.any(dim=1)  # (B,)
            if bad.any():
                v = torch.where(bad[:, None, None], torch.zeros_like(v), v)
                lam = torch.where(bad[:, None], torch.zeros_like(lam), lam)
            weights = torch.tensor(control.weights, dtype=v.dtype, device=v.device)
            adv, scores = advantages(v, lam, weights, algo.normalization, algo.std_eps, algo.axis_spread_floor)
            adv = torch.where(bad[:, None], torch.zeros_like(adv), adv)
            good = ~bad
            axis_var = (axis_variance(scores[good]) if good.any()  # no good group: NaN, and the monitor skips
                        else torch.full((k,), float("nan"), dtype=scores.dtype, device=scores.device)).cpu()
            lam_good = lam[good].cpu()  # (lam itself stays aligned with v: the probe reads both by prompt)
            self._keep_samples(batch, scores, adv, bad_rows)
            lengths = batch.response_mask.sum(dim=1).float().cpu()
            # Statistics of the whole step (all ranks; equal shares, so the mean of rank means is the global
            # mean): every rank feeds the same axis variances to its monitor and gets the same control.
            summary = gdist.all_reduce_mean(
                torch.cat([axis_var.float(), lam_good.float().mean(dim=0), torch.stack([
                    lengths.mean(), adv.abs().mean().float().cpu(), torch.tensor(float(batch.num_tokens)),
                    bad_rows.sum().float().cpu()])])
            )
            axis_var, lam_mean = summary[:k].float(), summary[k : 2 * k].float()
            length_mean, adv_abs_mean, tokens, nonfinite = (float(x) for x in summary[2 * k :])
            tokens = int(round(tokens * self.world))
            nonfinite = int(round(nonfinite * self.world))
            if nonfinite:
                self.log(f"warning: step {self.step + 1}: the GPM returned non-finite outputs for {nonfinite} "
                         "responses; their groups get zero advantage and are left out of the drift statistics")
        with timer("update"):
            stats = self.learner.update(batch, adv.detach().reshape(-1).to(batch.sequences.device), control,
                                        ref_logp)
            if stats.skipped:
                self.log(f"warning: step {self.step + 1}: non-finite loss or gradient (loss {stats.loss}, grad norm "
                         f"{stats.grad_norm}); the update was skipped, the weights are unchanged")
            else:
                self.policy_version += 1
                self.rollout.sync_weights(self.policy, self.policy_version)
        win_rate = None
        if slot is not None:
            with timer("probe"):
                if self.rank == 0:
                    win_rate = self.probe(slot, v[: len(probe_prompts)], lam[: len(probe_prompts)])
                win_rate = gdist.broadcast_object(win_rate)  # every rank's monitor decides the same control
        with timer("monitor"):
            if spec.drift.mode == "in_process":
                # the monitor counts and skips a non-finite statistic (it never enters the spectrum or the lead)
                self.control = self.monitor.update(axis_var.tolist(), win_rate)
                if any(e["type"] == "reject" for e in self.monitor.state.events):
                    self.log(f"warning: step {self.step + 1}: non-finite drift statistics; the drift monitor skips them")
            state = self.monitor.state
        self.step += 1
        elapsed = time.perf_counter() - t0
        rec = {
            "step": self.step,
            "policy_version": self.policy_version,
            "world_size": self.world,
            "loss": stats.loss,
            "policy_loss": stats.policy_loss,
            "kl": stats.kl,
            "clip_fraction": stats.clip_fraction,
            "entropy": stats.entropy,
            "grad_norm": stats.grad_norm,
            "learning_rate": stats.learning_rate,
            "response_length": length_mean,
            "tokens": tokens,
            "tokens_per_second": tokens / elapsed,
            "advantage_abs_mean": adv_abs_mean,
            "gpm_nonfinite": nonfinite,
            "update_skipped": int(stats.skipped),
            "axis_variance": axis_var.tolist(),
            "eigenvalues": lam_mean.tolist(),
            "spectrum": state.spectrum,
            "spectrum_baseline": state.baseline,
            "divergence": state.divergence,
            "axis_win_rate": win_rate,  # measured on probe steps, else None
            "win_rate_lead": state.lead if spec.drift.mode == "in_process" else None,
            "win_rate_lead_threshold": spec.drift.lead_tau,
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
                rec.update(self.sources.oracle.batch_stats(batch.prompts, batch.responses))
        rec["timings"] = dict(timer.timings)
        return rec

    def _score_beside_reference(self, batch, timer: StepTimer):
        """The GPM's outputs for the rollouts and the reference's log-probs of them (None without a KL term), the
        two passes at the same time: each needs only the batch. The GPM scores on a worker thread while this one
        runs the reference pass: with a GPM server the learner would otherwise wait idle through the call. An
        in-process GPM on a CPU shares the cores with the reference pass, half the threads each (the pair 1.06-1.18x
        as fast at 7M parameters and 1.14x at 32M on two cores, benchmarks/step_cuts.py); with one thread, one after
        the other. The
        numbers are those of the passes run apart: the same kernels (a reduction over fewer threads may round the
        last bit differently)."""
        score = functools.partial(self.gpm.score, self.gpm_tokenizer, batch.prompts, batch.responses,
                                  batch_size=self.spec.gpm.batch_size)
        local_cpu = isinstance(self.gpm, GeneralPreferenceModel) and self.device.type == "cpu"
        if not self.learner.runs_reference_pass or local_cpu and torch.get_num_threads() == 1:
            with timer("score"):
                out = score()
            with timer("reference"):
                return out, self.learner.reference_logprobs(batch)
        with timer("reference"), self._gpm_thread.beside(score, share_cores=local_cpu) as scored:
            ref_logp = self.learner.reference_logprobs(batch)
        with timer("score"):  # the wait for the GPM after the reference pass
            return scored.result(), ref_logp

    # ------------------------------------------------------------------ evaluation

    def _eval_prompts(self) -> list[str]:
        pool = self.sources.heldout_prompts or self.sampler.prompts
        return list(pool[: self.spec.output.eval_prompts])

    def _sample(self, model, prompts: list[str], n: int, seed: int) -> tuple[list[str], list[str]]:
        """n samples per prompt for evaluations and probes (seeded; same on every rank)."""
        from gprl.evaluate import sample

        ro, learner = self.spec.rollout, self.spec.learner
        zero3 = self.world > 1 and learner.backend == "deepspeed" and learner.zero_stage == 3
        return sample(model, self.tokenizer, prompts, n, ro.max_new_tokens, ro.temperature, seed, synced_gpus=zero3,
                      text=self.sources.text)

    def _sample_reference(self, prompts: list[str], n: int, seed: int) -> list[str]:
        """n reference-policy samples per prompt (the policy with its adapters off, under LoRA)."""
        if self.reference is None:
            with self.policy.disable_adapter():
                return self._sample(self.policy, prompts, n, seed)[1]
        return self._sample(self.reference, prompts, n, seed)[1]

    def _probe_pool(self) -> list[str]:
        """The probe's prompts: drift.probePrompts training prompts after the first output.evalPrompts (which the
        evaluation uses when the data has no held-out split), so never an evaluation prompt."""
        d, start = self.spec.drift, self.spec.output.eval_prompts  # the final evaluation always runs
        pool = list(self.sampler.prompts[start : start + d.probe_prompts])
        if not pool:
            raise ValueError(
                f"drift.probePrompts: no training prompts left for the probe after the {start} evaluation prompts "
                f"({len(self.sampler.prompts)} in all); lower output.evalPrompts, give more prompts, or set "
                "drift.probeEvery: 0"
            )
        return pool

    def probe_prompts_for(self, step: int) -> tuple[int | None, list[str]]:
        """(slot, prompts) of a probe step, else (None, []). The probe costs no sampling and no scoring of its own:
        every drift.probeEvery steps, p of the step's prompts are probe prompts (a slot of the pool, in turn), whose
        G rollouts the step samples, scores and trains on as any other; each slot comes back about every
        drift.referenceLag steps, and its rollouts then are compared with those of its last visit."""
        d = self.spec.drift
        if not self._probing or step % d.probe_every:
            return None, []
        pool, p = self._probe_pool(), self._probe_width
        slot = (step // d.probe_every - 1) % -(-len(pool) // p)
        return slot, pool[slot * p : slot * p + p]

    def probe(self, slot: int, v: torch.Tensor, lam: torch.Tensor) -> list[float] | None:
        """Per-axis win rates of this step's rollouts on the probe prompts of `slot` against that slot's rollouts at
        its last visit (the policy ≈ drift.referenceLag steps ago), pooled over the last visit of every slot;
        None until some slot has been visited twice. v: (p, G, 2k) embeddings; lam: (p, k) eigenvalues."""
        from gprl.algo import axis_win_rates, pooled_win_rates

        v, lam = v.detach().float().cpu(), lam.detach().float().cpu()
        if not (torch.isfinite(v).all() and torch.isfinite(lam).all()):
            return None  # a GPM output gone non-finite: this visit neither compares nor becomes a reference
        before = self._probe_seen.get(slot)
        self._probe_seen[slot] = v
        if before is not None and before.shape == v.shape:
            self._probe_wins[slot] = (axis_win_rates(v, before, lam).tolist(), v.shape[0] * v.shape[1] ** 2)
        if not self._probe_wins:
            return None
        wins, pairs = zip(*self._probe_wins.values())
        return pooled_win_rates(torch.tensor(wins), torch.tensor(pairs, dtype=torch.float32)).tolist()

    def evaluate(self) -> dict:
        """Win rate of the current policy against the reference on held-out prompts (same seeds each time)."""
        from gprl.evaluate import win_rates

        spec = self.spec
        prompts = self._eval_prompts()
        if getattr(self, "_reference_samples", None) is None:
            self._reference_samples = self._sample_reference(prompts, spec.output.eval_samples, spec.seed + 1)
        rep, mine = self._sample(self.policy, prompts, spec.output.eval_samples, spec.seed + 2)
        ref = self._reference_samples
        overall, per_axis = win_rates(self.gpm, self.gpm_tokenizer, rep, mine, ref)
        rec = {"step": self.step, "gpm_win_rate": overall, "gpm_axis_win_rate": per_axis}
        if self.sources.oracle is not None:
            oracle = self.sources.oracle
            rec["oracle_win_rate"] = oracle.win_rate(rep, mine, ref)
            rec.update({f"policy_{k}": v for k, v in oracle.batch_stats(rep, mine).items()})
            rec.update({f"reference_{k}": v for k, v in oracle.batch_stats(rep, ref).items()})
        return rec

    # ------------------------------------------------------------------ the run

    def train(self) -> list[dict]:
        # Every rank runs the loop (rollouts, updates, evaluations and checkpoints are collective under DeepSpeed);
        # only rank 0 writes the config, the logs, the metrics and the report.
        try:
            self._open_output()
            with self._stop_on_signals():
                return self._train()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
                raise OutputFolderError(
                    f"output.dir {self.out}: cannot write {exc.filename or 'a file'}: {exc.strerror}. The checkpoints "
                    "already written are intact; free space (or fix the permissions) and rerun to resume."
                ) from exc
            raise
        finally:
            if getattr(self, "trackers", None) is not None:
                self.trackers.close(finished=self.step >= self.spec.algo.steps)
            if getattr(self, "_lock", None) is not None:
                self._lock.release()

    def _open_output(self) -> None:
        """Rank 0 takes the folder's lock, refuses a fresh start over an existing run unless told to overwrite,
        and removes what interrupted writers left. Errors name output.dir (exit 2 from the CLI)."""
        spec = self.spec
        self._lock = None
        if self.rank == 0:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                self._lock = OutputLock(self.out).acquire()
            except (FileExistsError, NotADirectoryError):
                raise OutputFolderError(f"output.dir {self.out} is not a folder (a file is in the way)") from None
            except OSError as exc:
                raise OutputFolderError(f"output.dir {self.out} cannot be used: {exc.strerror}") from None
            used = [n for n in RUN_FILES if (self.out / n).exists()]
            if not spec.checkpoint.resume and used:
                if not spec.output.overwrite:
                    raise OutputFolderError(
                        f"output.dir {self.out} holds a run ({', '.join(used)}) and checkpoint.resume is false. "
                        "Set output.overwrite: true (--output.overwrite true) to delete it and start afresh, "
                        "checkpoint.resume: true to continue it, or give another output.dir."
                    )
                for n in used:
                    p = self.out / n
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                self.log(f"output.overwrite: deleted the previous run in {self.out} ({', '.join(used)})")
            for p in remove_stale_temps(self.out) + remove_stale_temps(self.checkpoint_root):
                self.log(f"removed {p}, left by an interrupted write")
        gdist.barrier()

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGTERM (eviction, preemption) or SIGINT: finish the step, checkpoint it, return. A second signal acts
        as if there were no handler. Handlers can only be set from the main thread; elsewhere nothing changes."""
        self.stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum, frame):
            if self.stop_signal is not None:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            self.stop_signal = signal.Signals(signum).name
            os.write(2, f"gprl: {self.stop_signal}: stopping after the current step with a checkpoint "
                        "(send it again to stop at once)\n".encode())

        previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _stop_requested(self) -> bool:
        """Same answer on every rank: the pods of a run get their signals at slightly different moments."""
        return gdist.all_reduce_max(int(self.stop_signal is not None)) > 0

    def _train(self) -> list[dict]:
        spec, lead = self.spec, self.rank == 0
        if spec.checkpoint.resume:
            self.resume()
        log_path = self.out / "steps.jsonl"
        samples_path = self.out / "samples.jsonl"
        self.trackers = None
        if lead:
            dump_config(spec, self.out / "config.yaml")
            self._truncate_log(log_path)
            self._truncate_log(self.out / "evals.jsonl")
            self._truncate_log(samples_path)
            from gprl.tracking import open_trackers

            self.trackers = open_trackers(spec, self.out, start_step=self.step, log=self.log)
        if self.step == 0 and spec.output.eval_every:
            rec = self.evaluate()
            if lead:
                self._append(self.out / "evals.jsonl", rec)
                self.trackers.log_metrics(rec["step"], rec, prefix="eval")
        bar = None
        if spec.output.progress and lead:
            from tqdm import tqdm

            name = os.environ.get("GPRL_RUN_NAME") or "/".join(self.out.parts[-2:])
            bar = tqdm(total=spec.algo.steps, initial=self.step, desc=name, unit="step", dynamic_ncols=True)
        records = []
        with open(log_path if lead else os.devnull, "a") as fh:
            while self.step < spec.algo.steps:
                rec = self.train_step()
                if lead:
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
                    self.metrics.record(rec)
                    self.trackers.log_metrics(rec["step"], rec)
                    if self.samples:
                        with open(samples_path, "a") as sf:
                            sf.writelines(json.dumps(r) + "\n" for r in self.samples)
                        self.trackers.log_samples(rec["step"], self.samples)
                    if self.channel is not None:
                        self.channel.report(finite_only(rec))  # NaN is not JSON: the status patch would fail
                records.append(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        kl=f"{rec['kl']:.3f}", D=f"{rec['divergence']:.3f}", len=f"{rec['response_length']:.1f}",
                        tok_s=f"{rec['tokens_per_second']:.0f}", refresh=False,
                    )
                every = spec.output.eval_every
                if (every and self.step % every == 0) or self.step == spec.algo.steps:
                    ev = self.evaluate()  # same prompts and seeds on every rank: safe under ZeRO-3
                    if lead:
                        self._append(self.out / "evals.jsonl", ev)
                        self.trackers.log_metrics(ev["step"], ev, prefix="eval")
                stop = self._stop_requested()
                if stop or self.step % spec.checkpoint.every_steps == 0 or self.step == spec.algo.steps:
                    t_save = time.perf_counter()
                    self.save_checkpoint()
                    self._check_grace_period(rec["step_seconds"], time.perf_counter() - t_save)
                if stop and self.step < spec.algo.steps:
                    self.log(f"stopped by {self.stop_signal or 'a signal on another rank'} after step {self.step}; "
                             f"checkpoint {self.checkpoint_root / f'step-{self.step:08d}'} written. "
                             "Rerun the same command to resume.")
                    break
        if bar is not None:
            bar.close()
        if spec.output.report and lead and self.step == spec.algo.steps:
            from gprl.report import write_report

            write_report(self.out)
        return records

    def _check_grace_period(self, step_seconds: float, save_seconds: float) -> None:
        """Under the operator, warn once when a step plus a checkpoint would not fit in the pod's grace period:
        a SIGTERM would then kill the trainer before its checkpoint is written."""
        grace = self.spec.resources.termination_grace_period_seconds
        need = step_seconds + save_seconds
        if os.environ.get("GPRL_RUN_NAME") and self.rank == 0 and need > 0.8 * grace and not self._grace_warned:
            self._grace_warned = True
            self.log(f"warning: a step plus a checkpoint take {need:.0f} s, close to or above "
                     f"resources.terminationGracePeriodSeconds ({grace} s): after a SIGTERM the pod may be killed "
                     "before its checkpoint is written; raise the grace period")

    def _keep_samples(self, batch, scores, adv, bad_rows) -> None:
        """On sample steps, the first output.samples_groups groups as rows for samples.jsonl and the trackers."""
        o, G = self.spec.output, self.spec.algo.group_size
        self.samples = []
        if not o.samples_every or (self.step + 1) % o.samples_every or self.rank != 0:
            return
        for b in range(min(o.samples_groups, scores.shape[0])):
            for g in range(G):
                i = b * G + g
                self.samples.append({
                    "step": self.step + 1, "group": b, "prompt": batch.prompts[i], "response": batch.responses[i],
                    "scores": [float(x) for x in scores[b, g]], "advantage": float(adv[b, g]),
                    "gpm_nonfinite": bool(bad_rows[b, g]),
                })

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

    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "policy_version": self.policy_version,
            "learner": self.learner.state_dict(),
            "monitor": self.monitor.state_dict(),
            "probe": {"seen": self._probe_seen, "wins": self._probe_wins},
            "control": self.control.to_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": self._rng_state(),
        }

    @staticmethod
    def _rng_state() -> dict:
        return {"python": random.getstate(), "torch": torch.get_rng_state()}

    def _check_finite_weights(self) -> None:
        """Never write a checkpoint that every resume would then load: a non-finite weight is a bug to stop at."""
        # under ZeRO-3 a parameter is a placeholder and this rank's partition is its ds_tensor; every rank checks
        # its own part and all decide together (the checkpoint is collective)
        bad = [n for n, p in self.policy.named_parameters()
               if p.requires_grad and not torch.isfinite(getattr(p, "ds_tensor", p)).all()]
        if gdist.all_reduce_max(int(bool(bad))):
            raise RuntimeError(f"non-finite policy weights at step {self.step} ({bad[:3] or 'on another rank'}); "
                               "no checkpoint written, the previous ones are intact")

    def save_checkpoint(self) -> Path:
        if self.learner.sharded_checkpoint:
            return self._save_sharded_checkpoint()
        self._check_finite_weights()
        path = self.checkpoint_root / f"step-{self.step:08d}"
        with atomic_dir(path) as tmp:
            self.policy.save_pretrained(tmp / "policy")
            self.tokenizer.save_pretrained(tmp / "policy")  # a checkpoint's policy folder loads on its own
            save_state(self._trainer_state(), tmp, "trainer_state")
            dump_config(self.spec, tmp / "config.yaml")
        self._prune_checkpoints()
        return path

    def _prune_checkpoints(self) -> None:
        for old in sorted(self.checkpoint_root.glob("step-*"))[: -self.spec.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def _save_sharded_checkpoint(self) -> Path:
        """A DeepSpeed learner's checkpoint: every rank writes its shard into one folder (a volume all ranks
        share), rank 0 adds the trainer state and the manifest last and renames the folder into place. Layout:
        learner/ (DeepSpeed: model + partitioned optimizer), rng-rank<r>.{json,safetensors}, trainer_state.{json,
        safetensors}, config.yaml, manifest.json, and in the final checkpoint policy/ (a plain Hugging Face export)."""
        self._check_finite_weights()
        path = self.checkpoint_root / f"step-{self.step:08d}"
        tmp = self.checkpoint_root / f".step-{self.step:08d}.partial"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        gdist.barrier()
        self.learner.save(tmp / "learner")
        if self.step >= self.spec.algo.steps:
            self.learner.export_pretrained(tmp / "policy")
        save_state(self._rng_state(), tmp, f"rng-rank{self.rank}")
        gdist.barrier()
        if self.rank == 0:
            save_state(self._trainer_state(), tmp, "trainer_state")
            dump_config(self.spec, tmp / "config.yaml")
            publish(tmp, path)
            self._prune_checkpoints()
        gdist.barrier()
        return path

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint whose manifest checks out; newer broken ones are reported and passed over."""
        for path in checkpoint_folders(self.checkpoint_root):
            try:
                verify_manifest(path)
            except InvalidCheckpoint as exc:
                self.log(f"warning: skipping checkpoint {path}: {exc}")
                continue
            return path
        return None

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
        state = load_state(path, "trainer_state")  # JSON + safetensors: loading runs no code
        if self.learner.sharded_checkpoint:
            saved_world = state["learner"].get("world_size", self.world)
            if saved_world != self.world:
                raise CheckpointMismatch(f"checkpoint {path} was written by {saved_world} ranks, this run has {self.world}")
            self.learner.load(path / "learner")  # model weights and optimizer shards (collective)
        else:
            self._load_policy_weights(path / "policy")
        self.step, self.policy_version = state["step"], state["policy_version"]
        self.learner.load_state_dict(state["learner"])
        self.monitor.load_state_dict(state["monitor"])
        probe = state.get("probe") or {}
        self._probe_seen, self._probe_wins = dict(probe.get("seen", {})), dict(probe.get("wins", {}))
        self.control = Control(**state["control"])
        self.sampler.load_state_dict(state["sampler"])
        rng = state["rng"]
        if (path / f"rng-rank{self.rank}.json").exists():
            rng = load_state(path, f"rng-rank{self.rank}")
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
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
